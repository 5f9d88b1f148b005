"""Fused elementwise kernels of the decoder layer (Triton), with their torch reference.

A W1 prefill step (8,192 tokens, Llama-3-8B, H100) spent ~90 of its 258 GPU ms in unfused
elementwise kernels: float32 RMSNorm statistics (a cast, a square, a mean, a multiply, a cast
back and the weight), RoPE (two products, a concatenation, a sum for q and for k) and SiLU x
up, each a full pass over activations of up to 8,192 x 28,672 values. One kernel per
operation reads its inputs once and writes its output once. In a decode step the cost is the
launches instead: RoPE on q and on k, three index copies of the new K, V and positions into
the pool and a cast of the positions were six kernels per layer (~0.5 ms of a 14 ms step at
batch 256 on an H200); ``rotary_qk`` and ``store_kv`` make them two.

Each kernel reproduces the reference's rounding: where torch rounds an intermediate to the
activation dtype (RMSNorm's normalised value before the weight, RoPE's two products, SiLU's
output before the product), the kernel rounds it too, and the kernels are compiled without
FMA contraction (``enable_fp_fusion=False``: with it, RoPE's product and sum fused into one
rounding and 17% of bf16 outputs differed by an ulp on the H100). What remains different is
the order of RMSNorm's float32 sum of squares and the exp inside SiLU.

Every function takes ``fused``: the Triton kernel (CUDA tensors; ``TRITON_INTERPRET=1`` runs
it on the CPU for the tests) or the torch reference.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch reference is used
    HAS_TRITON = False


# ---- torch reference ------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # float32 statistics, as transformers computes them
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, D); cos, sin (N, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---- Triton kernels ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, sx, sr, so, sres, C, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:  # residual stream: (x + r) rounded as the reference's bf16 add rounds it
            r = tl.load(r_ptr + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * sres + cols, s, mask=mask)
            x = s.to(tl.float32)
        var = tl.sum(x * x, axis=0) / C
        y = (x * (1.0 / tl.sqrt(var + eps))).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * so + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, sx, so, I, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * sx + I + cols, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * so + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, sxn, sxh, scn, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        n = tl.program_id(0)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        m = (hs < H)[:, None]
        p1 = x_ptr + n * sxn + hs[:, None] * sxh + d[None, :]
        dt = x_ptr.dtype.element_ty
        x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + n * scn + d).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + n * scn + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + n * scn + d).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + n * scn + HALF + d).to(tl.float32)[None, :]
        # the reference: x * cos + cat(-x2, x1) * sin, each product rounded, then the sum
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(p1, o1.to(dt), mask=m)
        tl.store(p1 + HALF, o2.to(dt), mask=m)

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, pos_ptr, idx_ptr, kc_ptr, vc_ptr, pc_ptr, skn, svn, H,
                         HD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
        # one program per new token: its K and V rows (H_kv x D contiguous) and its position
        # (once per KV head) go to its pool slot
        n = tl.program_id(0)
        slot = tl.load(idx_ptr + n).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < HD
        tl.store(kc_ptr + slot * HD + offs, tl.load(k_ptr + n * skn + offs, mask=m), mask=m)
        tl.store(vc_ptr + slot * HD + offs, tl.load(v_ptr + n * svn + offs, mask=m), mask=m)
        hs = tl.arange(0, BLOCK_H)
        p = tl.load(pos_ptr + n).to(tl.int32) + tl.zeros([BLOCK_H], dtype=tl.int32)
        tl.store(pc_ptr + slot * H + hs, p, mask=hs < H)


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``: CUDA, or the CPU under
    ``TRITON_INTERPRET=1`` (the tests)."""
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# ---- the ops the model calls -----------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             fused: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` or, with ``residual``, of ``x + residual``: then returns
    ``(normed, x + residual)`` (the new residual stream), as vLLM's fused add-norm."""
    if not fused or x.shape[-1] > 65536:
        if residual is None:
            return rms_norm_ref(x, weight, eps)
        s = x + residual
        return rms_norm_ref(s, weight, eps), s
    shape = x.shape
    x2 = _rows(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    C = x2.shape[1]
    if residual is None:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, C, eps,
                                         HAS_RES=False, BLOCK=triton.next_power_of_2(C), enable_fp_fusion=False)
        return out.view(shape)
    r2 = _rows(residual).contiguous()
    res = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res, x2.stride(0), r2.stride(0), out.stride(0), res.stride(0), C, eps,
                                     HAS_RES=True, BLOCK=triton.next_power_of_2(C), enable_fp_fusion=False)
    return out.view(shape), res.view(shape)


def silu_mul(x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """x (N, 2I) = [gate | up] -> silu(gate) * up (N, I)."""
    inter = x.shape[-1] // 2
    if not fused:
        gate, up = x.split(inter, dim=-1)
        return F.silu(gate) * up
    x2 = _rows(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    BLOCK = 1024
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, BLOCK))](x2, out, x2.stride(0), out.stride(0), inter, BLOCK=BLOCK, enable_fp_fusion=False)
    return out.view(*x.shape[:-1], inter)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """RoPE on x (N, H, D) with cos, sin (N, D) (the halves layout). Fused: in place on ``x``
    (any row and head strides, contiguous head dim), which it returns."""
    D = x.shape[-1]
    half = D // 2
    if not fused or half & (half - 1) or x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(0) != cos.stride(0):
        return rotary_ref(x, cos, sin)
    N, H = x.shape[0], x.shape[1]
    BLOCK_H = min(triton.next_power_of_2(H), 16)
    _rotary_kernel[(N, triton.cdiv(H, BLOCK_H))](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), H, HALF=half, BLOCK_H=BLOCK_H, enable_fp_fusion=False)
    return x


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q (N, H_q, D) and k (N, H_kv, D). Fused, where k's heads directly follow q's in
    memory (both views of one q/k/v projection output, as the model has them): one launch
    over the H_q + H_kv heads instead of two (a decode step runs this once per layer, where
    a launch costs about what the work does)."""
    if fused and q.dim() == 3 and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and k.stride() == q.stride() \
            and q.stride(1) == q.shape[2] and k.data_ptr() == q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size():
        qk = q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
        if rotary(qk, cos, sin, True) is qk:  # in place, so q and k (views of it) are rotated
            return q, k
    return rotary(q, cos, sin, fused), rotary(k, cos, sin, fused)


def store_kv(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, pos_cache: torch.Tensor, fused: bool = False) -> None:
    """Write the new tokens' keys and values (N, H_kv, D) and their positions (N,) to pool
    slots ``slots`` (N,) of one layer: ``k_cache``, ``v_cache`` (S, H_kv, D), ``pos_cache``
    (S, H_kv) int32 (the position repeated per KV head). Fused (where ``triton_usable``, as
    the attention kernels): one kernel instead of three index copies and a cast, four
    launches per layer and step."""
    n, h, d = k.shape
    rows_contiguous = k.stride(1) == d and k.stride(2) == 1 and v.stride() == k.stride()  # H_kv x D per token
    flat = all(t.is_contiguous() for t in (k_cache, v_cache, pos_cache, slots, positions))
    if not (fused and triton_usable(k) and rows_contiguous and flat):
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        pos_cache.index_copy_(0, slots, positions.to(torch.int32)[:, None].expand(-1, h))
        return
    if n == 0:
        return
    _store_kv_kernel[(n,)](k, v, positions, slots, k_cache, v_cache, pos_cache, k.stride(0), v.stride(0), h,
                           HD=h * d, BLOCK=triton.next_power_of_2(h * d), BLOCK_H=triton.next_power_of_2(h))

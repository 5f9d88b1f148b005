"""The decoder's fused elementwise kernels (engine/fused_ops.py) against their torch reference.

CPU (always): the reference ops equal the formulations they replace. Interpret
(``TRITON_INTERPRET=1``, Triton installed): the kernels on CPU tensors. GPU (``-m gpu``): the
kernels on CUDA in bf16 at a prefill step's sizes.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from batchmax.engine.fused_ops import HAS_TRITON, rms_norm, rms_norm_ref, rotary, rotary_qk, rotary_ref, silu_mul, store_kv

interpret = pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="set TRITON_INTERPRET=1 (and install triton) to run the kernels on the CPU",
)
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")


def _inputs(n, hidden, heads, kv_heads, d, inter, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype=dtype, device=device)  # noqa: E731
    pos = torch.randint(0, 5000, (n,), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[:, None] * inv[None, :]] * 2, dim=-1)
    # q and k as the model has them: views into one projection output
    qkv = r(n, (heads + 2 * kv_heads) * d)
    return dict(x=r(n, hidden), res=r(n, hidden), w=r(hidden) * 0.1 + 1, gate_up=r(n, 2 * inter) * 3,
                qkv=qkv, cos=emb.cos().to(dtype=dtype, device=device), sin=emb.sin().to(dtype=dtype, device=device))


def _qk(qkv, heads, kv_heads, d):
    n = qkv.shape[0]
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return q.view(n, heads, d), k.view(n, kv_heads, d)


def _check(device, dtype, n, hidden, heads, kv_heads, d, inter, truncating=False):
    """``truncating``: Triton's interpreter converts float32 to bfloat16 by truncation (the
    GPU rounds to nearest, as torch does), so there bf16 results may be a few ulps off."""
    t = _inputs(n, hidden, heads, kv_heads, d, inter, dtype, device)
    # one bf16 ulp is 2^-8..2^-7 relative: RMSNorm's sum order and SiLU's exp may flip a rounding
    ulp = (2.0**-5 if truncating else 2.0**-6) if dtype == torch.bfloat16 else 1e-5
    exact = dict(rtol=ulp, atol=ulp) if truncating and dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    # RMSNorm, plain and with the residual add
    out = rms_norm(t["x"], t["w"], 1e-5, fused=True)
    torch.testing.assert_close(out.float(), rms_norm_ref(t["x"], t["w"], 1e-5).float(), rtol=ulp, atol=1e-6)
    out, res = rms_norm(t["x"], t["w"], 1e-5, residual=t["res"], fused=True)
    torch.testing.assert_close(res, t["x"] + t["res"], **exact)  # rounded as the reference's add
    torch.testing.assert_close(out.float(), rms_norm_ref(t["x"] + t["res"], t["w"], 1e-5).float(), rtol=ulp, atol=1e-6)
    # SiLU x up
    gate, up = t["gate_up"].split(inter, dim=-1)
    torch.testing.assert_close(silu_mul(t["gate_up"], fused=True).float(), (F.silu(gate) * up).float(), rtol=ulp, atol=1e-6)
    # RoPE in place on the strided q and k views, every rounding as the reference's
    q, k = _qk(t["qkv"].clone(), heads, kv_heads, d)
    want_q, want_k = rotary_ref(q, t["cos"], t["sin"]), rotary_ref(k, t["cos"], t["sin"])
    got_q, got_k = rotary(q, t["cos"], t["sin"], fused=True), rotary(k, t["cos"], t["sin"], fused=True)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(got_q, want_q, **exact)
    torch.testing.assert_close(got_k, want_k, **exact)
    # q and k in one launch: the same bits as the two launches above
    qkv = t["qkv"].clone()
    q, k = _qk(qkv, heads, kv_heads, d)
    got_q2, got_k2 = rotary_qk(q, k, t["cos"], t["sin"], fused=True)
    assert got_q2.data_ptr() == q.data_ptr() and got_k2.data_ptr() == k.data_ptr()
    assert torch.equal(got_q2, got_q) and torch.equal(got_k2, got_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], t["qkv"][:, (heads + kv_heads) * d :])  # v untouched
    _check_store_kv(t["qkv"], heads, kv_heads, d)


def _check_store_kv(qkv, heads, kv_heads, d):
    """The fused K/V/position write equals the three index copies, bit for bit, with k and v
    the strided views of the projection the model passes."""
    n = qkv.shape[0]
    _, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    k, v = k.view(n, kv_heads, d), v.view(n, kv_heads, d)
    slots = torch.randperm(3 * n, generator=torch.Generator().manual_seed(1))[:n].to(qkv.device)
    positions = torch.arange(100, 100 + n, device=qkv.device) * 7
    pools = [(torch.zeros(3 * n, kv_heads, d, dtype=qkv.dtype, device=qkv.device),
              torch.zeros(3 * n, kv_heads, d, dtype=qkv.dtype, device=qkv.device),
              torch.full((3 * n, kv_heads), -1, dtype=torch.int32, device=qkv.device)) for _ in range(2)]
    store_kv(k, v, positions, slots, *pools[0], fused=False)
    store_kv(k, v, positions, slots, *pools[1], fused=True)
    for want, got in zip(*pools):
        assert torch.equal(want, got)
    assert torch.equal(pools[1][0][slots], k) and torch.equal(pools[1][1][slots], v)
    assert torch.equal(pools[1][2][slots], positions.to(torch.int32)[:, None].expand(-1, kv_heads))
    untouched = torch.ones(3 * n, dtype=torch.bool, device=qkv.device)
    untouched[slots] = False
    assert (pools[1][2][untouched] == -1).all() and (pools[1][0][untouched] == 0).all()


def test_reference_ops_match_the_formulations_they_replace():
    t = _inputs(7, 48, 4, 2, 16, 40, torch.float32, "cpu")
    out, res = rms_norm(t["x"], t["w"], 1e-6, residual=t["res"])
    s = t["x"] + t["res"]
    assert torch.equal(res, s)
    assert torch.allclose(out, t["w"] * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)))
    gate, up = t["gate_up"].split(40, dim=-1)
    assert torch.equal(silu_mul(t["gate_up"]), F.silu(gate) * up)
    # RoPE as transformers writes it (rotate_half)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = _qk(t["qkv"], 4, 2, 16)
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], t["cos"][None], t["sin"][None])
    assert torch.allclose(rotary(q, t["cos"], t["sin"]), hq[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(rotary(k, t["cos"], t["sin"]), hk[0].transpose(0, 1), atol=1e-6)
    # the pair, unfused, is the two single calls; the K/V write is plain index copies
    rq, rk = rotary_qk(q, k, t["cos"], t["sin"])
    assert torch.equal(rq, rotary(q, t["cos"], t["sin"])) and torch.equal(rk, rotary(k, t["cos"], t["sin"]))
    _check_store_kv(t["qkv"], 4, 2, 16)


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpret_kernels(dtype):
    _check("cpu", dtype, n=5, hidden=96, heads=6, kv_heads=2, d=16, inter=80, truncating=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dims", [(4096, 32, 8, 128, 14336), (576, 9, 3, 64, 1536)])
def test_gpu_kernels_bf16(dims):
    hidden, heads, kv_heads, d, inter = dims
    _check("cuda", torch.bfloat16, 1031, hidden, heads, kv_heads, d, inter)
    _check("cuda", torch.float32, 64, hidden, heads, kv_heads, d, inter)

"""Fused paged attention over the KV pool: one Triton kernel family for decode, prefill chunks
and mixed steps, reading K/V straight from the pool (no dense copy).

Inputs of one layer and one step (see ``engine/kv_cache.py`` for the pool)::

    q               (N, H_q, D)        the step's new tokens, requests packed back to back
    k_cache, v_cache (num_slots, H_kv, D)  one layer of the pool; slot = block * block_size + offset
    block_table     (B, max_blocks)    int32/int64 block ids of each request, in token order
    seq_lens        (B,)               keys request b has in this layer, its new tokens included
    query_start_loc (B + 1,)           request b's queries are q[query_start_loc[b]:query_start_loc[b+1]]

Request b has ``q_len = query_start_loc[b+1] - query_start_loc[b]`` new tokens, already written
to the pool as its last ``q_len`` keys; ``ctx = seq_len - q_len`` keys come before them. Query j
(0-based among the new tokens) sees keys ``[0, ctx + j]``: causal, aligned bottom-right. GQA:
query head h reads KV head ``h // G`` with ``G = H_q // H_kv``. Keys are stored after RoPE.

Kernel design (ideas from vLLM's Triton "unified attention"; the code is ours):

* One program = one (block of queries of one request, KV head[, KV split]). Its M dimension
  packs ``BLOCK_Q`` queries x the ``G`` query heads that share the KV head: row ``m`` is query
  ``m // G``, head ``kv_head * G + m % G``. Each K/V tile is loaded once for all G heads, so
  the pool is read once per (request, KV head) in decode, and the ``tl.dot`` has M >= 16 rows
  even for a single decode token (tensor cores need M >= 16).
* The key loop walks ``TILE`` keys at a time; each key's slot comes from the block table
  (``block_table[b, t // block_size] * block_size + t % block_size``), so K/V rows (D
  contiguous elements per head) are gathered straight from the pool. Online softmax in
  float32 (base-2 exponentials, the scale folded into log2(e)); P is cast to the K/V dtype for
  the second product, as FlashAttention does.
* Tiles every row of the program can fully see run without masks; only the tiles that cross
  the causal diagonal or the end of the sequence pay for masking.
* Decode (``max_query_len == 1``): one program per request and KV head, no search. When that
  is too few programs to fill the GPU (small batch, long sequences) the key range is split
  over ``num_splits`` programs (flash-decoding); each writes an unnormalised partial output
  with its running max and sum, and a second small kernel merges them.
* Prefill / mixed: queries are cut into blocks of ``BLOCK_Q`` per request; program i finds its
  request by binary search over ``query_start_loc // BLOCK_Q + b`` (no host sync: the grid is
  the upper bound ``N // BLOCK_Q + B`` and surplus programs exit at once).
* Mixed steps in decode-first order (``num_decodes``): two launches, the single-token requests
  in the decode configuration and the chunks in the prefill one (H100, 254 decodes + 2 chunks
  of 512: 900 us instead of 1103 us in one launch sized for the chunks).

Measured on an H100 (``bench/attention_kernels.py``, CUDA-graph medians, Llama-3-8B shape):
decode B=256 x 4352 keys 1503 us = 3.04 TB/s (the copy rate, 101% of bytes / 3.0 TB/s),
B=64 x 768 keys 72 us (94%); prefill 16 x 512 over 4096 cached keys 1.64 ms = 356 TFLOP/s
(SDPA flash on a dense copy: 1.86 ms). bf16 vs the float32 oracle: relative error ~2e-3.

``paged_attention`` dispatches: the Triton kernels on CUDA (or on CPU under
``TRITON_INTERPRET=1``), otherwise a torch fallback that gathers each request's keys and calls
``engine/attention_ref.attend_one``. ``paged_attention_ref`` is the float32 oracle for tests.
"""
from __future__ import annotations

import functools
import math

import torch

try:  # Triton is optional: CPU-only installs (CI) use the torch fallback.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

from batchmax.engine.attention_ref import attend_one
from batchmax.engine.fused_ops import triton_usable

_LOG2E = 1.4426950408889634


# =====================================================================================
# Reference and fallback (plain torch)
# =====================================================================================


def _check(q, k_cache, v_cache, block_table, seq_lens, query_start_loc):
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError("q must be (N, H_q, D) and k_cache, v_cache (num_slots, H_kv, D)")
    n, hq, d = q.shape
    _, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head dim of q ({d}) and of the pool ({dk}) differ")
    if hq % hkv:
        raise ValueError(f"H_q={hq} is not a multiple of H_kv={hkv}")
    b = block_table.shape[0]
    if seq_lens.shape != (b,) or query_start_loc.shape != (b + 1,):
        raise ValueError("seq_lens must be (B,) and query_start_loc (B + 1,) for a (B, max_blocks) block table")
    return n, hq, hkv, d, b


def _slots(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Slot ids of a request's first ``length`` tokens, in token order: (length,) int64."""
    t = torch.arange(length, device=block_table_row.device)
    return block_table_row.long()[t // block_size] * block_size + t % block_size


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    block_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: a loop over requests, explicit float32 softmax. Returns (N, H_q, D) in q's
    dtype (or writes ``out``)."""
    n, hq, hkv, d, b = _check(q, k_cache, v_cache, block_table, seq_lens, query_start_loc)
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    res = torch.empty(n, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        s, e, length = qsl[i], qsl[i + 1], lens[i]
        nq = e - s
        if nq == 0:
            continue
        assert nq <= max_query_len and nq <= length, (i, nq, length)
        sl = _slots(block_table[i], length, block_size)
        k = k_cache[sl].float().repeat_interleave(g, dim=1)  # (T, H_q, D)
        v = v_cache[sl].float().repeat_interleave(g, dim=1)
        qf = q[s:e].float()  # (n, H_q, D)
        scores = torch.einsum("nhd,thd->hnt", qf, k) * scale  # (H_q, n, T)
        ctx = length - nq
        visible = torch.arange(length, device=q.device)[None, :] <= ctx + torch.arange(nq, device=q.device)[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        res[s:e] = torch.einsum("hnt,thd->nhd", p, v)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    block_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fallback for devices without Triton: gather each request's keys through its block
    table and run the engine's torch attention (SDPA) in the input dtype."""

    n, hq, hkv, d, b = _check(q, k_cache, v_cache, block_table, seq_lens, query_start_loc)
    if scale is not None and abs(scale - 1.0 / math.sqrt(d)) > 1e-12:
        q = q * (scale * math.sqrt(d))  # attend_one uses SDPA's default 1/sqrt(D)
    out = torch.empty_like(q) if out is None else out
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i in range(b):
        s, e, length = qsl[i], qsl[i + 1], lens[i]
        if e == s:
            continue
        sl = _slots(block_table[i], length, block_size)
        out[s:e] = attend_one(q[s:e], k_cache[sl], v_cache[sl], length - (e - s))
    return out


# =====================================================================================
# Triton kernels
# =====================================================================================

if HAS_TRITON:

    @triton.jit
    def _find_request(query_start_loc_ptr, qblock, req_base, num_reqs, tok_base, BLOCK_Q: tl.constexpr):
        """Request of query block ``qblock`` among requests [req_base, req_base + num_reqs):
        request b owns the program ids from ``(query_start_loc[b] - tok_base) // BLOCK_Q +
        (b - req_base)`` on (enough for its ceil(q_len / BLOCK_Q) blocks); binary search for
        the last b whose start is <= qblock."""
        lo: tl.int32 = req_base
        hi: tl.int32 = req_base + num_reqs
        while lo < hi:
            mid = (lo + hi) // 2
            start = (tl.load(query_start_loc_ptr + mid) - tok_base) // BLOCK_Q + (mid - req_base)
            if start <= qblock:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _attend_tile(
        acc,  # (BLOCK_M, BLOCK_D) float32, unnormalised output
        m_i,  # (BLOCK_M,) float32 running max of the scores (log2 units)
        l_i,  # (BLOCK_M,) float32 running sum of exp2(score - m_i)
        q,  # (BLOCK_M, BLOCK_D) queries of the program, pool dtype
        k_head_ptr,  # k_cache + kv_head * stride_kh
        v_head_ptr,
        bt_row_ptr,  # block_table + request * stride_bt
        tile,  # index of the TILE-key tile
        kv_end,  # keys [0, kv_end) may be visible to some row (<= seq_len)
        q_abs,  # (BLOCK_M,) last key each row sees: ctx + query index
        qk_scale,  # softmax scale * log2(e)
        offs_d,  # (BLOCK_D,)
        d_ok,  # (BLOCK_D,) d < HEAD_DIM
        stride_ks,
        stride_vs,
        TILE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # tokens per pool block
        MASK: tl.constexpr,  # False: every row sees every key of this tile
        PAD_D: tl.constexpr,  # BLOCK_D > HEAD_DIM
        DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (exact checks), else tensor cores
    ):
        offs_t = tile * TILE + tl.arange(0, TILE)  # (TILE,) key index in the request
        if MASK:
            key_ok = offs_t < kv_end
            blk = tl.load(bt_row_ptr + offs_t // BLOCK_SIZE, mask=key_ok, other=0)
        else:
            blk = tl.load(bt_row_ptr + offs_t // BLOCK_SIZE)
        # int64 slot: num_slots * H_kv * D can pass 2^31
        slot = blk.to(tl.int64) * BLOCK_SIZE + (offs_t % BLOCK_SIZE)  # (TILE,)
        k_ptrs = k_head_ptr + slot[:, None] * stride_ks + offs_d[None, :]  # (TILE, BLOCK_D)
        v_ptrs = v_head_ptr + slot[:, None] * stride_vs + offs_d[None, :]
        if MASK:
            ld_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
            v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        elif PAD_D:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, TILE) float32, log2 units
        if MASK:
            s = tl.where(offs_t[None, :] <= q_abs[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_M,)
        if MASK:
            # a row that has seen no key yet (padding row, or a split that starts after its
            # last key) keeps m = -inf; subtract 0 instead so that exp2 gives 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])  # (BLOCK_M, TILE)
        alpha = tl.math.exp2(m_i - m_sub)  # (BLOCK_M,) rescales what was summed so far
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_D)
        return acc, m_new, l_i

    # num_reqs / num_tokens change every step: no recompile per value, and never the
    # constexpr 1 that Triton would make of them (it breaks the search loop's types)
    @triton.jit(do_not_specialize=["req_base", "num_reqs", "tok_base", "num_tokens", "stride_bt"])
    def _paged_attn_kernel(
        out_ptr,  # (N, H_q, D) output, q's dtype
        q_ptr,  # (N, H_q, D)
        k_ptr,  # (num_slots, H_kv, D)
        v_ptr,  # (num_slots, H_kv, D)
        block_table_ptr,  # (B, max_blocks)
        seq_lens_ptr,  # (B,)
        query_start_loc_ptr,  # (B + 1,)
        part_out_ptr,  # (N, H_q, NUM_SPLITS, BLOCK_D) float32 partials (split-KV only)
        part_ml_ptr,  # (2, N, H_q, NUM_SPLITS) float32 running max / sum (split-KV only)
        qk_scale,
        req_base,  # this launch serves requests [req_base, req_base + num_reqs)
        num_reqs,
        tok_base,  # ... whose queries are tokens [tok_base, tok_base + num_tokens)
        num_tokens,
        stride_qn,
        stride_qh,
        stride_on,
        stride_oh,
        stride_ks,
        stride_kh,
        stride_vs,
        stride_vh,
        stride_bt,
        NUM_Q_HEADS: tl.constexpr,
        G: tl.constexpr,  # query heads per KV head
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
        BLOCK_SIZE: tl.constexpr,  # tokens per pool block
        BLOCK_M: tl.constexpr,  # rows of the program: BLOCK_Q queries x G heads, padded
        BLOCK_Q: tl.constexpr,
        TILE: tl.constexpr,  # keys per inner step
        NUM_SPLITS: tl.constexpr,  # >1: split-KV, write partials
        DECODE: tl.constexpr,  # every request has at most one query: program id = request
        DOT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        if DECODE:
            req = req_base + pid
            qblock = 0
        else:
            req = _find_request(query_start_loc_ptr, pid, req_base, num_reqs, tok_base, BLOCK_Q)
            qblock = pid - ((tl.load(query_start_loc_ptr + req) - tok_base) // BLOCK_Q + (req - req_base))
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        if qblock * BLOCK_Q >= q_len:
            return  # surplus program of the upper-bound grid (or a request with no query)
        seq_len = tl.load(seq_lens_ptr + req)
        ctx = seq_len - q_len  # keys before the request's first new token

        # ---- the program's rows: (query, head) pairs -----------------------------------
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_idx = qblock * BLOCK_Q + offs_m // G  # (BLOCK_M,) query among the request's new tokens
        head = kv_head * G + offs_m % G  # (BLOCK_M,) query head
        row_ok = (offs_m < BLOCK_Q * G) & (q_idx < q_len)
        tok = (q_start + q_idx).to(tl.int64)  # (BLOCK_M,) row in the packed batch
        q = tl.load(
            q_ptr + tok[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        q_abs = ctx + q_idx  # (BLOCK_M,) last visible key of each row

        # ---- which keys: causal bound of the block, then this split's share ----------------
        q_last = tl.minimum(qblock * BLOCK_Q + BLOCK_Q, q_len) - 1
        kv_end = ctx + q_last + 1  # keys seen by the block's last query (<= seq_len)
        kv_all = ctx + qblock * BLOCK_Q + 1  # keys seen by every row of the block
        num_tiles = tl.cdiv(kv_end, TILE)
        n_full = kv_all // TILE  # tiles that need no mask
        if NUM_SPLITS > 1:
            per_split = tl.cdiv(num_tiles, NUM_SPLITS)
            lo = split * per_split
            hi = tl.minimum(lo + per_split, num_tiles)
        else:
            lo = 0
            hi = num_tiles

        k_head_ptr = k_ptr + kv_head * stride_kh
        v_head_ptr = v_ptr + kv_head * stride_vh
        bt_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for t in range(lo, tl.minimum(hi, n_full)):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_head_ptr, v_head_ptr, bt_row_ptr, t, kv_end, q_abs, qk_scale,
                offs_d, d_ok, stride_ks, stride_vs, TILE, BLOCK_SIZE, False, BLOCK_D != HEAD_DIM, DOT_PRECISION,
            )
        for t in range(tl.maximum(lo, n_full), hi):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_head_ptr, v_head_ptr, bt_row_ptr, t, kv_end, q_abs, qk_scale,
                offs_d, d_ok, stride_ks, stride_vs, TILE, BLOCK_SIZE, True, BLOCK_D != HEAD_DIM, DOT_PRECISION,
            )

        if NUM_SPLITS == 1:
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # padding rows only; never stored
            o = acc / l_safe[:, None]
            tl.store(
                out_ptr + tok[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & d_ok[None, :],
            )
        else:
            # every split stores, even an empty one (m = -inf, l = 0): the merge reads them all
            pidx = ((tok - tok_base) * NUM_Q_HEADS + head) * NUM_SPLITS + split  # (BLOCK_M,)
            tl.store(part_out_ptr + pidx[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + pidx, m_i, mask=row_ok)
            tl.store(part_ml_ptr + num_tokens * NUM_Q_HEADS * NUM_SPLITS + pidx, l_i, mask=row_ok)

    @triton.jit(do_not_specialize=["tok_base", "num_tokens"])
    def _merge_splits_kernel(
        out_ptr,  # (N, H_q, D)
        part_out_ptr,  # (num_tokens, H_q, NUM_SPLITS, BLOCK_D) float32
        part_ml_ptr,  # (2, num_tokens, H_q, NUM_SPLITS) float32
        tok_base,  # the partials are of tokens [tok_base, tok_base + num_tokens)
        num_tokens,
        stride_on,
        stride_oh,
        NUM_Q_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
    ):
        """One program per (token, query head): out = sum_s w_s acc_s / sum_s w_s l_s with
        w_s = exp2(m_s - max_s m_s). Split 0 always holds key 0, which every query sees, so
        the max is finite; empty splits have m = -inf and weigh 0."""
        i = tl.program_id(0).to(tl.int64)
        tok = tok_base + i
        head = tl.program_id(1)
        offs_s = tl.arange(0, NUM_SPLITS)
        offs_d = tl.arange(0, BLOCK_D)
        base = (i * NUM_Q_HEADS + head) * NUM_SPLITS
        m = tl.load(part_ml_ptr + base + offs_s)  # (NUM_SPLITS,)
        l = tl.load(part_ml_ptr + num_tokens * NUM_Q_HEADS * NUM_SPLITS + base + offs_s)
        w = tl.math.exp2(m - tl.max(m, axis=0))  # (NUM_SPLITS,)
        acc = tl.load(part_out_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :])  # (NUM_SPLITS, BLOCK_D)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)  # (BLOCK_D,)
        tl.store(out_ptr + tok * stride_on + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


# =====================================================================================
# Launch
# =====================================================================================

_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.lru_cache(maxsize=4096)
def pick_config(
    num_tokens: int,
    num_reqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_query_len: int,
    max_kv_len: int,
    device: torch.device,
) -> dict:
    """Launch parameters chosen from host-side sizes only (no device sync, so the call can be
    captured in a CUDA graph). ``max_kv_len`` is an upper bound of the sequence lengths (the
    block table's width x block_size). Measured on an H100 (bench/attention_kernels.py)."""
    g = num_q_heads // num_kv_heads
    decode = max_query_len <= 1
    if decode:
        # rows = the G heads of one token; 16 is the smallest M of a tensor-core dot.
        # Memory-bound: 2 stages (one tile in flight while one is used) beat 3 and 4 at every
        # measured size, e.g. B=64 x 4352 keys: 380 us (the bandwidth floor) vs 438 with 3.
        block_m = max(16, _next_pow2(g))
        block_q = 1
        tile = 64 if head_dim >= 128 else 128
        num_warps, num_stages = 4, 2
        programs = num_reqs * num_kv_heads
    else:
        # a block of queries x G heads, as many rows as the chunk fills (up to 128 for
        # D >= 128, 64 for D = 64). Compute-bound; measured on the 16 x 512 over 4096 chunk:
        # D=128: 128 rows, 128-key tiles, 8 warps, 3 stages: 359 TFLOP/s (64-key tiles and
        # 2 stages: 293; SDPA flash on a dense copy: 321). D=64: 64 rows, 128-key tiles,
        # 4 warps: 255 TFLOP/s (64-key tiles: 239; 128 rows, 8 warps: 210; SDPA flash: 258).
        max_m = 128 if head_dim > 64 else 64
        block_m = max(16, min(max_m, _next_pow2(max_query_len * g)), _next_pow2(g))
        block_q = block_m // g
        if block_m >= 128:
            tile, num_warps, num_stages = 128, 8, 3
        else:
            tile, num_warps, num_stages = (128 if head_dim <= 64 else 64), 4, 3
        programs = (num_tokens // block_q + num_reqs) * num_kv_heads
    # split-KV (flash-decoding) when the grid would leave SMs idle and each split keeps
    # >= 256 keys; partials cost N * H_q * splits * D * 4 bytes, kept small
    target = 2 * _num_sms(device)
    num_splits = 1
    while (
        programs * num_splits < target
        and max_kv_len // (num_splits * 2) >= 256
        and num_splits < 32
        and num_tokens * num_q_heads * num_splits * 2 * _next_pow2(head_dim) * 4 <= (64 << 20)
    ):
        num_splits *= 2
    return dict(block_m=block_m, block_q=block_q, tile=tile, num_warps=num_warps, num_stages=num_stages,
                num_splits=num_splits, decode=decode)


def _launch(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, out, scale, block_size,
            req_base, num_reqs, tok_base, num_tokens, max_query_len, config):
    """One launch of the kernel (plus the split merge) over requests [req_base, req_base +
    num_reqs), whose queries are tokens [tok_base, tok_base + num_tokens)."""
    _, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    cfg = pick_config(num_tokens, num_reqs, hq, hkv, d, max_query_len, block_table.shape[1] * block_size, q.device)
    if config:
        cfg = {**cfg, **config}
        if "block_m" in config and "block_q" not in config:
            cfg["block_q"] = 1 if cfg["decode"] else cfg["block_m"] // g
    block_m, block_q, splits, decode = cfg["block_m"], cfg["block_q"], cfg["num_splits"], cfg["decode"]
    if block_q * g > block_m or block_q < 1:
        raise ValueError(f"block_m={block_m} cannot hold {block_q} queries x {g} heads")
    if decode and max_query_len > 1:
        raise ValueError("decode mode needs max_query_len <= 1")
    block_d = _next_pow2(d)
    if splits > 1:
        part_out = torch.empty(num_tokens, hq, splits, block_d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(2, num_tokens, hq, splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_ml = out  # unused
    grid0 = num_reqs if decode else num_tokens // block_q + num_reqs
    _paged_attn_kernel[(grid0, hkv, splits)](
        out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, part_out, part_ml,
        scale * _LOG2E, req_base, num_reqs, tok_base, num_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_table.stride(0),
        NUM_Q_HEADS=hq, G=g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE=cfg["tile"], NUM_SPLITS=splits, DECODE=decode,
        # float32 pools are for checks: full-precision dots, not tf32 (~1e-3)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, hq)](
            out, part_out, part_ml, tok_base, num_tokens, out.stride(0), out.stride(1),
            NUM_Q_HEADS=hq, HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=splits, num_warps=4,
        )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    block_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    num_decodes: int = 0,
    config: dict | None = None,
) -> torch.Tensor:
    """The Triton path (see ``paged_attention``). ``config`` overrides keys of
    ``pick_config``'s answer in every launch (benchmarks)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    # the kernel indexes these by raw pointer: a strided view (a row of an (L, B) tensor
    # built transposed) would be read wrong
    seq_lens, query_start_loc = seq_lens.contiguous(), query_start_loc.contiguous()
    n, hq, hkv, d, b = _check(q, k_cache, v_cache, block_table, seq_lens, query_start_loc)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dim of q, k_cache and v_cache must be contiguous")
    if not 0 <= num_decodes <= b:
        raise ValueError(f"num_decodes={num_decodes} is not in [0, {b}]")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(n, hq, d, dtype=q.dtype, device=q.device) if out is None else out
    if n == 0 or b == 0:
        return out
    args = (q, k_cache, v_cache, block_table, seq_lens, query_start_loc, out, scale, block_size)
    if max_query_len <= 1:
        _launch(*args, 0, b, 0, n, max_query_len, config)
    elif 0 < num_decodes < b:
        # decode-first batch: the single-token requests through the decode kernel (16-row
        # programs), the chunks through the prefill kernel (128-row programs)
        _launch(*args, 0, num_decodes, 0, num_decodes, 1, config)
        _launch(*args, num_decodes, b - num_decodes, num_decodes, n - num_decodes, max_query_len, config)
    else:
        _launch(*args, 0, b, 0, n, max_query_len, config)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    block_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    num_decodes: int = 0,
) -> torch.Tensor:
    """Attention of the step's packed queries over the paged pool; (N, H_q, D) in q's dtype.

    ``max_query_len`` must be >= every request's query count (1 selects the decode kernel);
    ``seq_lens``, ``query_start_loc`` and ``block_table`` live on q's device. On CUDA this
    runs the Triton kernels and never syncs with the host (CUDA-graph safe for fixed shapes);
    elsewhere it falls back to torch (SDPA per request).

    ``num_decodes``: optional; when the first ``num_decodes`` requests have exactly one query
    each (vLLM's decode-first batch order), they run through the decode kernel and the rest
    through the prefill kernel, in two launches: faster on mixed steps than one launch sized
    for the chunks (which gives each decode request a 128-row program)."""
    if triton_usable(q):
        return paged_attention_triton(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                                      max_query_len, block_size, scale, out, num_decodes=num_decodes)
    return paged_attention_torch(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                                 max_query_len, block_size, scale, out)

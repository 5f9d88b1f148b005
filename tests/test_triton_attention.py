"""Paged attention over the pool (engine/triton_attention.py) against the float32 oracle.

CPU: the torch fallback vs ``paged_attention_ref`` (and the oracle vs the engine's own
``PoolAttention`` slot path). GPU (``-m gpu``, skipped without CUDA): the Triton kernels in
bf16. The Triton kernels can also be checked on the CPU through Triton's interpreter:
``TRITON_INTERPRET=1 python -m pytest tests/test_triton_attention.py -k interpret``
(needs ``pip install triton``; skipped otherwise).

Inputs are random everywhere (never zeros); pool slots that no request may read hold NaN, so
a read outside a request's visible keys poisons the output; block ids are shuffled.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from batchmax.engine.triton_attention import (
    HAS_TRITON,
    paged_attention,
    paged_attention_ref,
    paged_attention_torch,
)


def make_case(
    q_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
    poison: bool = True,
    table_width: int | None = None,
):
    """A random pool and step. Each request b gets ceil(seq_lens[b] / block_size) blocks drawn
    from a shuffled pool (non-contiguous, out of order); unread slots hold NaN if ``poison``.
    Returns a dict of paged_attention's arguments."""
    assert len(q_lens) == len(seq_lens) and all(0 <= q <= s for q, s in zip(q_lens, seq_lens))
    gen = torch.Generator().manual_seed(seed)
    nblocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(nblocks) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    width = table_width or max(max(nblocks), 1)
    table = torch.zeros(len(q_lens), width, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(nblocks):
        table[i, :nb] = perm[at : at + nb].to(torch.int32)
        at += nb
    slots = num_blocks * block_size
    k = torch.randn(slots, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(slots, num_kv_heads, head_dim, generator=gen)
    if poison:  # slots beyond each request's seq_len and spare blocks must never be read
        used = torch.zeros(slots, dtype=torch.bool)
        for i, s in enumerate(seq_lens):
            t = torch.arange(s)
            used[table[i, t // block_size].long() * block_size + t % block_size] = True
        k[~used] = float("nan")
        v[~used] = float("nan")
    n = sum(q_lens)
    q = torch.randn(n, num_q_heads, head_dim, generator=gen)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    dev = torch.device(device)
    return dict(
        q=q.to(dev, dtype),
        k_cache=k.to(dev, dtype),
        v_cache=v.to(dev, dtype),
        block_table=table.to(dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        query_start_loc=qsl.to(dev),
        max_query_len=max(q_lens) if q_lens else 0,
        block_size=block_size,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


# (q_lens, seq_lens, H_q, H_kv, D, block_size): decode, prefill, mixed, GQA 4 and 3, MHA
CASES = {
    "decode_gqa4": ([1] * 6, [1, 15, 16, 17, 100, 333], 8, 2, 64, 16),
    "decode_smollm": ([1] * 5, [3, 64, 65, 200, 129], 9, 3, 64, 16),
    "prefill_from_empty": ([37, 16], [37, 16], 8, 2, 64, 16),
    "prefill_with_prefix": ([50, 33], [120, 33 + 64], 9, 3, 64, 16),
    "mixed": ([1, 70, 1, 1, 19], [300, 170, 5, 64, 19], 8, 2, 128, 16),
    "mha_block8": ([3, 1, 9], [40, 77, 9], 4, 4, 64, 8),
    "gqa8_d128": ([1, 24], [90, 130], 16, 2, 128, 16),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_fallback_matches_ref(name, dtype):
    q_lens, seq_lens, hq, hkv, d, bs = CASES[name]
    case = make_case(q_lens, seq_lens, hq, hkv, d, bs, dtype=dtype, seed=hash(name) % 1000)
    ref = paged_attention_ref(**case)
    assert ref.dtype == dtype
    ref32 = paged_attention_ref(**{**case, "q": case["q"].float(), "k_cache": case["k_cache"].float(),
                                   "v_cache": case["v_cache"].float()})
    out = paged_attention_torch(**case)
    assert torch.isfinite(out).all() and torch.isfinite(ref32).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref32) < tol
    # the dispatcher takes the fallback on CPU (unless the Triton interpreter is on)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert rel_err(paged_attention(**case), ref32) < tol


def test_ref_matches_dense_softmax():
    """The oracle itself, on one request, against attention written out densely."""
    case = make_case([5], [12], 6, 2, 64, 4, seed=7)
    ref = paged_attention_ref(**case)
    t = torch.arange(12)
    slots = case["block_table"][0].long()[t // 4] * 4 + t % 4
    k = case["k_cache"][slots].repeat_interleave(3, 1)  # (12, 6, 64)
    v = case["v_cache"][slots].repeat_interleave(3, 1)
    s = torch.einsum("nhd,thd->hnt", case["q"].double(), k.double()) / math.sqrt(64)
    mask = t[None, :] <= 7 + torch.arange(5)[:, None]
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    dense = torch.einsum("hnt,thd->nhd", p, v.double())
    assert rel_err(ref, dense) < 1e-6


def test_scale_and_out_arguments():
    case = make_case([4, 1], [20, 9], 4, 2, 64, 16, seed=3)
    ref = paged_attention_ref(**case, scale=0.05)
    out = torch.full_like(case["q"], float("nan"))
    got = paged_attention_torch(**case, scale=0.05, out=out)
    assert got is out and rel_err(out, ref) < 1e-5
    # num_decodes is a launch hint for the kernels; the fallback gives the same numbers
    case = make_case([1, 1, 6], [30, 2, 40], 4, 2, 64, 16, seed=4)
    assert rel_err(paged_attention(**case, num_decodes=2), paged_attention_ref(**case)) < 1e-5


def test_ref_agrees_with_pool_attention():
    """The oracle computes what the engine's torch path (PoolAttention / attend_one over the
    slot table) computes, so the kernels are held to the engine's own numbers."""
    from batchmax.engine.attention_ref import attend_one

    case = make_case([1, 6, 1], [50, 30, 7], 9, 3, 64, 16, seed=11)
    ref = paged_attention_ref(**case)
    qsl, lens = case["query_start_loc"].tolist(), case["seq_lens"].tolist()
    for b in range(3):
        s, e = qsl[b], qsl[b + 1]
        t = torch.arange(lens[b])
        sl = case["block_table"][b].long()[t // 16] * 16 + t % 16
        got = attend_one(case["q"][s:e], case["k_cache"][sl], case["v_cache"][sl], lens[b] - (e - s))
        assert rel_err(got, ref[s:e]) < 1e-5


# ---- the Triton kernels --------------------------------------------------------------------

interpret = pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="set TRITON_INTERPRET=1 (and install triton) to run the kernels on the CPU",
)
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")


@interpret
@pytest.mark.parametrize("name", ["decode_smollm", "prefill_with_prefix", "mixed", "mha_block8"])
def test_interpret_kernel(name):
    from batchmax.engine.triton_attention import paged_attention_triton

    q_lens, seq_lens, hq, hkv, d, bs = CASES[name]
    case = make_case(q_lens, seq_lens, hq, hkv, d, bs, seed=5)
    ref = paged_attention_ref(**case)
    out = paged_attention_triton(**case)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4
    # split-KV path too (forced: CPU sizes never ask for it)
    out = paged_attention_triton(**case, config={"num_splits": 4, "tile": 16})
    assert rel_err(out, ref) < 1e-4


@interpret
@pytest.mark.parametrize("splits", [1, 4])
def test_interpret_decode_first(splits):
    """``num_decodes``: the leading single-token requests in the decode kernel, the rest in
    the prefill kernel (two launches writing disjoint rows of one output)."""
    from batchmax.engine.triton_attention import paged_attention_triton

    case = make_case([1, 1, 1, 70, 19, 1], [300, 5, 64, 170, 19, 40], 9, 3, 64, 16, seed=11)
    ref = paged_attention_ref(**case)
    out = torch.full_like(case["q"], float("nan"))
    paged_attention_triton(**case, out=out, num_decodes=3, config={"num_splits": splits, "tile": 16})
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-4


def _gpu_case(q_lens, seq_lens, hq, hkv, d, seed):
    return make_case(q_lens, seq_lens, hq, hkv, d, 16, dtype=torch.bfloat16, device="cuda", seed=seed)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64), (16, 16, 64)])
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_gpu_kernel_bf16(hq, hkv, d, kind, splits):
    g = torch.Generator().manual_seed(hq * 100 + d + len(kind))
    if kind == "decode":
        seq = torch.randint(1, 3000, (37,), generator=g).tolist()
        ql = [1] * len(seq)
    elif kind == "prefill":
        ql = [300, 129, 64]
        seq = [300 + 1000, 129, 64 + 17]
    else:
        ql = [1] * 20 + [200, 1, 513]
        seq = torch.randint(1, 5000, (20,), generator=g).tolist() + [700, 2, 513 + 96]
    case = _gpu_case(ql, seq, hq, hkv, d, seed=len(seq))
    ref = paged_attention_ref(**case, out=torch.empty(case["q"].shape, dtype=torch.float32, device="cuda"))
    out = torch.full_like(case["q"], float("nan"))  # every element must be written
    from batchmax.engine.triton_attention import paged_attention_triton

    paged_attention_triton(**case, out=out, config=None if splits is None else {"num_splits": splits})
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2
    if kind == "mixed":  # decode-first order: the 20 single-token requests in their own launch
        out.fill_(float("nan"))
        paged_attention(**case, out=out, num_decodes=20)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


# ---- the engine's use of the kernel interface ---------------------------------------------


def test_step_metadata_kernel_arguments_are_row_major(tiny_llama):
    """The kernel reads seq_lens and the block table by raw pointer: each layer's row must be
    contiguous and hold held + new tokens (a transposed (L, B) tensor once broke this)."""
    from batchmax.engine import EngineConfig, LLMEngine, SamplingParams
    from batchmax.engine.attention import StepMetadata

    eng = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", num_tokens=4096, chunk_size=16))
    for i, n in enumerate([40, 7, 23]):
        eng.add_request(str(i), list(range(100, 100 + n)), SamplingParams(max_tokens=3, temperature=0.0))
    eng.step()
    eng.step()
    ids = [r.request_id for r in eng.scheduler.running]
    eng.cache.seqs["1"].lens[1] -= 2  # layers may hold different counts (eviction)
    num_new = [1, 5, 3][: len(ids)]
    for rid, n in zip(ids, num_new):
        eng.cache.grow(rid, n)
    meta = StepMetadata.build(eng.cache, ids, num_new, torch.arange(sum(num_new)))
    for layer in range(eng.cache.num_layers):
        row = meta.seq_lens[layer]
        assert row.is_contiguous()
        assert row.tolist() == [eng.cache.seqs[r].lens[layer] + n for r, n in zip(ids, num_new)]
    assert meta.block_table.is_contiguous() and meta.query_start_loc.tolist() == [0, 1, 6, 9][: len(ids) + 1]


def test_engine_through_the_kernel_interface_matches_reference(tiny_llama):
    """With ``fused`` on, PoolAttention calls ``paged_attention`` with the step's block table,
    per-layer seq_lens and query offsets; on the CPU that dispatches to the torch fallback, so
    the integration is checked token-exactly here and the kernels themselves on the GPU."""
    from batchmax.engine import LLM, SamplingParams
    from tests.helpers import random_prompts

    prompts = random_prompts([200, 65, 1, 130], seed=13)
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=48, num_tokens=4096, kv_policy="snapkv", kv_budget=64, kv_recall=True)
    fused = LLM(str(tiny_llama), device="cpu", chunk_size=48, num_tokens=4096, kv_policy="snapkv", kv_budget=64, kv_recall=True)
    fused.engine.runner.fused = True
    assert [o.token_ids for o in fused.generate(prompts, sp)] == [o.token_ids for o in ref.generate(prompts, sp)]

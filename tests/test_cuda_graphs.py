"""The decode-graph path (engine/cuda_graphs.py) on the CPU: the same static buffers, padding
and scratch block as on CUDA, replayed eagerly, must give the eager engine's tokens."""
from __future__ import annotations

import pytest
import torch

from batchmax.engine import LLM, SamplingParams
from batchmax.engine.cuda_graphs import DecodeGraphs, graph_buckets
from batchmax.engine.transfer import PinnedStager
from tests.helpers import random_prompts
from tests.tiny_models import build_tiny_model


def _with_graphs(llm: LLM, max_batch: int) -> DecodeGraphs:
    eng = llm.engine
    graphs = DecodeGraphs(eng.runner.model, eng.cache, max_batch, eng.cache.blocks_for(eng.max_model_len + 64))
    eng.runner.graphs = graphs
    return graphs


def test_buckets():
    assert graph_buckets(256)[:4] == [1, 2, 4, 8] and graph_buckets(256)[-1] == 256
    assert graph_buckets(100)[-1] == 100 and graph_buckets(1) == [1]


@pytest.mark.parametrize("policy,budget", [("full", None), ("snapkv", 40)])
def test_graph_decode_matches_eager(tiny_llama, policy, budget):
    # 5 requests: bucket 8 pads 3 rows, and requests finish at different steps so batches of
    # 5, 4, 3... run through buckets 8 and 4 with stale rows from the larger batch behind them
    prompts = random_prompts([30, 75, 52, 90, 41], seed=3)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, kv_policy=policy, kv_budget=budget) for m in (12, 7, 9, 4, 10)]
    kw = dict(device="cpu", chunk_size=32, num_tokens=4096)
    eager = LLM(tiny_llama, **kw).generate(prompts, params)
    llm = LLM(tiny_llama, **kw)
    graphs = _with_graphs(llm, 8)
    fast = llm.generate(prompts, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in eager]
    assert graphs.replays > 0 and set(graphs.graphs) >= {8}
    cache = llm.engine.cache
    assert cache.scratch_block not in cache._free and cache.num_free_blocks == cache.num_blocks


def test_graphs_skip_steps_that_evict(tiny_llama):
    # a request that may evict during decode records every step's queries in its observation
    # window, and eviction's shapes change with the data: its decode steps run eagerly
    prompts = random_prompts([60, 45], seed=4)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, kv_policy="snapkv", kv_budget=40)
    kw = dict(device="cpu", chunk_size=32, num_tokens=4096, evict_decode_every=2)
    eager = LLM(tiny_llama, **kw).generate(prompts, params)
    llm = LLM(tiny_llama, **kw)
    graphs = _with_graphs(llm, 4)
    fast = llm.generate(prompts, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in eager]
    assert graphs.replays == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy,budget", [("full", None), ("snapkv", 40)])
def test_cuda_graphs_match_eager_on_gpu(tmp_path, policy, budget):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = str(build_tiny_model(tmp_path, "llama", max_position_embeddings=4096))  # no tokenizer on the GPU machine
    prompts = random_prompts([30, 75, 52, 90, 41, 7, 130], seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, kv_policy=policy, kv_budget=budget)
    kw = dict(device="cuda", dtype="float32", chunk_size=32, num_tokens=4096, cuda_graph_max_batch=16, skip_tokenizer_init=True)
    eager = LLM(model, cuda_graphs=False, **kw).generate(prompts, params)
    llm = LLM(model, cuda_graphs=True, **kw)
    fast = llm.generate(prompts, params)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.replays > 0
    assert [o.token_ids for o in fast] == [o.token_ids for o in eager]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_stager_round_trips_across_halves():
    # a small ring so that the copies cross from half to half many times, with the GPU kept
    # busy so that the staged copies are still queued when the host moves on
    stager = PinnedStager("cuda", nbytes=4096)
    gen = torch.Generator().manual_seed(0)
    sent, got = [], []
    big = torch.randn(2048, 2048, device="cuda")
    for i in range(300):
        if i % 50 == 0:
            big = big @ big / 2048  # queue work ahead of the copies
        n = int(torch.randint(1, 300, (1,), generator=gen))
        data = torch.randint(-(2**40), 2**40, (n,), generator=gen)
        sent.append(data)
        got.append(stager.to_device(data, torch.int64))
    torch.cuda.synchronize()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(sent, got))

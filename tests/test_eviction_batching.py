"""Eviction batched over layers (``EvictionConfig.layer_batch_mib``) keeps exactly what
evicting after each layer keeps: the same positions in every layer and head after every step,
the same parked tokens under recall, the same output tokens; and it issues fewer operators."""
from __future__ import annotations

import pytest
import torch

from batchmax.engine import EngineConfig, LLMEngine, SamplingParams
from bench.step_ops import OpCounter, is_eviction
from tests.helpers import random_prompts

PROMPTS = [300, 217, 90, 45]


def _engine(path, batch_mib, **kw):
    return LLMEngine(EngineConfig.from_kwargs(model=str(path), device="cpu", num_tokens=8192, chunk_size=32, kv_budget=64,
                                              layer_batch_mib=batch_mib, **kw))


def _held(engine) -> dict:
    """request -> per layer, per KV head: the positions held, in slot order (the order
    compaction writes them), with the held lengths."""
    c = engine.cache
    out = {}
    for rid, seq in c.seqs.items():
        slots = c.slots(torch.from_numpy(c.block_table([rid])))[0]
        out[rid] = (list(seq.lens), [c.pos[layer, slots[:n]].T.tolist() for layer, n in enumerate(seq.lens)])
    return out


def _parked(engine) -> dict:
    host = engine.scheduler.host
    if host is None:
        return {}
    return {rid: list(s.lens) for rid, s in host.seqs.items()}


def _trace(path, batch_mib, **kw):
    """Every step's held positions and parked counts, and the outputs."""
    e = _engine(path, batch_mib, **kw)
    for i, p in enumerate(random_prompts(PROMPTS, seed=5)):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    steps, outs = [], {}
    while e.has_unfinished_requests():
        for o in e.step():
            outs[o.request_id] = list(o.token_ids)
        steps.append((_held(e), _parked(e)))
    return steps, outs


@pytest.mark.parametrize("policy", ["snapkv", "tova", "knorm", "streaming", "pyramid", "h2o"])
@pytest.mark.parametrize("recall", [False, True])
def test_batched_layers_keep_what_each_layer_keeps(policy, recall, tiny_llama):
    kw = dict(kv_policy=policy, kv_recall=recall)
    per_layer = _trace(tiny_llama, 0, **kw)
    # all three layers in one batch; batches of about two layers (a chunk step's layer gathers
    # ~0.09 MiB here: 4 rows of ~96 tokens, 2 KV heads of 16 float32); one layer per batch
    # through the flush (a bound of one byte)
    for mib in (512, 0.14, 2**-20):
        batched = _trace(tiny_llama, mib, **kw)
        assert batched[1] == per_layer[1]
        assert len(batched[0]) == len(per_layer[0])
        for i, (a, b) in enumerate(zip(batched[0], per_layer[0])):
            assert a == b, f"step {i} differs (layer_batch_mib={mib})"


def test_batched_layers_issue_fewer_operators(tiny_llama):
    """A whole run's operators: the evicting prefill steps issue one set of eviction
    operators instead of one per layer (3 here)."""
    counts, evicted = {}, {}
    for mib in (0, 512):
        e = _engine(tiny_llama, mib, kv_policy="snapkv")
        for i, p in enumerate(random_prompts([200, 200], seed=2)):
            e.add_request(f"r{i}", p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        c = OpCounter()
        with c:
            while e.has_unfinished_requests():
                e.step()
        counts[mib] = sum(n for fn, n in c.by_fn.items() if is_eviction(fn))
        evicted[mib] = e.stats().kv_tokens_evicted_total
    assert evicted[512] == evicted[0] > 0
    # what stays per layer: each layer's queries into the observation windows (_push_windows)
    assert counts[512] < 0.7 * counts[0], counts


def test_layer_batch_option_reaches_the_engine_and_is_checked(tiny_llama):
    from batchmax.server.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["serve", "--model", str(tiny_llama), "--layer-batch-mib", "64"])
    cfg = EngineConfig.from_kwargs(**engine_kwargs(args))
    assert cfg.eviction.layer_batch_mib == 64
    assert EngineConfig.from_kwargs(**engine_kwargs(build_parser().parse_args(["serve", "--model", "m"]))).eviction.layer_batch_mib == 512
    with pytest.raises(ValueError, match="layer_batch_mib must be >= 0"):
        EngineConfig.from_kwargs(model=str(tiny_llama), layer_batch_mib=-1)

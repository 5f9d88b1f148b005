"""Async scheduling (``SchedulerConfig.async_scheduling``): step n+1 is launched before step
n's tokens are read back, and its inputs come from step n's sampled ids on the device.

On the CPU the copies complete at once, but the bookkeeping is the same as on CUDA: every
request's newest token is pending while the next step is launched, outputs are reported one
step late, and a request that stops has run one more (discarded) step. These tests hold the
async engine to the synchronous one, token for token, on every feature that touches that
bookkeeping."""
from __future__ import annotations

import asyncio

import pytest

from batchmax.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from batchmax.engine.async_engine import AsyncEngine
from batchmax.engine.faults import StepError
from batchmax.engine.inflight import StepInFlight
from tests.helpers import hf_greedy, random_prompts


def _greedy(n=12, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def _pair(path, **kw):
    base = dict(device="cpu", num_tokens=8192, chunk_size=32, max_num_batched_tokens=96)
    base.update(kw)
    return LLM(str(path), async_scheduling=False, **base), LLM(str(path), async_scheduling=True, **base)


def _fields(out):
    """Everything but the logprob values, which ``_logprob_values`` compares with a tolerance."""
    lp = [(t.token_id, [a for a, _ in t.top]) for t in out.logprobs]
    plp = [None if t is None else (t.token_id, [a for a, _ in t.top]) for t in out.prompt_logprobs]
    return out.token_ids, out.text, out.finish_reason, out.stop_reason, lp, plp


def _logprob_values(out) -> list[float]:
    return [t.logprob for t in out.logprobs] + [t.logprob for t in out.prompt_logprobs if t is not None]


def _same_logprobs(x, y) -> bool:
    """Sync and async run the same requests in differently composed batches, so float32 sums
    differ in the last bits (seen: 1e-5 on a logprob of -6.0, which rounding to five places
    turned into a mismatch on one CPU and not another)."""
    a, b = _logprob_values(x), _logprob_values(y)
    return len(a) == len(b) and all(abs(u - v) <= 1e-4 for u, v in zip(a, b))


@pytest.fixture
def fills(monkeypatch):
    """Counts the inputs that steps read from the previous step's sampled ids on the device."""
    count = {"n": 0}
    orig = StepInFlight.input_fill

    def input_fill(self, request):
        count["n"] += 1
        return orig(self, request)

    monkeypatch.setattr(StepInFlight, "input_fill", input_fill)
    return count


def test_default_is_off_on_cpu(tiny_llama):
    assert LLM(str(tiny_llama), device="cpu", num_tokens=1024).engine.async_scheduling is False


def test_greedy_matches_transformers_with_chunks_and_joins(tiny_llama, fills):
    prompts = random_prompts([1, 3, 17, 64, 65, 130, 200], seed=21)
    llm = LLM(str(tiny_llama), device="cpu", chunk_size=64, max_num_batched_tokens=160, num_tokens=4096, async_scheduling=True)
    outs = llm.generate(prompts, _greedy())
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(tiny_llama, prompt, 12), f"prompt of {len(prompt)} tokens"
    # every decode input but the first of each request came from the device
    assert fills["n"] >= len(prompts) * 10
    eng = llm.engine
    assert eng.cache.usage == 0.0 and not eng.cache.seqs and eng._inflight is None
    assert eng.stats().generation_tokens_total == sum(len(o.token_ids) for o in outs)


def test_every_sampling_feature_matches_sync(tiny_llama):
    sync, asyn = _pair(tiny_llama)
    prompt = random_prompts([10], seed=8)[0]
    free = sync.generate([prompt], _greedy(20, ignore_eos=True))[0]
    stop_tok = free.token_ids[5]
    text = free.text
    needle = text[len(text) // 3 : len(text) // 3 + 4] or "zz"
    prompts = random_prompts([10, 40, 75, 5, 33, 120, 64], seed=22)
    prompts[0] = prompt
    params = [
        _greedy(20, ignore_eos=True, stop_token_ids=[stop_tok]),  # stops on a token id
        _greedy(20, ignore_eos=True, stop_token_ids=[stop_tok], min_tokens=8),
        _greedy(20, ignore_eos=True, stop=[needle]),  # a stop string (may span tokens)
        SamplingParams(max_tokens=15, temperature=0.9, top_p=0.9, top_k=40, seed=7),
        SamplingParams(max_tokens=9, temperature=1.2, seed=3, logprobs=2, prompt_logprobs=1),
        _greedy(7, logprobs=3, prompt_logprobs=2),
        _greedy(1),  # one token: its only step is the prompt's last chunk
    ]
    prompts[2] = prompt
    a, b = sync.generate(prompts, params), asyn.generate(prompts, params)
    for i, (x, y) in enumerate(zip(a, b)):
        assert _fields(x) == _fields(y), f"request {i}"
        assert _same_logprobs(x, y), f"request {i}"
    assert a[0].finish_reason == "stop" and a[0].stop_reason == stop_tok
    assert asyn.engine.cache.usage == 0.0 and not asyn.engine.requests


@pytest.mark.parametrize("kw", [
    dict(kv_policy="snapkv", kv_budget=24),
    dict(kv_policy="h2o", kv_budget=24),
    dict(kv_policy="snapkv", kv_budget=24, kv_recall=True),
    dict(kv_policy="tova", kv_budget=24, evict_decode_every=4),
], ids=["snapkv", "h2o", "snapkv-recall", "tova-decode-eviction"])
def test_eviction_and_recall_match_sync(tiny_llama, kw):
    prompts = random_prompts([150, 90, 20, 200, 64], seed=23)
    sync, asyn = _pair(tiny_llama, **kw)
    a, b = sync.generate(prompts, _greedy(16)), asyn.generate(prompts, _greedy(16))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    st = asyn.engine.stats()
    assert st.kv_tokens_evicted_total > 0 and st.kv_tokens_evicted_total == sync.engine.stats().kv_tokens_evicted_total
    assert asyn.engine.cache.usage == 0.0
    if asyn.engine.scheduler.host is not None:
        assert asyn.engine.scheduler.host.usage == 0.0


def test_preemption_by_recompute_matches_sync(tiny_llama):
    prompts = random_prompts([120, 110, 100, 90, 80, 70], seed=12)
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=8192).generate(prompts, _greedy(24))
    tight = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=20 * 16, decode_reserve_tokens=0, async_scheduling=True)
    outs = tight.generate(prompts, _greedy(24))
    assert tight.engine.stats().num_preemptions_total > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert tight.engine.cache.usage == 0.0


def test_a_stopped_request_runs_one_discarded_step(tiny_llama):
    """It stops on step n's token, which the host reads after launching step n+1 with it: that
    step's token is dropped, and the request's KV is freed as soon as the stop is seen."""
    prompt = random_prompts([10], seed=8)[0]
    eng = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", num_tokens=4096, async_scheduling=True))
    free = LLM(str(tiny_llama), device="cpu", num_tokens=4096).generate([prompt], _greedy(20, ignore_eos=True))[0].token_ids
    stop_tok = free[4]
    eng.add_request("r", prompt, _greedy(20, ignore_eos=True, stop_token_ids=[stop_tok]))
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out
    n = free.index(stop_tok) + 1
    assert final.token_ids == free[:n] and final.finish_reason == "stop"
    # the prompt's step samples token 1, n - 1 decodes the rest, and one more is discarded
    assert eng.stats().num_steps_total == n + 1
    assert eng.stats().generation_tokens_total == n and eng.cache.usage == 0.0


def test_max_tokens_is_not_overrun(tiny_llama):
    """The scheduler knows a request's last token is pending: no step is wasted on it."""
    eng = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", num_tokens=4096, async_scheduling=True))
    eng.add_request("r", random_prompts([10], seed=1)[0], _greedy(6, ignore_eos=True))
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert len(o.token_ids) <= 6
    assert eng.stats().num_steps_total == 6 and eng.stats().generation_tokens_total == 6


def test_abort_while_its_step_is_in_flight(tiny_llama):
    prompts = random_prompts([40, 60, 30], seed=5)
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=32, num_tokens=4096).generate(prompts, _greedy(30))
    eng = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", chunk_size=32, num_tokens=4096, async_scheduling=True))
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, _greedy(30))
    seen: dict[str, list[int]] = {}
    for _ in range(8):
        for o in eng.step():
            seen[o.request_id] = o.token_ids
    r1 = eng.requests["r1"]
    assert r1 in eng._inflight.sampled and r1.num_pending_tokens == 1
    free_before, held = eng.cache.num_free_blocks, len(eng.cache.seq("r1").blocks)
    eng.abort_request("r1")
    assert "r1" not in eng.cache.seqs and eng.cache.num_free_blocks == free_before + held
    finals = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o
    assert finals["r1"].finish_reason == "abort" and finals["r1"].token_ids == seen["r1"]
    assert finals["r0"].token_ids == ref[0].token_ids and finals["r2"].token_ids == ref[2].token_ids
    assert r1.num_pending_tokens == 0 and eng.cache.usage == 0.0


def test_failed_step_keeps_the_previous_steps_tokens(tiny_llama):
    """Step n+1 fails at launch after step n ran: the error names step n+1's requests, and
    the tokens step n produced are reported by the next step, not lost."""
    poison = 7
    eng = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", num_tokens=4096, async_scheduling=True,
                                             debug_fail_step_token=poison))
    eng.add_request("a", [100, 101, 102], _greedy(50, ignore_eos=True))
    got: dict[str, int] = {}
    for _ in range(4):
        for o in eng.step():
            got[o.request_id] = len(o.token_ids)
    eng.add_request("p", [poison, 5], _greedy(5))
    a = eng.requests["a"]
    known = len(a.output_token_ids)
    with pytest.raises(StepError) as err:
        eng.step()
    assert sorted(err.value.request_ids) == ["a", "p"]
    assert len(a.output_token_ids) == known + 1  # step n's token arrived during the failing step
    for rid in err.value.request_ids:  # as AsyncEngine does with a failed step's requests
        eng.abort_request(rid)
    outs = {o.request_id: o for o in eng.step()}
    assert len(outs["a"].token_ids) == known + 1 and outs["a"].finish_reason == "abort"
    assert outs["p"].finish_reason == "abort" and outs["p"].token_ids == []
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.cache.usage == 0.0 and not eng.cache.seqs


def test_async_engine_streams_match_offline(tiny_llama):
    prompts = random_prompts([25, 70, 5], seed=31)
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=32, num_tokens=4096).generate(prompts, _greedy(10))
    ae = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", chunk_size=32, num_tokens=4096,
                                                        async_scheduling=True)))
    try:
        async def run(i, p):
            last = None
            async for out in ae.generate(p, _greedy(10), request_id=f"s{i}"):
                last = out
            return last

        async def main():
            return await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))

        outs = asyncio.run(main())
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        assert all(o.finish_reason == "length" for o in outs)
        st = ae.stats()
        assert (st.num_running, st.kv_usage, ae.num_unfinished) == (0, 0.0, 0)
    finally:
        ae.shutdown()

"""Tensor parallelism on the CPU (gloo, spawned worker processes): TP=2 and TP=4 give the
same greedy tokens as one process, for every policy with and without recall; aborts,
preemption and failing steps leave the ranks in the same state; a rank that dies makes rank 0
raise ``TPError`` instead of hanging; workers do not outlive rank 0.

What is asserted: float32 models, greedy decoding: the tokens are equal, and the chosen
tokens' logprobs agree within 1e-4 (the all-reduce sums partial products in another order
than one matmul, so logits differ in the last bits; these tiny models keep the top logits
far apart, so no token flips). ``debug_tp_check_state`` makes every step also compare a digest
of the scheduler and pool state of all ranks (a difference raises).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from batchmax.engine import EngineConfig, LLMEngine, SamplingParams
from batchmax.engine.parallel import TPError
from batchmax.policies import available_policies
from tests.helpers import random_prompts

BUDGET = 32
POISON = 77  # a prompt with this token makes its steps fail (FaultConfig), on every rank
# host_kv_tokens: room for every parked token, so no recall request falls back to plain
# eviction (which requests do when the store is full depends on admission, not on the ranks)
COMMON = dict(device="cpu", dtype="float32", num_tokens=4096, host_kv_tokens=65536, chunk_size=32, max_num_seqs=32, skip_tokenizer_init=True)


def _engine(path, tp: int, **kw) -> LLMEngine:
    opts = dict(COMMON, tensor_parallel_size=tp, debug_tp_check_state=tp > 1, tp_timeout_s=60)
    opts.update(kw)
    return LLMEngine(EngineConfig.from_kwargs(model=str(path), **opts))


def _cases():
    """Every policy, with and without recall (full: without only)."""
    return [(p, r) for p in available_policies() for r in ((False,) if p == "full" else (False, True))]


def _params(policy: str, recall: bool, n: int = 8) -> SamplingParams:
    kw = {} if policy == "full" else dict(kv_budget=BUDGET, kv_recall=recall)
    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=1, kv_policy=policy, **kw)


def _run(engine: LLMEngine, reqs: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, prompt, p in reqs:
        engine.add_request(rid, prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid].token_ids == b[rid].token_ids, rid
        assert a[rid].finish_reason == b[rid].finish_reason, rid
        for x, y in zip(a[rid].logprobs, b[rid].logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4, rid


@pytest.fixture
def llama_pair(tiny_llama):
    """One process and two ranks (a process is a rank of one tensor-parallel engine at a time)."""
    faults = dict(debug_fail_step_token=POISON)
    one, two = _engine(tiny_llama, 1, **faults), _engine(tiny_llama, 2, **faults)
    yield one, two
    two.shutdown()


def _policy_batch(seed: int) -> list[tuple[str, list[int], SamplingParams]]:
    """One request per policy x recall, all in one batch."""
    cases = _cases()
    prompts = random_prompts([70 + 9 * i for i in range(len(cases))], seed=seed)
    return [(f"{p}-{r}", [t for t in prompt if t != POISON], _params(p, r)) for (p, r), prompt in zip(cases, prompts)]


def _compare_every_policy(one: LLMEngine, two: LLMEngine, seed: int) -> None:
    batch = _policy_batch(seed)
    _assert_same(_run(one, batch), _run(two, batch))
    s1, s2 = one.stats(), two.stats()
    assert s2.kv_tokens_evicted_total == s1.kv_tokens_evicted_total > 0  # eviction did run
    assert two.scheduler.host is not None and s2.num_recall_fallbacks_total == s1.num_recall_fallbacks_total == 0  # and recall


def test_tp2_matches_tp1_llama_every_policy(llama_pair):
    _compare_every_policy(*llama_pair, seed=11)


def test_tp2_matches_tp1_qwen2_every_policy(tiny_qwen2):
    """Qwen2: q/k/v bias, tied embeddings (the vocab-parallel embedding is the LM head)."""
    two = _engine(tiny_qwen2, 2)
    try:
        _compare_every_policy(_engine(tiny_qwen2, 1), two, seed=12)
    finally:
        two.shutdown()


@pytest.mark.parametrize("family", ["tiny_llama_mha", "tiny_mistral", "tiny_qwen3"])
def test_tp2_matches_tp1_other_families(family, request):
    """MHA (two KV heads per rank), Mistral, Qwen3 (RMSNorm on q and k per head)."""
    path = request.getfixturevalue(family)
    cases = [("full", False), ("snapkv", True), ("h2o", False), ("pyramid_tova", True)]
    prompts = random_prompts([75 + 11 * i for i in range(len(cases))], seed=21)
    reqs = [(f"{p}-{r}", prompt, _params(p, r, n=6)) for (p, r), prompt in zip(cases, prompts)]
    a = _run(_engine(path, 1), reqs)
    two = _engine(path, 2)
    try:
        _assert_same(a, _run(two, reqs))
    finally:
        two.shutdown()


def test_tp4_replicates_kv_heads(tiny_llama):
    """4 ranks over 2 KV heads: each KV head on two ranks; a rank projects its KV head's
    whole query group, so query-based eviction scores as with one rank."""
    cases = [("full", False), ("h2o", False), ("knorm", False), ("snapkv", True), ("tova", True), ("pyramid", True)]
    prompts = random_prompts([80 + 13 * i for i in range(len(cases))], seed=13)
    reqs = [(f"{p}-{r}", prompt, _params(p, r, n=6)) for (p, r), prompt in zip(cases, prompts)]
    one = _engine(tiny_llama, 1)
    a = _run(one, reqs)
    four = _engine(tiny_llama, 4)
    try:
        sh = four.runner.shard
        assert sh.replicated and four.cache.num_kv_heads == 1
        _assert_same(a, _run(four, reqs))
        assert four.stats().num_recall_fallbacks_total == one.stats().num_recall_fallbacks_total == 0
    finally:
        four.shutdown()


def test_abort_and_failed_step_keep_ranks_consistent(llama_pair):
    """Aborts between steps and a step that fails (on every rank: InjectedFault) leave every
    rank with the same state (checked after each step) and the survivors' tokens as with one rank."""
    results = []
    for engine in llama_pair:
        prompts = random_prompts([60, 75, 90, 50], seed=14)
        prompts = [[t for t in p if t != POISON] for p in prompts]
        prompts[3][10] = POISON
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, _params("snapkv" if i % 2 else "full", i == 1, n=10))
        outs, failures, steps = {}, 0, 0
        while engine.has_unfinished_requests():
            steps += 1
            if steps == 4:
                engine.abort_request("r2")
            try:
                for out in engine.step():
                    if out.finished:
                        outs[out.request_id] = out
            except Exception as exc:  # StepError naming the poisoned request's step
                failures += 1
                for rid in exc.request_ids:
                    engine.abort_request(rid)
        results.append((outs, failures))
    (a, fa), (b, fb) = results
    assert fa == fb >= 1
    assert a["r2"].finish_reason == "abort"
    assert a["r0"].token_ids == b["r0"].token_ids and a["r1"].token_ids == b["r1"].token_ids
    assert a["r2"].token_ids == b["r2"].token_ids


def test_preemption_keeps_ranks_consistent(tiny_llama):
    """A pool too small for every request's decode: the newest is preempted and recomputed,
    on every rank alike."""
    # and the host store sized by default (kv_recall: made at start-up): the same on every rank as in one process
    kw = dict(num_tokens=512, block_size=16, decode_reserve_tokens=0, chunk_size=64, host_kv_tokens=None, kv_recall=True)
    prompts = random_prompts([100, 110, 120, 90], seed=15)
    reqs = [(f"p{i}", p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)) for i, p in enumerate(prompts)]
    one = _engine(tiny_llama, 1, **kw)
    a = _run(one, reqs)
    two = _engine(tiny_llama, 2, **kw)
    try:
        b = _run(two, reqs)
        assert two.stats().num_preemptions_total == one.stats().num_preemptions_total > 0
        assert two.scheduler.host.capacity_tokens == one.scheduler.host.capacity_tokens
        _assert_same(a, b)
    finally:
        two.shutdown()


def _poisoned_steps_raise(engine, seed: int, within_s: float) -> None:
    """A request whose prompt holds ``POISON`` (the fault injection's token) is stepped until
    the engine raises ``TPError``, which must come within ``within_s`` (no hang)."""
    prompt = random_prompts([40], seed=seed)[0]
    prompt[5] = POISON
    engine.add_request("x", prompt, SamplingParams(max_tokens=4, temperature=0.0))
    t = time.monotonic()
    with pytest.raises(TPError):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - t < within_s


def test_dead_rank_raises_instead_of_hanging(tiny_llama):
    two = _engine(tiny_llama, 2, debug_fail_step_token=POISON, debug_exit_rank=1, tp_timeout_s=30)
    try:
        _poisoned_steps_raise(two, seed=16, within_s=40)
        with pytest.raises(TPError, match="rank 1 died"):
            two.step()  # and every later step says which rank is gone
    finally:
        two.shutdown()


def test_workers_exit_when_rank0_dies(tiny_llama, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from batchmax.engine import EngineConfig, LLMEngine
        if __name__ == "__main__":
            e = LLMEngine(EngineConfig.from_kwargs(model={str(tiny_llama)!r}, tensor_parallel_size=2, **{COMMON!r}))
            print(" ".join(str(p.pid) for p in e.tp_driver.procs), flush=True)
            time.sleep(600)
    """)
    path = tmp_path / "rank0.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
        proc.kill()  # no cleanup runs in rank 0
        proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, rank 0, is dead and init reaps it)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_dead_rank_fails_requests_in_the_engine_core(tiny_llama):
    """``batchmax serve``'s path: the core process (rank 0) loses rank 1 mid-step; the request
    in flight ends with finish_reason ``error`` naming the rank, and ``is_running`` turns False
    (``/health`` answers 503 on it)."""
    import asyncio

    from batchmax.engine.core_client import EngineCoreClient

    config = EngineConfig.from_kwargs(
        model=str(tiny_llama), tensor_parallel_size=2, debug_fail_step_token=POISON, debug_exit_rank=1, tp_timeout_s=30,
        **{k: v for k, v in COMMON.items() if k != "skip_tokenizer_init"},
    )
    core = EngineCoreClient(config)
    try:
        prompt = random_prompts([30], seed=17)[0]

        async def run():
            ok = None
            async for out in core.generate([t for t in prompt if t != POISON], SamplingParams(max_tokens=3, temperature=0.0), request_id="ok"):
                ok = out
            assert ok.finish_reason == "length" and core.is_running
            bad = prompt[:]
            bad[3] = POISON
            last = None
            async for out in core.generate(bad, SamplingParams(max_tokens=3, temperature=0.0), request_id="bad"):
                last = out
            return last

        last = asyncio.run(asyncio.wait_for(run(), 60))
        assert last.finish_reason == "error" and "rank 1" in last.error
        deadline = time.monotonic() + 20
        while core.is_running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not core.is_running
    finally:
        core.shutdown()


def test_cli_and_bench_take_the_flag(tiny_llama):
    """``batchmax serve --tensor-parallel-size`` and ``bench/throughput.py --tensor-parallel-size``
    reach the engine (the bench at TP=2 on a tiny model, as the GPU run will at scale)."""
    from batchmax.server.cli import build_parser as cli_parser
    from batchmax.server.cli import engine_kwargs
    from bench.throughput import build_parser, parse_config, run_batchmax

    args = cli_parser().parse_args(["serve", "--tensor-parallel-size", "2", "--tp-timeout", "30"])
    kw = engine_kwargs(args)
    assert kw["tensor_parallel_size"] == 2 and kw["tp_timeout_s"] == 30
    a = build_parser().parse_args(["--chunk", "32", "--tensor-parallel-size", "2", "--max-num-batched-tokens", "256"])
    r = run_batchmax(parse_config("snapkv@24"), random_prompts([60] * 3, seed=18), 6, a, model=str(tiny_llama))
    assert r["tensor_parallel_size"] == 2 and r["out_tokens"] == 18


def test_async_scheduling_structured_outputs_and_logits_processing(tiny_llama):
    """Async scheduling (the sampled ids broadcast, then taken on the device by the next step),
    a JSON-schema request (grammar masks on every rank), penalties and logit_bias, and a seeded
    sampled request: the same tokens as one process."""
    from batchmax.engine import StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    prompts = random_prompts([40, 55, 61, 47], seed=19)
    reqs = [
        ("json", prompts[0], SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=StructuredOutputsParams(json=schema))),
        ("pen", prompts[1], SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={5: 3.0})),
        ("seeded", prompts[2], SamplingParams(max_tokens=10, temperature=0.7, seed=3)),
        ("snap", prompts[3], _params("snapkv", False)),
    ]
    kw = dict(async_scheduling=True, skip_tokenizer_init=False)
    a = _run(_engine(tiny_llama, 1, **kw), reqs)
    two = _engine(tiny_llama, 2, **kw)
    try:
        assert two.async_scheduling
        b = _run(two, reqs)
    finally:
        two.shutdown()
    for rid in a:
        assert a[rid].token_ids == b[rid].token_ids, rid


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of ``pid`` (the TP workers, not its resource tracker)."""
    from pathlib import Path

    from tests.server.conftest import child_pids

    return [k for k in child_pids(pid) if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_server_rank_killed_mid_stream_fails_it_and_health(tiny_llama, tmp_path_factory):
    """``batchmax serve --tensor-parallel-size 2``: rank 1 killed while a request streams; the
    stream ends with an engine error naming the rank, /health turns 503, new requests get 503."""
    import json

    import httpx

    from tests.server.conftest import child_pids, start_server, stream_and_kill, wait_unhealthy

    srv = start_server(tiny_llama, tmp_path_factory, "--max-num-seqs", "4", "--tensor-parallel-size", "2", "--tp-timeout", "30",
                       "--kv-tokens", "4096")
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        (core_pid,) = child_pids(srv.proc.pid)
        (worker,) = _spawned_children(core_pid)  # rank 1; rank 0 is the engine core
        events = stream_and_kill(srv.url, worker, timeout=90)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])
        assert err["error"]["code"] == "engine_error" and "rank 1" in err["error"]["message"]
        wait_unhealthy(srv.url, 20, "a rank died")
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny_llama0", "prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 503
    finally:
        srv.stop()


def test_a_step_failing_on_one_rank_only_is_detected(tiny_llama):
    """Rank 1 fails a step that rank 0 runs: rank 0's collective times out (``tp_timeout_s``)
    and the engine raises ``TPError`` rather than hanging or going on with different states."""
    two = _engine(tiny_llama, 2, debug_fail_step_token=POISON, debug_raise_rank=1, tp_timeout_s=8)
    try:
        _poisoned_steps_raise(two, seed=22, within_s=30)
    finally:
        two.shutdown()

"""An engine failure inside one step (injected with ``--debug-fail-step-token``, see
``engine/faults.py``) fails exactly the requests of that step with an OpenAI 500 body,
frees their KV, and the engine goes on serving the others and the next ones."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from batchmax.engine import EngineConfig, LLMEngine, SamplingParams
from batchmax.engine.async_engine import AsyncEngine
from tests.reliability.conftest import assert_idle_and_serving, metric_delta
from tests.server.conftest import start_server

POISON = 7  # a prompt holding this token id makes its step fail


@pytest.fixture(scope="module")
def fault_server(tiny_llama, tmp_path_factory):
    """One request running at a time, so which requests share a step is known."""
    srv = start_server(tiny_llama, tmp_path_factory, "--max-num-seqs", "1", "--debug-fail-step-token", str(POISON))
    yield srv
    srv.stop()


def assert_engine_error(body: dict) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "engine_error", body
    assert "injected step failure" in body["error"]["message"], body


@pytest.mark.timeout(180)
def test_failed_step_answers_500_and_the_server_goes_on(fault_server):
    url = fault_server.url
    before = fault_server.metrics()
    # non-streaming: a 500 with OpenAI's error body
    r = httpx.post(url + "/v1/completions", json={"prompt": [100, POISON, 200], "max_tokens": 5}, timeout=60)
    assert r.status_code == 500, r.text
    assert_engine_error(r.json())
    # streaming: the 200 is already sent, so the stream ends with the error event and [DONE]
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": [POISON, 300], "max_tokens": 5, "stream": True}, timeout=60) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert_engine_error(json.loads(events[-2]))
    after = assert_idle_and_serving(fault_server)
    assert metric_delta(before, after, "batchmax:request_success_total{finished_reason=error}") == 2
    assert metric_delta(before, after, "batchmax:engine_step_failures_total") == 2


@pytest.mark.timeout(180)
def test_only_the_failing_steps_requests_fail(fault_server):
    """A runs; P (poisoned) and C wait behind it. A and C finish in full, P fails alone."""
    url = fault_server.url
    first, result = threading.Event(), {}

    def run_a():
        body = {"prompt": [100, 101, 102], "max_tokens": 600, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as s:
            lines = []
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    first.set()
                    lines.append(json.loads(line[6:]))
            result["a"] = lines

    t = threading.Thread(target=run_a, daemon=True)
    t.start()
    assert first.wait(60), "A never started"

    async def queued(n: int) -> None:
        """Wait until ``n`` requests queue behind A (still running); the sleeps let the posts go out."""
        for _ in range(1000):
            m = fault_server.metrics()
            assert m["batchmax:num_requests_running"] == 1, "A ended before the others queued: make it longer"
            if m["batchmax:num_requests_waiting"] == n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{n} requests never queued")

    async def p_and_c():
        async with httpx.AsyncClient(timeout=120) as c:
            p = asyncio.create_task(c.post(url + "/v1/completions", json={"prompt": [POISON, 5000, 6000], "max_tokens": 20}))
            await queued(1)  # P first
            cr = asyncio.create_task(c.post(url + "/v1/completions", json={"prompt": [5000, 6000, 7000], "max_tokens": 20, "ignore_eos": True}))
            await queued(2)
            return await p, await cr

    p, c = asyncio.run(p_and_c())
    t.join(120)
    assert p.status_code == 500, p.text
    assert_engine_error(p.json())
    assert c.status_code == 200, c.text
    assert c.json()["usage"]["completion_tokens"] == 20 and c.json()["choices"][0]["finish_reason"] == "length"
    a = result["a"]
    assert a[-1]["usage"]["completion_tokens"] == 600
    assert [ch["choices"][0]["finish_reason"] for ch in a[:-1] if ch["choices"][0]["finish_reason"]] == ["length"]
    assert_idle_and_serving(fault_server)


@pytest.mark.timeout(120)
def test_co_scheduled_requests_fail_and_waiting_ones_run(tiny_llama):
    """In process, two running at a time: A runs; P joins A's step and breaks it, so A and P
    fail; W, queued behind them (not in that step), runs in full, and KV ends at 0."""
    cfg = EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", max_num_seqs=2, debug_fail_step_token=POISON)
    ae = AsyncEngine(LLMEngine(cfg))
    try:
        async def main():
            a = await ae.add([("A", [100, 101, 102], SamplingParams(max_tokens=400, ignore_eos=True))])
            await a.next_batch()  # A is running
            p = await ae.add([("P", [POISON, 101], SamplingParams(max_tokens=400, ignore_eos=True)),
                              ("Q", [103, 104], SamplingParams(max_tokens=400, ignore_eos=True))])
            w = await ae.add([("W", [105, 106], SamplingParams(max_tokens=12, ignore_eos=True))])
            finals = {}
            for stream in (a, p, w):
                async for out in stream:
                    if out.finished:
                        finals[out.request_id] = out
            return finals

        finals = asyncio.run(main())
        assert {rid: o.finish_reason for rid, o in finals.items()} == {"A": "error", "P": "error", "Q": "length", "W": "length"}
        assert "InjectedFault" in finals["A"].error and "injected step failure" in finals["P"].error
        assert len(finals["W"].token_ids) == 12 and len(finals["Q"].token_ids) == 400
        st = ae.stats()
        assert (st.num_running, st.num_waiting, st.kv_usage, ae.num_unfinished) == (0, 0, 0.0, 0)
        assert st.num_step_failures_total == 1
    finally:
        ae.shutdown()


@pytest.mark.timeout(180)
def test_health_turns_503_after_steps_fail_in_a_row(fault_server):
    """Two failed steps in a row leave /health at 200 (one bad request must not get the
    server restarted); the third makes it 503 ``unhealthy``; one good step makes it 200 again."""
    url = fault_server.url
    for i in range(3):
        r = httpx.post(url + "/v1/completions", json={"prompt": [POISON, 100 + i], "max_tokens": 3}, timeout=60)
        assert r.status_code == 500, r.text
        h = httpx.get(url + "/health", timeout=10)
        if i < 2:
            assert h.status_code == 200 and h.json() == {"status": "ok"}, h.text
    assert h.status_code == 503, h.text
    assert h.json() == {"status": "unhealthy", "error": "the last 3 engine steps failed"}
    r = httpx.post(url + "/v1/completions", json={"prompt": [100, 101], "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    h = httpx.get(url + "/health", timeout=10)
    assert h.status_code == 200 and h.json() == {"status": "ok"}

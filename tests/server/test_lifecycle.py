"""Backpressure (queue full -> 503 + Retry-After) and SIGTERM drain (exit 0)."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import start_server

AUTH = {"Authorization": "Bearer sekrit"}


def first_tokens(r: httpx.Response, k: int = 1):
    """Read a stream until ``k`` chunks with text arrived. Returns the line iterator, which
    the caller must keep: closing it (even by garbage collection) makes httpx close the
    connection, which the server rightly treats as a disconnect."""
    got = 0
    lines = r.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
            got += 1
            if got == k:
                return lines
    raise AssertionError("stream ended early")


def test_full_queue_answers_503_with_retry_after(small_server):
    """--max-num-seqs 1 --max-queued 1: one runs, one waits, the third is refused."""
    url = small_server.url
    long = {"prompt": "hold the line", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=AUTH) as c:
        with c.stream("POST", url + "/v1/completions", json=long) as a:
            a_lines = first_tokens(a)  # noqa: F841 - keeps the stream open
            with c.stream("POST", url + "/v1/completions", json=long) as b:
                assert b.status_code == 200
                deadline = time.monotonic() + 10
                while small_server.metrics()["batchmax:num_requests_waiting"] != 1:
                    assert time.monotonic() < deadline, "second request never queued"
                    time.sleep(0.02)
                before = small_server.metrics()
                r = c.post(url + "/v1/completions", json={"prompt": "no room", "max_tokens": 2})
                assert r.status_code == 503
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
                chat = c.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
                assert chat.status_code == 503
                after = small_server.metrics()
                assert after["batchmax:num_requests_rejected_total{reason=queue_full}"] - before["batchmax:num_requests_rejected_total{reason=queue_full}"] == 2
                assert after["batchmax:num_requests_running"] == 1  # A was never disturbed
    # both clients left: everything is freed and requests are admitted again
    m = small_server.wait_idle(timeout=20)
    assert m["batchmax:num_requests_running"] == 0 and m["batchmax:kv_cache_usage_perc"] == 0
    r = httpx.post(url + "/v1/completions", json={"prompt": "room again", "max_tokens": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200


def _stream_in_thread(url: str, body: dict, first: threading.Event, result: dict) -> threading.Thread:
    def run():
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if line.startswith("data: {") and not first.is_set():
                        first.set()
                result["lines"] = lines
        except Exception as exc:  # reported by the test
            result["error"] = exc
            first.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_drains_then_exits_0(tiny_llama, tmp_path_factory):
    srv = start_server(tiny_llama, tmp_path_factory, "--shutdown-timeout", "60")
    try:
        body = {"prompt": "finish me", "max_tokens": 700, "temperature": 0, "ignore_eos": True, "stream": True}
        first, result = threading.Event(), {}
        t = _stream_in_thread(srv.url, body, first, result)
        assert first.wait(30)
        srv.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert "retry-after" in r.headers
        t.join(60)
        assert "error" not in result, result
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished in full, not cut
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_sigterm_timeout_aborts_in_flight_and_exits_0(tiny_llama, tmp_path_factory):
    srv = start_server(tiny_llama, tmp_path_factory, "--shutdown-timeout", "0.5")
    try:
        body = {"prompt": "too long to finish", "max_tokens": 1900, "ignore_eos": True, "stream": True}
        first, result = threading.Event(), {}
        t = _stream_in_thread(srv.url, body, first, result)
        assert first.wait(30)
        t0 = time.monotonic()
        srv.signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
        t.join(10)
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])
        assert err["error"]["code"] == "aborted"  # the stream says why it ended early
    finally:
        srv.stop()


@pytest.mark.slow
def test_serve_without_model_serves_the_default_model(default_model_path, tmp_path_factory):
    """``batchmax serve`` with no --model: SmolLM2-135M-Instruct, offline, with its chat template."""
    from tests.server.conftest import ServerProc

    srv = ServerProc(None, tmp_path_factory.mktemp("default") / "server.log", "--max-num-seqs", "4").wait_ready(300)
    try:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct"]
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        srv.stop()

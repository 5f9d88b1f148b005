"""SIGTERM under load: every request in flight (running or queued) finishes in full, new
ones get 503 with Retry-After, and the process exits 0."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.reliability.conftest import streams
from tests.server.conftest import start_server


@pytest.mark.parametrize(
    "clients, max_num_seqs, output_len",
    [
        pytest.param(32, 16, "64:128", id="32-clients"),
        pytest.param(200, 64, "64:256", id="200-clients", marks=pytest.mark.heavy),
    ],
)
@pytest.mark.timeout(600)
def test_sigterm_under_load_drains_and_exits_0(tiny_llama, tmp_path_factory, clients, max_num_seqs, output_len):
    srv = start_server(tiny_llama, tmp_path_factory, "--shutdown-timeout", "300", "--max-num-seqs", str(max_num_seqs))
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(zip(("workload", "run"), streams(srv, clients, "8:64", output_len))), daemon=True)
        t.start()
        # every client admitted (running or queued) and some tokens out before the signal
        deadline = time.monotonic() + 120
        while True:
            m = srv.metrics()
            if m["batchmax:num_requests_running"] + m["batchmax:num_requests_waiting"] == clients and m["batchmax:generation_tokens_total"] > 0:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.02)
        assert m["batchmax:num_requests_waiting"] > 0, "nothing queued: the test would not cover queued requests"
        srv.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "still healthy after SIGTERM"
            time.sleep(0.01)
        for path, body in (("/v1/completions", {"prompt": "late", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "late"}], "max_tokens": 2})):
            r = httpx.post(srv.url + path, json=body, timeout=10)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "server_shutting_down" and int(r.headers["retry-after"]) >= 1
        assert t.is_alive(), "the load finished before the 503 checks: make the outputs longer"
        t.join(500)
        workload, run = result["workload"], result["run"]
        failed = [r for r in run.results if not r.ok]
        assert not failed, f"{len(failed)} failed, first: {failed[0].error}"
        for req, res in zip(workload, run.results):
            assert (res.completion_tokens, res.finish_reason) == (req.max_tokens, "length"), res.index
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()

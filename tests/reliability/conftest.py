"""Reliability tests: a real ``batchmax serve`` (tiny random-weight Llama) under load, faults
and bad input. Each test is bounded in time (pytest-timeout) and in request count; the
``heavy`` variants (full-size loads) are deselected by default: ``pytest -m heavy tests/reliability``."""
from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from bench.load_client import LoadConfig, LoadRun, run_load
from bench.workload import LenDist, make_workload
from tests.server.conftest import ServerProc, start_server

VOCAB = 49152  # the tiny models borrow SmolLM2's tokenizer


@pytest.fixture(scope="session")
def load_server(tiny_llama, tmp_path_factory) -> ServerProc:
    """Default options: room for 256 running requests and 1024 queued."""
    srv = start_server(tiny_llama, tmp_path_factory)
    yield srv
    srv.stop()


def streams(srv: ServerProc, n: int, prompt_len: str, output_len: str, seed: int = 0, **cfg) -> tuple[list, LoadRun]:
    """``n`` concurrent streaming completions of token-id prompts (exact lengths); returns
    the workload and the run."""
    workload = make_workload(n, LenDist.parse(prompt_len), LenDist.parse(output_len), seed=seed, vocab_size=VOCAB)
    run = asyncio.run(run_load(LoadConfig(url=srv.url, concurrency=n, progress=False, timeout=300, **cfg), workload))
    return workload, run


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def assert_idle_and_serving(srv: ServerProc, timeout: float = 60.0) -> dict[str, float]:
    """Nothing runs, waits or holds KV, and a new request succeeds. Returns the metrics read
    once idle, before that request."""
    m = srv.wait_idle(timeout=timeout)
    assert m["batchmax:num_requests_running"] == 0, m
    assert m["batchmax:num_requests_waiting"] == 0, m
    assert m["batchmax:kv_cache_usage_perc"] == 0, m
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "still alive?", "max_tokens": 3, "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    return m


def resources(srv: ServerProc) -> tuple[int, int]:
    """Open file descriptors and threads of the server process (Linux ``/proc``)."""
    pid = srv.proc.pid
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def assert_no_leak(srv: ServerProc, before: tuple[int, int], timeout: float = 30.0) -> None:
    """Sockets closed and no thread per request: back to (about) ``before``. The slack covers
    asyncio's default executor, which starts its few threads lazily."""
    deadline = time.monotonic() + timeout
    while True:
        fds, threads = resources(srv)
        if fds <= before[0] + 4 and threads <= before[1] + 8:
            return
        assert time.monotonic() < deadline, f"fds {before[0]} -> {fds}, threads {before[1]} -> {threads}"
        time.sleep(0.1)

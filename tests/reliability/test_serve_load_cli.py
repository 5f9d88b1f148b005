"""The load generator, ``python -m bench.serve_load``, end to end: against the running server and,
with ``--compare-offline``, the offline engine on the same workload."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.reliability.conftest import VOCAB
from tests.server.conftest import REPO, free_port


def bench_serve(*args: str) -> subprocess.CompletedProcess:
    # PASSIVE: see bench/results/reliability-2026-11-25.md (OpenMP spin-waiting on a shared CPU)
    # run from the checkout's root, where ``bench`` is importable (it is not installed)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "bench.serve_load", "--no-progress", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_bench_serve_against_server_and_offline(load_server, tiny_llama, tmp_path):
    out = tmp_path / "serve.jsonl"
    p = bench_serve("--url", load_server.url + "/v1", "--num-requests", "12", "--concurrency", "6", "--prompt-len", "8:24",
                    "--output-len", "4:8", "--vocab-size", str(VOCAB), "--compare-offline", "--model", str(tiny_llama),
                    "--engine-args", '{"device": "cpu"}', "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    for row in ("server (6 clients)", "offline engine", "request/s", "output tok/s", "TTFT p99 (ms)", "ITL p90 (ms)", "E2E p50 (ms)"):
        assert row in p.stdout, p.stdout
    server, offline = json.loads(out.read_text())["summaries"]
    assert (server["completed"], server["failed"], offline["completed"]) == (12, 0, 12)
    # the same workload: the same token totals on both sides
    assert (server["prompt_tokens"], server["completion_tokens"]) == (offline["prompt_tokens"], offline["completion_tokens"])
    assert server["output_tok_per_s"] > 0 and server["ms"]["ttft"]["p50"] > 0


@pytest.mark.timeout(120)
def test_bench_serve_exits_1_when_requests_fail():
    p = bench_serve("--url", f"http://127.0.0.1:{free_port()}", "--served-model", "x", "--num-requests", "3", "--concurrency", "3")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "request 0 failed: ConnectError" in p.stderr, p.stderr
    assert re.search(r"^failed\s+3$", p.stdout, re.MULTILINE), p.stdout

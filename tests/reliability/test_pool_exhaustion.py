"""A KV pool far too small for the load: every request still completes (queued for
admission, or preempted and recomputed), and greedy outputs are exactly those of the same
requests run one at a time on an idle server."""
from __future__ import annotations

import httpx
import pytest

from bench.workload import LenDist, make_workload
from tests.reliability.conftest import VOCAB, assert_idle_and_serving, metric_delta, streams
from tests.server.conftest import start_server

POOL_TOKENS = 128  # per layer: about two requests' worth


@pytest.fixture(scope="module")
def tight_server(tiny_llama, tmp_path_factory):
    """Optimistic admission (4 decode tokens reserved per request) into a 128-token pool, so
    requests are both queued and preempted."""
    srv = start_server(tiny_llama, tmp_path_factory, "--kv-tokens", str(POOL_TOKENS), "--decode-reserve-tokens", "4", "--max-num-seqs", "16")
    yield srv
    srv.stop()


@pytest.mark.parametrize("clients", [pytest.param(24, id="24"), pytest.param(128, id="128", marks=pytest.mark.heavy)])
@pytest.mark.timeout(900)
def test_tiny_pool_completes_everything_with_unloaded_outputs(tight_server, clients):
    prompt_len, output_len = "24:40", "24:40"  # at most 80 tokens: one request alone always fits
    workload = make_workload(clients, LenDist.parse(prompt_len), LenDist.parse(output_len), seed=7, vocab_size=VOCAB)
    assert all(r.prompt_len + r.max_tokens <= POOL_TOKENS for r in workload)
    # unloaded: one at a time
    alone = []
    with httpx.Client(timeout=120) as c:
        for req in workload:
            r = c.post(tight_server.url + "/v1/completions", json={"prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            alone.append(r.json()["choices"][0]["text"])
    before = tight_server.metrics()
    assert before["batchmax:num_preemptions_total"] == 0  # alone, every request fits
    # loaded: all at once
    _, run = streams(tight_server, clients, prompt_len, output_len, seed=7)
    failed = [r for r in run.results if not r.ok]
    assert not failed, failed[0].error
    for req, res, text in zip(workload, run.results, alone):
        assert res.completion_tokens == req.max_tokens and res.finish_reason == "length"
        assert res.text == text, f"request {res.index}: loaded output differs from the unloaded one"
    after = assert_idle_and_serving(tight_server)
    assert metric_delta(before, after, "batchmax:num_preemptions_total") > 0, "the pool never ran out: the test proves nothing"
    assert metric_delta(before, after, "batchmax:request_success_total{finished_reason=length}") == clients

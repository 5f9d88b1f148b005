"""500 concurrent streaming clients: every one completes, with exact ``usage``, and the
server's own counters agree with what the clients were told; afterwards it holds no more
sockets or threads than before."""
from __future__ import annotations

import pytest

from tests.reliability.conftest import assert_idle_and_serving, assert_no_leak, metric_delta, resources, streams


@pytest.mark.parametrize(
    "clients, prompt_len, output_len",
    [
        pytest.param(500, "8:32", "4:12", id="500-short"),
        pytest.param(500, "32:256", "32:128", id="500-long", marks=pytest.mark.heavy),
    ],
)
@pytest.mark.timeout(600)
def test_concurrent_streams_complete_with_exact_usage(load_server, clients, prompt_len, output_len):
    before = load_server.metrics()
    held = resources(load_server)
    workload, run = streams(load_server, clients, prompt_len, output_len, seed=clients)
    failed = [r for r in run.results if not r.ok]
    assert not failed, f"{len(failed)} failed, first: {failed[0].error}"
    for req, res in zip(workload, run.results):
        # ignore_eos: exactly max_tokens each; token-id prompts: exactly their length
        assert (res.prompt_tokens, res.completion_tokens, res.finish_reason) == (req.prompt_len, req.max_tokens, "length"), res.index
        assert res.ttft is not None and res.text
    after = assert_idle_and_serving(load_server)
    assert_no_leak(load_server, held)
    # the engine's counters saw the same totals (``after`` is read before the probe request)
    assert metric_delta(before, after, "batchmax:generation_tokens_total") == sum(r.max_tokens for r in workload)
    assert metric_delta(before, after, "batchmax:prompt_tokens_total") == sum(r.prompt_len for r in workload)
    assert metric_delta(before, after, "batchmax:request_success_total{finished_reason=length}") == clients
    assert metric_delta(before, after, "batchmax:request_success_total{finished_reason=error}") == 0
    assert metric_delta(before, after, "batchmax:num_requests_rejected_total{reason=queue_full}") == 0

"""Disconnect storms: 200 clients hang up mid-generation (streaming after a few chunks, and
non-streaming ones by timing out); the server aborts every one, frees all KV, keeps its
counters straight, leaks no socket or thread, and serves the next request."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.reliability.conftest import assert_idle_and_serving, assert_no_leak, metric_delta, resources, streams

LONG = "1500"  # tokens each would generate if nobody hung up


async def _hang_up_unary(url: str, n: int, after_s: float) -> int:
    """``n`` non-streaming completions whose clients give up after ``after_s`` seconds."""
    async def one(i: int) -> bool:
        body = {"prompt": [100 + i, 200, 300, 400], "max_tokens": int(LONG), "ignore_eos": True}
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(after_s, connect=30)) as c:
                await c.post(url + "/v1/completions", json=body)
        except httpx.ReadTimeout:
            return True  # leaving the client closes the connection: the hang-up
        return False

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize(
    "streaming, unary, waves",
    [
        pytest.param(200, 20, 1, id="200-streams"),
        pytest.param(200, 50, 3, id="3x200-streams", marks=pytest.mark.heavy),
    ],
)
@pytest.mark.timeout(600)
def test_disconnect_storm_frees_everything(load_server, streaming, unary, waves):
    before = load_server.metrics()
    held = resources(load_server)
    for wave in range(waves):
        _, run = streams(load_server, streaming, "16:64", LONG, seed=wave, disconnect_after_chunks=2)
        errors = [r.error for r in run.results if not r.ok]
        assert not errors, errors[:3]
        assert all(r.disconnected for r in run.results)
        hung_up = asyncio.run(_hang_up_unary(load_server.url, unary, after_s=1.5))
        assert hung_up == unary
    after = assert_idle_and_serving(load_server)
    assert_no_leak(load_server, held)
    clients = waves * (streaming + unary)
    assert metric_delta(before, after, "batchmax:request_success_total{finished_reason=abort}") == clients
    assert metric_delta(before, after, "batchmax:request_success_total{finished_reason=length}") == 0
    # aborted mid-generation: far fewer tokens than the clients asked for
    assert metric_delta(before, after, "batchmax:generation_tokens_total") < clients * int(LONG) / 4

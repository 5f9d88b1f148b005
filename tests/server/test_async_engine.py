"""AsyncEngine: the background thread, streams, cancellation, validation, failures."""
from __future__ import annotations

import asyncio
import time

import pytest

from batchmax.engine import EngineConfig, LLMEngine, SamplingParams
from batchmax.engine.async_engine import AsyncEngine, EngineDeadError
from tests.server.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def llm_engine(tiny_llama):
    return LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", max_num_seqs=8))


@pytest.fixture
def aengine(llm_engine):
    ae = AsyncEngine(llm_engine)
    yield ae
    ae.shutdown()


@pytest.fixture
def fake(tiny_llama):
    from transformers import AutoTokenizer

    return FakeEngine(AutoTokenizer.from_pretrained(tiny_llama))


async def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_generate_streams_cumulative_outputs(aengine):
    async def main():
        outs = [o async for o in aengine.generate("hello there", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 6
    assert all(not o.finished for o in outs[:-1])
    lens = [len(o.token_ids) for o in outs]
    assert lens == sorted(lens)
    assert aengine.num_unfinished == 0


def test_concurrent_requests_match_solo_runs(aengine):
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True) for s in range(6)]

    async def one(i):
        last = None
        async for o in aengine.generate([10 + i, 20, 30], params[i]):
            last = o
        return last.token_ids

    async def main():
        together = await asyncio.gather(*(one(i) for i in range(6)))
        alone = [await one(i) for i in range(6)]
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone


def test_validation_error_before_any_output(aengine):
    async def main():
        gen = aengine.generate([5] * 3000, SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match="context length"):
            await gen.__anext__()
        with pytest.raises(ValueError):
            await aengine.add([("dup", [1, 2], SamplingParams(max_tokens=2)), ("ok", [1, 2], SamplingParams(max_tokens=3000))])

    asyncio.run(main())
    assert aengine.num_unfinished == 0
    assert aengine.stats().num_waiting == 0 and aengine.stats().num_running == 0


def test_cancelling_the_consumer_frees_kv(aengine):
    async def main():
        async def consume():
            async for _ in aengine.generate("long one", SamplingParams(max_tokens=1500, ignore_eos=True)):
                pass

        task = asyncio.create_task(consume())
        await wait_until(lambda: aengine.stats().kv_usage > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: aengine.num_unfinished == 0)
        await wait_until(lambda: aengine.stats().kv_usage == 0 and aengine.stats().num_running == 0)
        # breaking out and closing the generator does the same
        gen = aengine.generate("another", SamplingParams(max_tokens=1500, ignore_eos=True))
        async for o in gen:
            if len(o.token_ids) >= 2:
                break
        await gen.aclose()
        await wait_until(lambda: aengine.num_unfinished == 0 and aengine.stats().kv_usage == 0)

    asyncio.run(main())
    assert aengine.stats().generation_tokens_total < 1500


def test_abort_ends_the_stream_with_abort(aengine):
    async def main():
        stream = await aengine.add([("victim", "abort me", SamplingParams(max_tokens=1500, ignore_eos=True))])
        first = await stream.__anext__()
        assert not first.finished
        aengine.abort("victim")
        outs = [o async for o in stream]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and last.finish_reason == "abort"
    assert aengine.stats().kv_usage == 0


def test_step_failure_fails_requests_in_flight_only(fake):
    ae = AsyncEngine(fake)
    try:
        async def main():
            stream = await ae.add([("a", "x", SamplingParams(max_tokens=400)), ("b", "y", SamplingParams(max_tokens=400))])
            await stream.next_batch()
            fake.fail_steps = 1
            finals = {}
            async for o in stream:
                if o.finished:
                    finals[o.request_id] = o
            # the loop survived: a new request runs to completion
            ok = [o async for o in ae.generate("z", SamplingParams(max_tokens=3))]
            return finals, ok[-1]

        finals, ok = asyncio.run(main())
        assert {r: o.finish_reason for r, o in finals.items()} == {"a": "error", "b": "error"}
        assert "simulated device failure" in finals["a"].error
        assert ok.finish_reason == "length" and len(ok.token_ids) == 3
        assert ae.num_unfinished == 0 and not fake.running
    finally:
        ae.shutdown()


def test_shutdown_aborts_in_flight_and_refuses_new(fake):
    ae = AsyncEngine(fake)

    async def main():
        stream = await ae.add([("s", "x", SamplingParams(max_tokens=400))])
        await stream.next_batch()
        await asyncio.to_thread(ae.shutdown)
        last = [o async for o in stream][-1]
        with pytest.raises(EngineDeadError):
            await ae.add([("t", "x", SamplingParams(max_tokens=2))])
        return last

    assert asyncio.run(main()).finish_reason == "abort"

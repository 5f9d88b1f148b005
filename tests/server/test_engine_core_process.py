"""The engine core in its own process (``EngineCoreClient``, what ``batchmax serve`` runs):
its outputs rebuilt from per-step deltas equal the in-process engine's, stop strings found in
the front end end the request there, and a core that dies fails the requests in flight and
turns ``/health`` to 503 instead of leaving the server answering 200."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest

from batchmax import LLM
from batchmax.engine import EngineConfig, SamplingParams
from batchmax.engine.async_engine import EngineDeadError
from batchmax.engine.core_client import EngineCoreClient
from tests.helpers import stream_all
from tests.server.conftest import child_pids, start_server, stream_and_kill, wait_unhealthy


@pytest.fixture(scope="module")
def core(tiny_llama):
    c = EngineCoreClient(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", max_num_seqs=8, num_tokens=4096))
    yield c
    c.shutdown()


def _fields(out):
    lp = [(e.token_id, round(e.logprob, 4), [a for a, _ in e.top]) for e in out.logprobs]
    plp = [None if e is None else (e.token_id, round(e.logprob, 4)) for e in out.prompt_logprobs]
    return out.token_ids, out.text, out.finish_reason, out.stop_reason, lp, plp


def test_deltas_rebuild_the_in_process_outputs(core, tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", max_num_seqs=8, num_tokens=4096)
    free = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    needle = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    prompts = ["the quick brown fox", [5, 6, 7, 8, 9, 10], "hello", "the quick brown fox"]
    params = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0, logprobs=3, prompt_logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[needle]),  # found by the front end
    ]
    ref = llm.generate(prompts, params)

    got = stream_all(core, prompts, params, "d")
    for i, (a, b) in enumerate(zip(ref, got)):
        assert _fields(a) == _fields(b), f"request {i}"
    assert got[3].finish_reason == "stop" and got[3].stop_reason == needle and needle not in got[3].text
    assert core.num_unfinished == 0


def test_a_rejected_add_raises_and_leaves_nothing(core):
    async def run():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await core.add([("ok", [1, 2, 3], SamplingParams(max_tokens=2)), ("bad", [10**9], SamplingParams(max_tokens=2))])
        return core.num_unfinished

    assert asyncio.run(run()) == 0


@pytest.mark.timeout(300)
def test_a_dead_core_fails_inflight_requests_and_health(tiny_llama, tmp_path_factory):
    srv = start_server(tiny_llama, tmp_path_factory, "--max-num-seqs", "4")
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        (core_pid,) = child_pids(srv.proc.pid)
        events = stream_and_kill(srv.url, core_pid, timeout=60)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])
        assert err["error"]["code"] == "engine_error" and "engine core process died" in err["error"]["message"]
        wait_unhealthy(srv.url, 10, "the core died")
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "engine stopped"
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny_llama0", "prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] in ("engine_unavailable", "model_loading")
    finally:
        srv.stop()


def test_dead_core_refuses_new_requests(tiny_llama):
    c = EngineCoreClient(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", max_num_seqs=2, num_tokens=2048))
    try:
        os.kill(c._proc.pid, signal.SIGKILL)
        c._proc.wait(10)
        assert not c.is_running

        async def run():
            with pytest.raises(EngineDeadError):
                await c.add([("x", [1, 2], SamplingParams(max_tokens=2))])

        asyncio.run(run())
    finally:
        c.shutdown()


def test_shutdown_never_waits_on_a_core_that_stopped_reading(tiny_llama):
    """A core that reported a fatal error closes its socket before it exits; a front end
    shutting down in that window must not block on the StopMsg (the PUSH socket has no
    peer left, where a blocking send waits forever)."""
    import threading

    c = EngineCoreClient(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", max_num_seqs=2, num_tokens=2048))
    proc = c._proc
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)

    class StillThere:  # the window: the socket is gone but the process has not been reaped
        pid = proc.pid
        returncode = None

        def poll(self):
            return None

        def wait(self, timeout=None):
            return proc.wait(timeout)

        def kill(self):
            pass

    c._proc = StillThere()
    done = threading.Event()
    t = threading.Thread(target=lambda: (c.shutdown(timeout=1), done.set()), daemon=True)
    t.start()
    assert done.wait(20), "shutdown blocked on the StopMsg"


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (an orphan re-parented to a PID 1 that does not wait)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_core_whose_front_end_died_mid_request_exits(tiny_llama):
    """The front end dies (no StopMsg, no socket closed politely) while a long request is
    generating. The core must notice and exit instead of running on unwatched, or blocking
    forever in a send once the dead front end's queue is full, holding the device."""
    import subprocess
    import sys
    import time

    script = f"""
import asyncio, os
from batchmax.engine import EngineConfig, SamplingParams
from batchmax.engine.core_client import EngineCoreClient
c = EngineCoreClient(EngineConfig.from_kwargs(model={str(tiny_llama)!r}, device="cpu", max_num_seqs=2, num_tokens=4096))
print(c._proc.pid, flush=True)
async def run():
    n = 0
    async for out in c.generate([5, 6, 7], SamplingParams(max_tokens=1900, temperature=0.0, ignore_eos=True), request_id="x"):
        n += 1
        if n == 3:
            os._exit(0)
asyncio.run(run())
"""
    # only the first line is read: the core inherits the pipe and, alive, would hold it open
    front = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        pid = int(front.stdout.readline())
        assert front.wait(120) == 0
    finally:
        front.stdout.close()
        if front.poll() is None:
            front.kill()
    deadline = time.monotonic() + 30
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not _exited(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the orphaned engine core was still running 30 s after its front end died")

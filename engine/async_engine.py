"""``AsyncEngine``: the synchronous ``LLMEngine`` driven by an ``EngineLoop`` in one
background thread of this process.

The thread owns the engine (and so the model and the GPU): nothing else calls into it. The
asyncio side talks to it through a thread-safe command queue (add, abort, stop); outputs go
back to per-request streams through ``loop.call_soon_threadsafe`` (one call per step, whatever
the batch size). ``batchmax serve`` runs the engine in a process of its own instead
(``core_client.py``), with the same interface; this in-thread form serves the offline tools,
tests and apps that embed an engine.

Cancellation is the disconnect path: when the consumer of a stream stops (closes it, or its
task is cancelled), the stream's unfinished requests are aborted in the engine, which frees
their KV before its next step. Failures are the loop's (``engine_loop.py``).

Nothing here knows about HTTP.
"""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from batchmax.engine.engine_loop import STOP, AbortCommand, AddCommand, EngineLoop, LoopEntry, LoopState, Prompt
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.sampling import SamplingParams
from batchmax.engine.stats import EngineStats


class EngineDeadError(RuntimeError):
    """The engine is not running (shut down, or crashed)."""


class OutputStream:
    """Outputs of a group of engine requests (the ``n`` choices of one API call), read by one
    asyncio task. Iterating yields ``RequestOutput``s until every request has finished.

    Outputs are cumulative, so when the reader falls behind only the newest output of each
    request matters: ``next_batch`` coalesces, and a slow client never piles up a backlog."""

    def __init__(self, owner, request_ids: Sequence[str], loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner  # anything with ``abort(request_ids)``
        self.loop = loop
        """The event loop of the reader, where outputs are delivered."""
        self.request_ids = list(request_ids)
        # Coalesced on put: outputs are cumulative, so only the newest of each request is
        # kept however slowly the reader reads, and memory stays one output per request.
        self._latest: dict[str, tuple[RequestOutput, float]] = {}
        self._ready = asyncio.Event()
        self._unfinished = set(self.request_ids)
        self._buffer: list[RequestOutput] = []
        self._closed = False

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def next_batch(self) -> list[tuple[RequestOutput, float]]:
        """The newest output of each request that has news, with the monotonic time of the
        step that produced it; waits for at least one. Raises StopAsyncIteration when all
        requests have finished."""
        if not self._unfinished:
            raise StopAsyncIteration
        while not self._latest:
            self._ready.clear()
            await self._ready.wait()
        latest, self._latest = self._latest, {}
        for rid, (out, _) in latest.items():
            if out.finished:
                self._unfinished.discard(rid)
        return list(latest.values())

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._buffer:
            self._buffer = [out for out, _ in await self.next_batch()]
        return self._buffer.pop(0)

    def close(self) -> None:
        """Abort the requests that have not finished (the reader is gone). Idempotent."""
        if not self._closed and self._unfinished:
            self._owner.abort(sorted(self._unfinished))
        self._closed = True

    def put(self, rid: str, out: RequestOutput, t: float) -> None:
        """Called in the reader's event loop. A request's output after its final one is dropped."""
        if rid in self._unfinished:
            self._latest[rid] = (out, t)
            self._ready.set()


class StreamingEngine:
    """What the server's two engine handles share (``AsyncEngine`` here, ``EngineCoreClient``
    across processes): ``generate`` over ``add``, and aborts by request id. Subclasses give
    ``add`` and ``_abort``."""

    async def add(self, requests: Sequence[tuple[str, Prompt, SamplingParams]]) -> OutputStream:
        raise NotImplementedError

    def _abort(self, request_ids: list[str] | None) -> None:
        """Queue the abort of these requests (None: every request)."""
        raise NotImplementedError

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. A rejected request raises ``ValueError`` on the
        first iteration, before any output. Stopping early (``aclose()``, ``break`` followed
        by finalization, or cancellation) aborts the request and frees its KV."""
        stream = await self.add([(request_id or uuid.uuid4().hex, prompt, params)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str | Sequence[str]) -> None:
        """Abort requests (their streams end with finish_reason ``abort``). Thread-safe."""
        self._abort([request_id] if isinstance(request_id, str) else list(request_id))

    def abort_all(self) -> None:
        self._abort(None)


class AsyncEngine(StreamingEngine):
    """Runs ``engine`` (an ``LLMEngine``) in a background thread; see the module docstring.

    ``on_step(stats)`` is called in the engine thread after every step (the metrics use it
    for per-step histograms); it must be quick and thread-safe."""

    def __init__(self, engine, on_step: Callable[[EngineStats], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._transport = _ThreadTransport()
        self._loop = EngineLoop(engine, self._transport, on_step=lambda st: self.on_step and self.on_step(st))
        self._lock = threading.Lock()
        self._num_unfinished = 0  # guarded by _lock: requests submitted and not yet reported finished
        self._transport.on_finished = self._finished
        self._stopped = False
        self._thread = threading.Thread(target=self._loop.run, name="batchmax-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- pass-through
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def config(self):
        return self.engine.config

    # ----------------------------------------------------------------- API (asyncio side)
    async def add(self, requests: Sequence[tuple[str, Prompt, SamplingParams]]) -> OutputStream:
        """Add requests together; returns their stream once the engine has accepted all of
        them. Raises the engine's ``ValueError`` (a client error: nothing was added, nothing
        streamed) if any is rejected, ``EngineDeadError`` if the engine thread is gone."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = OutputStream(self, [rid for rid, _, _ in requests], loop)
        accepted = loop.create_future()
        with self._lock:
            self._num_unfinished += len(requests)
        self._transport.send(AddCommand(list(requests), _Caller(stream, accepted)))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.close()  # commands run in order: this abort follows the add
            raise
        except BaseException:
            with self._lock:
                self._num_unfinished -= len(requests)
            raise
        return stream

    def _abort(self, request_ids: list[str] | None) -> None:
        self._transport.send(AbortCommand(request_ids))

    def stats(self) -> EngineStats:
        """The engine's stats as of its last step or command (a copy; exact between steps)."""
        return dataclasses.replace(self._loop.state.stats)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted whose final output has not been delivered yet."""
        with self._lock:
            return self._num_unfinished

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not running (queued for admission), approximately."""
        return max(0, self.num_unfinished - self._loop.state.stats.num_running)

    @property
    def consecutive_step_failures(self) -> int:
        """Engine steps that failed since the last one that succeeded."""
        return self._loop.state.consecutive_step_failures

    @property
    def is_running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still in flight end with finish_reason ``abort``."""
        if self._stopped:
            return
        self._stopped = True
        self._transport.send(STOP)
        self._thread.join(timeout)

    def _finished(self, n: int) -> None:
        with self._lock:
            self._num_unfinished -= n


class _Caller:
    """Who added a batch: its stream, and the future that says whether it was accepted."""

    def __init__(self, stream: OutputStream, accepted: asyncio.Future) -> None:
        self.stream = stream
        self.accepted = accepted


class _ThreadTransport:
    """``EngineLoop``'s transport inside this process: a command queue in, asyncio streams out."""

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.on_finished: Callable[[int], None] = lambda n: None

    def send(self, cmd) -> None:
        self._commands.put(cmd)

    def take(self, block: bool, timeout: float | None) -> list:
        cmds = []
        if block:
            try:
                cmds.append(self._commands.get(timeout=timeout))
            except queue.Empty:
                return cmds
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def accepted(self, cmd: AddCommand, error: BaseException | None, state: LoopState) -> None:
        _resolve(cmd.tag.stream.loop, cmd.tag.accepted, error)

    def deliver(self, outputs: Sequence[tuple[LoopEntry, RequestOutput]], t: float, state: LoopState) -> None:
        """One ``call_soon_threadsafe`` per event loop."""
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        finished = 0
        for entry, out in outputs:
            finished += out.finished
            stream = entry.tag.stream
            per_loop.setdefault(stream.loop, []).append((stream, entry.request_id, out, t))
        if finished:
            self.on_finished(finished)
        for loop, batch in per_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, error: BaseException | None) -> None:
    def set_it() -> None:
        if fut.done():  # the caller was cancelled meanwhile
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    try:
        loop.call_soon_threadsafe(set_it)
    except RuntimeError:
        pass


def _deliver(batch: list[tuple[OutputStream, str, RequestOutput, float]]) -> None:
    for stream, rid, out, t in batch:
        stream.put(rid, out, t)

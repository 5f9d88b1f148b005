"""``AsyncEngine``: the synchronous ``LLMEngine`` driven by one background thread.

The thread owns the engine (and so the model and the GPU): nothing else calls into it. The
asyncio side talks to it through a thread-safe command queue (add, abort, stop); the thread
applies pending commands, runs ``step()`` while there is work and otherwise blocks on the
queue, so an idle server burns no CPU. Outputs go back to per-request asyncio queues through
``loop.call_soon_threadsafe`` (one call per step, whatever the batch size).

Cancellation is the disconnect path: when the consumer of a stream stops (closes it, or its
task is cancelled), the stream's unfinished requests are aborted in the engine, which frees
their KV before its next step.

Failures: a step that raises ``StepError`` (``engine/faults.py``) ends the requests it was
running with finish_reason ``error`` and frees their KV; the thread keeps stepping for the
others and for new requests.

Nothing here knows about HTTP.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from batchmax.engine.faults import StepError
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.sampling import SamplingParams
from batchmax.engine.stats import EngineStats

logger = logging.getLogger("batchmax.engine")

Prompt = str | list[int]


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or crashed)."""


@dataclass
class _Add:
    stream: "OutputStream"
    requests: list[tuple[str, Prompt, SamplingParams]]
    accepted: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_ids: list[str] | None  # None: every request
    reason: str = "abort"


_STOP = object()


@dataclass
class _Entry:
    """The loop thread's record of a request it still has to report on."""

    stream: "OutputStream"
    prompt: Prompt
    arrival_time: float
    last: RequestOutput | None = None


class OutputStream:
    """Outputs of a group of engine requests (the ``n`` choices of one API call), read by one
    asyncio task. Iterating yields ``RequestOutput``s until every request has finished.

    Outputs are cumulative, so when the reader falls behind only the newest output of each
    request matters: ``next_batch`` coalesces, and a slow client never piles up a backlog."""

    def __init__(self, owner: "AsyncEngine", request_ids: Sequence[str], loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self.loop = loop
        """The event loop of the reader, where outputs are delivered."""
        self.request_ids = list(request_ids)
        self._queue: asyncio.Queue[tuple[str, RequestOutput, float]] = asyncio.Queue()
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
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[str, tuple[RequestOutput, float]] = {}
        for rid, out, t in items:
            if rid in self._unfinished:
                latest[rid] = (out, t)
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
        self._queue.put_nowait((rid, out, t))


class AsyncEngine:
    """Runs ``engine`` (an ``LLMEngine``) in a background thread; see the module docstring.

    ``on_step(stats)`` is called in the engine thread after every step (the metrics use it
    for per-step histograms); it must be quick and thread-safe."""

    def __init__(self, engine, on_step: Callable[[EngineStats], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._entries: dict[str, _Entry] = {}  # engine thread only
        self._lock = threading.Lock()
        self._num_unfinished = 0  # guarded by _lock: requests submitted and not yet reported finished
        self._step_failures = 0  # engine thread only; the engine itself never sees its failed steps end
        self._failures_in_a_row = 0  # written by the engine thread, read by /health
        self._stats = self._read_stats()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="batchmax-engine", daemon=True)
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
        if self._stopped or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = OutputStream(self, [rid for rid, _, _ in requests], loop)
        accepted = loop.create_future()
        with self._lock:
            self._num_unfinished += len(requests)
        self._send(_Add(stream, list(requests), accepted, loop))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.close()  # commands run in order: this abort follows the add
            raise
        return stream

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
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._send(_Abort(ids))

    def abort_all(self) -> None:
        self._send(_Abort(None))

    def stats(self) -> EngineStats:
        """The engine's stats as of its last step or command (a copy; exact between steps)."""
        return dataclasses.replace(self._stats)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted whose final output has not been delivered yet."""
        with self._lock:
            return self._num_unfinished

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not running (queued for admission), approximately."""
        return max(0, self.num_unfinished - self._stats.num_running)

    @property
    def consecutive_step_failures(self) -> int:
        """Engine steps that failed since the last one that succeeded."""
        return self._failures_in_a_row

    @property
    def is_running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still in flight end with finish_reason ``abort``."""
        if self._stopped:
            return
        self._stopped = True
        self._commands.put(_STOP)
        self._thread.join(timeout)

    def _send(self, cmd) -> None:
        self._commands.put(cmd)

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        state = {"last_step_failed": False}
        while True:
            try:
                if not self._iteration(state):
                    return
            except Exception:  # a bug here must not leave every request hanging
                logger.exception("engine loop failed; failing %d request(s)", len(self._entries))
                self._finish_all("error", "internal engine loop error")

    def _iteration(self, state: dict) -> bool:
        """Apply pending commands, then run one step if there is work. False: stop."""
        has_work = self._engine_has_work()
        state["last_step_failed"] = state["last_step_failed"] and has_work
        if state["last_step_failed"] and not self._entries:
            # a failing engine with nobody waiting: do not spin on step(); retry slowly
            cmds = self._take_commands(block=True, timeout=0.5)
        else:
            cmds = self._take_commands(block=not has_work and not self._entries)
        for cmd in cmds:
            if cmd is _STOP:
                self._finish_all("abort", None)
                return False
            self._apply(cmd)
        if cmds:
            self._stats = self._read_stats()
        if not self._engine_has_work():
            if self._entries:  # the engine holds none of them: they can never finish
                self._finish_all("error", "the engine lost track of the request")
            return True
        try:
            outputs = self.engine.step()
        except StepError as exc:  # the step's requests are broken; the others go on
            logger.error("engine step failed (%s); failing its %d request(s)", exc, len(exc.request_ids), exc_info=exc.__cause__)
            self._step_failures += 1
            self._failures_in_a_row += 1
            self._fail(exc.request_ids, f"engine error: {exc}")
            state["last_step_failed"] = True
            return True
        except Exception as exc:  # no telling which requests it broke: all of those in flight
            logger.exception("engine step failed; failing %d request(s)", len(self._entries))
            self._step_failures += 1
            self._failures_in_a_row += 1
            self._finish_all("error", f"engine error: {type(exc).__name__}: {exc}")
            state["last_step_failed"] = True
            return True
        state["last_step_failed"] = False
        self._failures_in_a_row = 0
        now = time.monotonic()
        self._stats = self._read_stats()
        if self.on_step is not None:
            try:
                self.on_step(self._stats)
            except Exception:
                logger.exception("on_step callback failed")
        self._dispatch([(out.request_id, out) for out in outputs], now, refresh_stats=False)
        return True

    def _take_commands(self, block: bool, timeout: float | None = None) -> list:
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

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _Add):
            self._apply_add(cmd)
        elif isinstance(cmd, _Abort):
            ids = list(self._entries) if cmd.request_ids is None else cmd.request_ids
            now = time.monotonic()
            finals = []
            for rid in ids:
                self._engine_abort(rid)
                entry = self._entries.get(rid)
                if entry is not None:
                    finals.append((rid, self._final(rid, entry, cmd.reason, None)))
            self._dispatch(finals, now)

    def _apply_add(self, cmd: _Add) -> None:
        added: list[str] = []
        error: BaseException | None = None
        for rid, prompt, params in cmd.requests:
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as exc:  # ValueError: the client's fault; anything else: ours
                error = exc
                break
            added.append(rid)
        if error is not None:
            for rid in added:
                self._engine_abort(rid)  # all or nothing: the engine's abort output is ignored
            with self._lock:
                self._num_unfinished -= len(cmd.requests)
            _resolve(cmd.loop, cmd.accepted, error)
            return
        now = time.monotonic()
        for rid, prompt, _ in cmd.requests:
            self._entries[rid] = _Entry(cmd.stream, prompt, now)
        _resolve(cmd.loop, cmd.accepted, None)

    def _dispatch(self, outputs: list[tuple[str, RequestOutput]], t: float, refresh_stats: bool = True) -> None:
        """Hand outputs to their streams: one ``call_soon_threadsafe`` per event loop. Stats
        are refreshed first, so a reader who sees a request end also sees its KV freed."""
        if refresh_stats and outputs:
            self._stats = self._read_stats()
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        finished = 0
        for rid, out in outputs:
            entry = self._entries.get(rid)
            if entry is None:  # aborted or failed already; its stream has its final output
                continue
            entry.last = out
            if out.finished:
                del self._entries[rid]
                finished += 1
            loop = entry.stream.loop
            per_loop.setdefault(loop, []).append((entry.stream, rid, out, t))
        if finished:
            with self._lock:
                self._num_unfinished -= finished
        for loop, batch in per_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _finish_all(self, reason: str, error: str | None) -> None:
        finals = []
        for rid, entry in list(self._entries.items()):
            self._engine_abort(rid)
            finals.append((rid, self._final(rid, entry, reason, error)))
        self._dispatch(finals, time.monotonic())

    def _fail(self, request_ids: list[str], error: str) -> None:
        """End these requests with finish_reason ``error``; aborting them in the engine frees
        their KV before its next step."""
        finals = []
        for rid in request_ids:
            self._engine_abort(rid)
            entry = self._entries.get(rid)
            if entry is not None:
                finals.append((rid, self._final(rid, entry, "error", error)))
        self._dispatch(finals, time.monotonic())

    @staticmethod
    def _final(rid: str, entry: _Entry, reason: str, error: str | None) -> RequestOutput:
        """A final output made up by this thread (abort, engine failure)."""
        if entry.last is not None:
            return dataclasses.replace(entry.last, finished=True, finish_reason=reason, error=error, finished_time=time.monotonic())
        prompt_ids = entry.prompt if isinstance(entry.prompt, list) else []
        return RequestOutput(
            request_id=rid, prompt_token_ids=list(prompt_ids), token_ids=[], text="", finished=True,
            finish_reason=reason, error=error, arrival_time=entry.arrival_time, finished_time=time.monotonic(),
        )

    def _engine_abort(self, rid: str) -> None:
        try:
            self.engine.abort_request(rid)
        except Exception:
            logger.exception("abort_request(%s) failed", rid)

    def _engine_has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception:
            logger.exception("has_unfinished_requests failed")
            return False

    def _read_stats(self) -> EngineStats:
        try:
            st = dataclasses.replace(self.engine.stats())
        except Exception:
            logger.exception("engine.stats() failed")
            st = getattr(self, "_stats", EngineStats())
        st.num_step_failures_total = self._step_failures
        return st


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

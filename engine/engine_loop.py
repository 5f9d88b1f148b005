"""``EngineLoop``: what drives an ``LLMEngine`` for a server, whatever carries its commands
and outputs.

One loop owns the engine (and so the model and the device): it applies pending commands (add,
abort, stop), runs ``step()`` while there is work and otherwise blocks on its command source,
so an idle server burns no CPU. Two transports drive it:

- ``AsyncEngine`` (``async_engine.py``): a thread of the server's process, commands through a
  queue, outputs to asyncio streams;
- the engine-core process (``core_proc.py``): commands and per-step deltas over ZeroMQ, to a
  front end in another process (``core_client.py``).

Failures: a step that raises ``StepError`` (``faults.py``) ends the requests it was running
with finish_reason ``error`` and frees their KV; the loop keeps stepping for the others and
for new requests. Any other exception of a step fails every request in flight. A broken
tensor-parallel group (``TPError``: a rank died, a collective timed out) is fatal: every request
in flight fails, ``fatal`` says why and ``run`` returns (the engine core then reports it to its
front end and exits, so ``/health`` turns 503).

Nothing here knows about HTTP, threads or sockets.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchmax.engine.faults import StepError
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.parallel import TPError
from batchmax.engine.sampling import SamplingParams
from batchmax.engine.stats import EngineStats

logger = logging.getLogger("batchmax.engine")

Prompt = str | list[int]


@dataclass
class AddCommand:
    """Add requests together: all are accepted or none (``LoopTransport.accepted``)."""

    requests: list[tuple[str, Prompt, SamplingParams]]
    tag: Any = None
    """The transport's handle for the caller (a stream, a batch id); given back with outputs."""


@dataclass
class AbortCommand:
    request_ids: list[str] | None  # None: every request
    reason: str = "abort"


STOP = "stop"
"""The command that ends the loop: requests still in flight end with finish_reason ``abort``."""


@dataclass
class LoopEntry:
    """The loop's record of a request it still has to report on."""

    request_id: str
    tag: Any
    prompt: Prompt
    arrival_time: float
    last: RequestOutput | None = None


@dataclass
class LoopState:
    """What the loop publishes after each step and command batch (read by other threads)."""

    stats: EngineStats = field(default_factory=EngineStats)
    consecutive_step_failures: int = 0
    """Steps that failed since the last one that succeeded (``/health`` reads it)."""


class LoopTransport(Protocol):
    def take(self, block: bool, timeout: float | None) -> list:
        """Pending commands; with ``block``, wait up to ``timeout`` s (None: forever) for one."""

    def accepted(self, cmd: AddCommand, error: BaseException | None, state: LoopState) -> None:
        """An add was applied (``error`` None) or refused (nothing of it was added)."""

    def deliver(self, outputs: Sequence[tuple[LoopEntry, RequestOutput]], t: float, state: LoopState) -> None:
        """Outputs of one step or command batch; ``t`` is when they became known (monotonic).
        ``state`` is already current, so a reader who sees a request end also sees its KV freed."""


class EngineLoop:
    """See the module docstring. ``on_step(stats)`` runs after every step (metrics)."""

    def __init__(self, engine, transport: LoopTransport, on_step: Callable[[EngineStats], None] | None = None) -> None:
        self.engine = engine
        self.transport = transport
        self.on_step = on_step
        self.entries: dict[str, LoopEntry] = {}
        self.state = LoopState()
        self.fatal: str | None = None
        """Why the loop stopped for good (a broken tensor-parallel group), or None."""
        self._step_failures = 0  # the engine never sees its failed steps end
        self._last_step_failed = False
        self._refresh()

    def run(self) -> None:
        """Until a STOP command; a bug in one iteration fails the requests in flight, not the loop."""
        while True:
            try:
                if not self.iteration():
                    return
            except Exception:  # a bug here must not leave every request hanging
                logger.exception("engine loop failed; failing %d request(s)", len(self.entries))
                self._finish_all("error", "internal engine loop error")

    def iteration(self) -> bool:
        """Apply pending commands, then run one step if there is work. False: stop."""
        has_work = self._engine_has_work()
        self._last_step_failed = self._last_step_failed and has_work
        if self._last_step_failed and not self.entries:
            # a failing engine with nobody waiting: do not spin on step(); retry slowly
            cmds = self.transport.take(True, 0.5)
        else:
            cmds = self.transport.take(not has_work and not self.entries, None)
        # adds are answered together, after one refresh of the stats (a burst of arrivals
        # would otherwise recount the running requests' KV once per add), and always before
        # a command that may end their requests
        added: list[tuple[AddCommand, BaseException | None]] = []
        for cmd in cmds:
            if isinstance(cmd, AddCommand):
                added.append((cmd, self._apply_add(cmd)))
                continue
            self._answer(added)
            if cmd == STOP:
                self._finish_all("abort", None)
                return False
            self._apply(cmd)
        if cmds:
            self._refresh()
        self._answer(added, refresh=False)
        if not self._engine_has_work():
            if self.entries:  # the engine holds none of them: they can never finish
                self._finish_all("error", "the engine lost track of the request")
            return True
        try:
            outputs = self.engine.step()
        except StepError as exc:  # the step's requests are broken; the others go on
            logger.error("engine step failed (%s); failing its %d request(s)", exc, len(exc.request_ids), exc_info=exc.__cause__)
            self._step_failed()
            self._fail(exc.request_ids, f"engine error: {exc}")
            return True
        except TPError as exc:  # the engine cannot go on: fail everything and stop
            logger.error("tensor-parallel engine failed: %s; failing %d request(s)", exc, len(self.entries))
            self.fatal = f"engine error: {exc}"
            self._finish_all("error", self.fatal)
            return False
        except Exception as exc:  # no telling which requests it broke: all of those in flight
            logger.exception("engine step failed; failing %d request(s)", len(self.entries))
            self._step_failed()
            self._finish_all("error", f"engine error: {type(exc).__name__}: {exc}")
            return True
        self._last_step_failed = False
        self.state.consecutive_step_failures = 0
        now = time.monotonic()
        self._refresh()
        if self.on_step is not None:
            try:
                self.on_step(self.state.stats)
            except Exception:
                logger.exception("on_step callback failed")
        self._dispatch([(out.request_id, out) for out in outputs], now, refresh=False)
        return True

    # ---------------------------------------------------------------- commands
    def _apply(self, cmd) -> None:
        if isinstance(cmd, AbortCommand):
            ids = list(self.entries) if cmd.request_ids is None else cmd.request_ids
            finals = []
            for rid in ids:
                self._engine_abort(rid)
                entry = self.entries.get(rid)
                if entry is not None:
                    finals.append((rid, self._final(entry, cmd.reason, None)))
            self._dispatch(finals, time.monotonic())

    def _apply_add(self, cmd: AddCommand) -> BaseException | None:
        """Add the command's requests, all or none; the error that refused them, if any
        (``_answer`` tells the transport)."""
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
            return error
        now = time.monotonic()
        for rid, prompt, _ in cmd.requests:
            self.entries[rid] = LoopEntry(rid, cmd.tag, prompt, now)
        return None

    def _answer(self, added: list[tuple[AddCommand, BaseException | None]], refresh: bool = True) -> None:
        """Tell the transport which adds were applied or refused (and empty ``added``)."""
        if not added:
            return
        if refresh:
            self._refresh()
        for cmd, error in added:
            self.transport.accepted(cmd, error, self.state)
        added.clear()

    # ---------------------------------------------------------------- outputs
    def _dispatch(self, outputs: list[tuple[str, RequestOutput]], t: float, refresh: bool = True) -> None:
        if refresh and outputs:
            self._refresh()
        batch: list[tuple[LoopEntry, RequestOutput]] = []
        for rid, out in outputs:
            entry = self.entries.get(rid)
            if entry is None:  # aborted or failed already; its final output went out
                continue
            entry.last = out
            if out.finished:
                del self.entries[rid]
            batch.append((entry, out))
        if batch:
            self.transport.deliver(batch, t, self.state)

    def _finish_all(self, reason: str, error: str | None) -> None:
        finals = []
        for rid, entry in list(self.entries.items()):
            self._engine_abort(rid)
            finals.append((rid, self._final(entry, reason, error)))
        self._dispatch(finals, time.monotonic())

    def _fail(self, request_ids: list[str], error: str) -> None:
        """End these requests with finish_reason ``error``; aborting them in the engine frees
        their KV before its next step."""
        finals = []
        for rid in request_ids:
            self._engine_abort(rid)
            entry = self.entries.get(rid)
            if entry is not None:
                finals.append((rid, self._final(entry, "error", error)))
        self._dispatch(finals, time.monotonic())

    @staticmethod
    def _final(entry: LoopEntry, reason: str, error: str | None) -> RequestOutput:
        """A final output made up by the loop (abort, engine failure)."""
        if entry.last is not None:
            return dataclasses.replace(entry.last, finished=True, finish_reason=reason, error=error, finished_time=time.monotonic())
        prompt_ids = entry.prompt if isinstance(entry.prompt, list) else []
        return RequestOutput(
            request_id=entry.request_id, prompt_token_ids=list(prompt_ids), token_ids=[], text="", finished=True,
            finish_reason=reason, error=error, arrival_time=entry.arrival_time, finished_time=time.monotonic(),
        )

    # ---------------------------------------------------------------- engine calls
    def _step_failed(self) -> None:
        self._step_failures += 1
        self.state.consecutive_step_failures += 1
        self._last_step_failed = True

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

    def _refresh(self) -> None:
        try:
            st = dataclasses.replace(self.engine.stats())
        except Exception:
            logger.exception("engine.stats() failed")
            st = dataclasses.replace(self.state.stats)
        st.num_step_failures_total = self._step_failures
        self.state.stats = st

"""``EngineCoreClient``: the front end's handle on an engine core in its own process, with
the interface of ``AsyncEngine`` (``add``/``generate``/``abort``/``stats``/...), so the server
does not know which one it drives.

    front end (this process)                      engine core (core_proc.py)
    add()      -- AddMsg / AbortMsg / StopMsg -->  EngineLoop(LLMEngine): schedule, execute,
    streams   <-- AcceptedMsg / OutputsMsg -----   update; one message of deltas per step

Two ZeroMQ PUSH/PULL pairs over ipc:// sockets in a private temporary folder, msgspec
MessagePack on the wire (``core_messages.py``). A reader thread waits on the socket (the wait
releases the GIL) and hands each decoded message to the event loop in one
``call_soon_threadsafe``; there, ``RequestState`` (``output_processor.py``) decodes text and
checks stop strings, and the request's stream is given its newest output (streams coalesce,
so a slow reader holds one output per request, never a backlog).

If the core process dies, every request in flight ends with finish_reason ``error``,
``is_running`` turns False (``/health`` answers 503) and new requests are refused.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import zmq

from batchmax.engine.async_engine import EngineDeadError, OutputStream, StreamingEngine
from batchmax.engine.config import EngineConfig
from batchmax.engine.core_messages import (
    AbortMsg,
    AcceptedMsg,
    AddMsg,
    CoreRequest,
    FatalMsg,
    OutputsMsg,
    ReadyMsg,
    StopMsg,
    encoder,
    from_core_decoder,
)
from batchmax.engine.default_model import resolve_model
from batchmax.engine.engine_loop import Prompt
from batchmax.engine.output_processor import RequestState
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.sampling import SamplingParams
from batchmax.engine.stats import EngineStats

logger = logging.getLogger("batchmax.engine")


class EngineCoreClient(StreamingEngine):
    """Starts the engine core and waits until its model is loaded (raises ``RuntimeError`` if
    loading fails or the process dies first). ``on_step(stats)`` runs in the event loop for
    every engine step, with ``stats.last_step_tokens`` set to that step's tokens."""

    def __init__(self, config: EngineConfig, on_step: Callable[[EngineStats], None] | None = None, log_level: str = "INFO") -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.on_step = on_step
        path = resolve_model(config.model)  # converts the default model once, before the core reads it
        self.tokenizer = None if config.skip_tokenizer_init else AutoTokenizer.from_pretrained(config.tokenizer or path)
        self._dir = tempfile.mkdtemp(prefix="batchmax-core-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._zmq = zmq.Context()
        self._push = self._zmq.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(in_addr)
        self._pull = self._zmq.socket(zmq.PULL)
        self._pull.bind(out_addr)
        self._send_lock = threading.Lock()  # a zmq socket is not thread-safe
        # A fresh interpreter (no forked CUDA state, and the caller's __main__ is not
        # re-imported as multiprocessing's spawn would); the config travels as a pickle.
        with open(f"{self._dir}/config.pkl", "wb") as f:
            pickle.dump(dataclasses.replace(config, detokenize=False), f)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "batchmax.engine.core_proc", self._dir, in_addr, out_addr, log_level],
        )
        try:
            ready = self._wait_ready()
        except BaseException:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(5)
            self._close()
            raise
        self.model_name = ready.model_name
        self.max_model_len = ready.max_model_len
        self.vocab_size = ready.vocab_size
        self._stats = ready.stats
        self._failures_in_a_row = 0
        self._requests: dict[str, tuple[RequestState, OutputStream]] = {}  # event loop only
        self._pending: dict[int, tuple[asyncio.Future, list[str]]] = {}  # adds awaiting AcceptedMsg
        self._batch_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._num_unfinished = 0  # event loop only
        self._dead: str | None = None
        self._stopped = False
        self._reader = threading.Thread(target=self._read, name="batchmax-core-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> ReadyMsg:
        while True:
            if self._pull.poll(500):
                msg = from_core_decoder.decode(self._pull.recv())
                if isinstance(msg, ReadyMsg):
                    return msg
                if isinstance(msg, FatalMsg):
                    raise RuntimeError(f"the engine core failed to start: {msg.error}")
            elif self._proc.poll() is not None:
                raise RuntimeError(f"the engine core process exited with code {self._proc.returncode} while loading")

    # ----------------------------------------------------------------- API (asyncio side)
    async def add(self, requests: Sequence[tuple[str, Prompt, SamplingParams]]) -> OutputStream:
        """As ``AsyncEngine.add``: all accepted (their stream is returned) or none (the core's
        ``ValueError``); ``EngineDeadError`` if the core is not running."""
        if not self.is_running:
            raise EngineDeadError(self._dead or "the engine is not running")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._requests or self._pending:
                raise RuntimeError("an EngineCoreClient serves one event loop at a time")
            self._loop = loop  # the first loop, or a later one once nothing is in flight
        wire, rids = [], []
        for rid, prompt, params in requests:
            if rid in self._requests or rid in rids:
                raise ValueError(f"duplicate request id {rid!r}")
            ids = self._tokenize(prompt)
            wire.append(CoreRequest(rid, ids, params))
            rids.append(rid)
        stream = OutputStream(self, rids, loop)
        for r in wire:
            self._requests[r.request_id] = (RequestState(r.request_id, r.prompt_token_ids, r.params, self.tokenizer), stream)
        self._num_unfinished += len(wire)
        accepted = loop.create_future()
        bid = next(self._batch_ids)
        self._pending[bid] = (accepted, rids)
        self._send(AddMsg(bid, wire))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.close()  # commands run in order: this abort follows the add
            raise
        return stream

    def _abort(self, request_ids: list[str] | None) -> None:
        self._send(AbortMsg(request_ids))

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats)

    @property
    def num_unfinished(self) -> int:
        return self._num_unfinished

    @property
    def num_waiting(self) -> int:
        return max(0, self._num_unfinished - self._stats.num_running)

    @property
    def consecutive_step_failures(self) -> int:
        return self._failures_in_a_row

    @property
    def is_running(self) -> bool:
        return not self._stopped and self._dead is None and self._proc.poll() is None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (requests in flight end with ``abort``) and wait for it to exit."""
        if self._stopped:
            return
        self._stopped = True
        if self._proc.poll() is None:
            # Never blocks: a core that has closed its socket (it reported a fatal error and
            # is exiting) leaves the PUSH socket without a peer, where a blocking send waits forever.
            self._send(StopMsg(), block=False)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the engine core did not stop in %.0f s; killing it", timeout)
                self._proc.kill()
                self._proc.wait(5)
        self._reader.join(2)
        self._close()

    # ----------------------------------------------------------------- internals
    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine runs without a tokenizer: give token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def _send(self, msg, block: bool = True) -> None:
        data = encoder.encode(msg)
        with self._send_lock:
            if self._push.closed or self._dead is not None:  # a dead core reads nothing: a send would wait forever
                return
            try:
                self._push.send(data, flags=0 if block else zmq.NOBLOCK)
            except zmq.Again:  # only without block: nobody is reading, which the caller handles
                pass

    def _close(self) -> None:
        for s in (self._push, self._pull):
            s.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _read(self) -> None:
        """Reader thread: decode each message and hand it to the event loop."""
        while not self._stopped:
            try:
                if not self._pull.poll(200):
                    if self._proc.poll() is not None and not self._stopped:
                        self._to_loop(self._core_died, f"the engine core process died (exit code {self._proc.returncode})")
                        return
                    continue
                msg = from_core_decoder.decode(self._pull.recv())
            except zmq.ZMQError:
                return  # closed by shutdown
            self._to_loop(self._on_message, msg)

    def _to_loop(self, fn, arg) -> None:
        loop = self._loop
        if loop is None:  # nothing was ever added: nobody to tell but the flags
            if fn is self._core_died:
                self._dead = arg
            return
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the event loop is closed
            pass

    def _on_message(self, msg) -> None:
        if isinstance(msg, OutputsMsg):
            self._stats = msg.stats
            self._failures_in_a_row = msg.consecutive_step_failures
            if self.on_step is not None:
                for n in msg.step_tokens:
                    self.on_step(dataclasses.replace(msg.stats, last_step_tokens=n))
            for d in msg.deltas:
                entry = self._requests.get(d.request_id)
                if entry is None:  # ended here already (a stop string, a rejected add)
                    continue
                state, stream = entry
                out, stopped_here = state.apply(d)
                if stopped_here:
                    self._send(AbortMsg([d.request_id], "stop"))
                if out.finished:
                    del self._requests[d.request_id]
                    self._num_unfinished -= 1
                stream.put(d.request_id, out, msg.t)
        elif isinstance(msg, FatalMsg):  # the core gave up (a tensor-parallel rank died) and exits
            self._core_died(msg.error)
        elif isinstance(msg, AcceptedMsg):
            self._stats = msg.stats
            fut, rids = self._pending.pop(msg.batch_id)
            if msg.error is None:
                if not fut.done():
                    fut.set_result(None)
                return
            for rid in rids:
                self._requests.pop(rid, None)
            self._num_unfinished -= len(rids)
            if not fut.done():
                fut.set_exception(ValueError(msg.error) if msg.client_error else RuntimeError(msg.error))

    def _core_died(self, why: str) -> None:
        if self._stopped or self._dead is not None:  # told once: by its FatalMsg or its exit
            return
        logger.error("%s; failing %d request(s)", why, len(self._requests))
        self._dead = why
        now = time.monotonic()
        for rid, (state, stream) in list(self._requests.items()):
            base = state.last or RequestOutput(rid, state.prompt_ids, [], "", False)
            stream.put(rid, dataclasses.replace(base, finished=True, finish_reason="error", error=why, finished_time=now), now)
        self._requests.clear()
        self._num_unfinished = 0
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(why))
        self._pending.clear()

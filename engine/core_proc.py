"""The engine-core process: an ``EngineLoop`` over an ``LLMEngine`` that owns the device,
fed and read over ZeroMQ by its front end (``core_client.py``).

Why a process: the HTTP front end (JSON, SSE, detokenizing, stop strings) and the engine's
host work (scheduling, launching kernels, reading tokens back) each need a core; in one
process they share one GIL and slow each other down. Here the core runs only the engine loop,
and sends per step only what is new for each request (``core_messages.Delta``).

The engine runs with ``detokenize=False``: text and stop strings are the front end's. A stop
string found there aborts the request here, one step or two after its last token.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import time
from collections.abc import Sequence

import zmq

from batchmax.engine.config import EngineConfig
from batchmax.engine.core_messages import (
    AbortMsg,
    AcceptedMsg,
    AddMsg,
    Delta,
    FatalMsg,
    OutputsMsg,
    ReadyMsg,
    StopMsg,
    encoder,
    to_core_decoder,
)
from batchmax.engine.engine_loop import STOP, AbortCommand, AddCommand, EngineLoop, LoopEntry, LoopState
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.request import TokenLogprob

logger = logging.getLogger("batchmax.engine")


def main(argv: list[str]) -> None:
    """``python -m batchmax.engine.core_proc DIR IN_ADDR OUT_ADDR LOG_LEVEL``: what
    ``EngineCoreClient`` starts; ``DIR/config.pkl`` holds the ``EngineConfig``."""
    folder, in_addr, out_addr, log_level = argv
    with open(os.path.join(folder, "config.pkl"), "rb") as f:
        config = pickle.load(f)
    run_engine_core(config, in_addr, out_addr, log_level)


def run_engine_core(config: EngineConfig, in_addr: str, out_addr: str, log_level: str = "INFO") -> None:
    """Load the engine, say ready, run the loop until StopMsg (or until the front end's
    process is gone: an orphaned core must not hold the device)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(in_addr)
    push.connect(out_addr)
    push.setsockopt(zmq.LINGER, 2000)  # flush the last outputs on exit
    try:
        from batchmax.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - every load failure goes back to the front end
        logger.exception("loading the engine failed")
        push.send(encoder.encode(FatalMsg(f"{type(exc).__name__}: {exc}")))
        push.close()
        return
    transport = ZmqTransport(pull, push)
    loop = EngineLoop(engine, transport, on_step=transport.on_step)
    push.send(encoder.encode(ReadyMsg(engine.model_name, engine.max_model_len, engine.runner.spec.vocab_size, loop.state.stats)))
    loop.run()
    if loop.fatal is not None:  # the front end fails what is left and turns unhealthy
        transport.send(encoder.encode(FatalMsg(loop.fatal)))
    engine.shutdown()
    pull.close()
    push.close()
    if loop.fatal is not None:
        sys.exit(1)


class ZmqTransport:
    """``EngineLoop``'s transport across processes (see ``engine_loop.LoopTransport``)."""

    def __init__(self, pull: zmq.Socket, push: zmq.Socket) -> None:
        self.parent = os.getppid()
        self.pull = pull
        self.push = push
        self.poller = zmq.Poller()
        self.poller.register(pull, zmq.POLLIN)
        self.sent: dict[str, tuple[int, int, int]] = {}
        """Per request: tokens, logprobs and prompt logprobs already sent."""
        self.step_tokens: list[int] = []

    def on_step(self, stats) -> None:
        self.step_tokens.append(stats.last_step_tokens)

    def _orphaned(self) -> bool:
        """The front end is gone (this process was re-parented): nobody will read or stop us."""
        return os.getppid() != self.parent

    def send(self, data: bytes) -> None:
        """Send, waiting in slices while the front end's queue is full, so that a front end
        that died mid-run is noticed instead of blocking here forever (its PULL socket gone,
        this PUSH queues up to its high-water mark and then a send never returns)."""
        while not self.push.poll(1000, zmq.POLLOUT):
            if self._orphaned():
                return  # the next take() says stop
        self.push.send(data)

    def take(self, block: bool, timeout: float | None) -> list:
        if block:
            deadline = None if timeout is None else time.monotonic() + timeout
            # wait in slices, to notice a front end that died without saying stop
            while not self.poller.poll(1000 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))):
                if self._orphaned():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    return []
        if self._orphaned():  # every iteration, busy or idle: a core must not run on unwatched
            logger.error("the front end process is gone; stopping")
            return [STOP]
        cmds = []
        while True:
            try:
                raw = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return cmds
            msg = to_core_decoder.decode(raw)
            if isinstance(msg, AddMsg):
                cmds.append(AddCommand([(r.request_id, r.prompt_token_ids, r.params) for r in msg.requests], tag=msg.batch_id))
            elif isinstance(msg, AbortMsg):
                cmds.append(AbortCommand(msg.request_ids, msg.reason))
            elif isinstance(msg, StopMsg):
                cmds.append(STOP)

    def accepted(self, cmd: AddCommand, error: BaseException | None, state: LoopState) -> None:
        text = None if error is None else (str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}")
        self.send(encoder.encode(AcceptedMsg(cmd.tag, text, isinstance(error, ValueError), state.stats)))

    def deliver(self, outputs: Sequence[tuple[LoopEntry, RequestOutput]], t: float, state: LoopState) -> None:
        deltas = [self._delta(out) for _, out in outputs]
        steps, self.step_tokens = self.step_tokens, []
        msg = OutputsMsg(t, deltas, state.stats, state.consecutive_step_failures, steps)
        self.send(encoder.encode(msg))

    def _delta(self, out: RequestOutput) -> Delta:
        n_tok, n_lp, n_plp = self.sent.get(out.request_id, (0, 0, 0))
        d = Delta(
            request_id=out.request_id,
            new_token_ids=out.token_ids[n_tok:],
            new_logprobs=[_wire(e) for e in out.logprobs[n_lp:]],
            new_prompt_logprobs=[None if e is None else _wire(e) for e in out.prompt_logprobs[n_plp:]],
            finished=out.finished,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason if isinstance(out.stop_reason, int) else None,
            error=out.error,
            arrival_time=out.arrival_time,
            first_scheduled_time=out.first_scheduled_time,
            first_token_time=out.first_token_time,
            finished_time=out.finished_time,
            num_preemptions=out.num_preemptions,
        )
        if out.finished:
            self.sent.pop(out.request_id, None)
        else:
            self.sent[out.request_id] = (len(out.token_ids), len(out.logprobs), len(out.prompt_logprobs))
        return d


def _wire(e: TokenLogprob) -> tuple:
    return (e.token_id, e.logprob, e.top, e.rank)


if __name__ == "__main__":
    main(sys.argv[1:])

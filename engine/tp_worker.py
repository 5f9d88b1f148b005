"""Tensor-parallel workers: ranks 1..N-1, each a process running the same ``LLMEngine`` as
rank 0 on the same commands (``docs/ARCHITECTURE.md``, "Tensor parallelism").

Rank 0 (the caller's process: ``LLM``, the engine core) spawns the workers, and before each
step sends every worker, over its own pipe, the commands it applied since the last step (adds
with their token ids, aborts) and ``step``. A worker applies them in the same order and steps:
its scheduler, pool and evictor are then in the same state as rank 0's, and the model's
collectives line up. Commands travel over pipes, not collectives, so an idle engine waits
without a collective timeout running; collectives happen only inside steps.

A worker exits when rank 0 is gone (its pipe closes: EOF), when a collective fails (a dead
peer, a timeout), or on ``stop``.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Any

from batchmax.engine.parallel import TPError, free_port

logger = logging.getLogger("batchmax.engine")


@dataclass
class StepCommands:
    """What rank 0 applied since the last step, in order: ("add", id, token ids, params),
    ("abort", id)."""

    cmds: list[tuple[Any, ...]] = field(default_factory=list)


class TPDriver:
    """Rank 0's side: the spawned workers and their pipes."""

    def __init__(self, config, model_path: str) -> None:
        size = config.tensor_parallel_size
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs: list = []
        self.conns: list = []
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(config, model_path, rank, self.init_method, child),
                name=f"batchmax-tp{rank}", daemon=True,
            )
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self.pending: list[tuple[Any, ...]] = []

    def record(self, *cmd: Any) -> None:
        self.pending.append(cmd)

    def check_alive(self, wait: float = 0.0) -> None:
        """Raise ``TPError`` naming a worker that is gone. ``wait``: seconds to give a worker
        that is exiting (a collective failed because a peer died: its exit may lag)."""
        deadline = time.monotonic() + wait
        while wait and all(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.procs) if not p.is_alive()]
        if dead:
            rank, code = dead[0]
            raise TPError(f"tensor-parallel rank {rank} died (exit code {code})")

    def send_step(self) -> None:
        self.check_alive()
        msg = StepCommands(self.pending)
        self.pending = []
        for i, c in enumerate(self.conns):
            try:
                c.send(msg)
            except (OSError, EOFError) as exc:
                raise TPError(f"tensor-parallel rank {i + 1} is gone: {exc}") from exc

    def shutdown(self, timeout: float = 5.0) -> None:
        for c in self.conns:
            try:
                c.send("stop")
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for c in self.conns:
            c.close()
        self.conns, self.procs = [], []


def worker_main(config, model_path: str, rank: int, init_method: str, conn) -> None:
    """One worker rank: build the engine's shard, then apply commands and step until told to
    stop or rank 0 is gone."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s %(name)s[tp{rank}]: %(message)s")
    import torch

    from batchmax.engine.faults import StepError
    from batchmax.engine.llm_engine import LLMEngine

    if torch.get_num_threads() > 1 and os.environ.get("OMP_NUM_THREADS") is None:
        # ranks share the host's cores on the CPU; one pool per rank would oversubscribe them
        torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
    try:
        engine = LLMEngine(config, tp_rank=rank, tp_init=init_method, model_path=model_path)
    except BaseException:  # noqa: BLE001 - rank 0 sees the missing rank as a failed collective
        logger.exception("tensor-parallel rank %d failed to start", rank)
        os._exit(1)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone
            if msg == "stop":
                return
            for cmd in msg.cmds:
                if cmd[0] == "add":
                    _, rid, ids, params = cmd
                    try:
                        engine.add_request(rid, ids, params)
                    except Exception:  # noqa: BLE001 - rank 0 accepted it: the ranks now differ
                        logger.exception("rank %d could not apply add %s; the next step fails the group", rank, rid)
                        engine.tp_diverged = True
                elif cmd[0] == "abort":
                    engine.abort_request(cmd[1])
            try:
                engine.step()
            except StepError:
                pass  # every rank failed the same step (checked in step): same state everywhere
            except TPError:
                logger.exception("rank %d: the tensor-parallel group is broken; exiting", rank)
                return
            except Exception:  # noqa: BLE001 - every rank failed it (checked in step); rank 0 goes on, so do we
                logger.exception("rank %d: engine step failed on every rank", rank)
    finally:
        engine.runner.tp.close()
        os._exit(0)

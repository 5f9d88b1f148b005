"""Failures of one engine step: the error that names what a failed step was running, and a
switch that makes a step fail on demand.

A step that raises (a CUDA error, a bug in a kernel, an out-of-memory in the forward) has
broken the requests it was running, and only those: requests waiting for admission, or
running but not scheduled in that step, hold intact state. So ``LLMEngine.step()`` wraps any
failure in ``StepError`` naming the step's requests, and ``AsyncEngine`` fails exactly those
(freeing their KV) and keeps stepping for the rest.

``FaultConfig`` is for testing that path end to end, in a real server, without patching its
process: ``batchmax serve --debug-fail-step-token ID`` makes every step that schedules a
request whose prompt contains token ``ID`` raise ``InjectedFault`` after the scheduler has
allocated the step's KV blocks, exactly where a failing forward pass would. Off (``None``)
by default; never set it in production.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchmax.engine.request import Request


class StepError(RuntimeError):
    """``LLMEngine.step()`` failed while running ``request_ids``; the engine's other requests
    are untouched and may go on. The original exception is the ``__cause__``."""

    def __init__(self, request_ids: Sequence[str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = list(request_ids)


class InjectedFault(RuntimeError):
    """The failure ``FaultConfig`` asked for (testing only)."""


@dataclass
class FaultConfig:
    """Fault injection, for reliability tests only (see the module docstring)."""

    debug_fail_step_token: int | None = None
    """A step that schedules any request whose prompt contains this token id raises
    ``InjectedFault``. ``None``: never."""

    debug_exit_rank: int | None = None
    """Tensor parallel: with ``debug_fail_step_token``, that step makes only this rank's
    process exit (a rank that dies mid-serving) instead of every rank raising. ``None``: off."""

    debug_raise_rank: int | None = None
    """Tensor parallel: with ``debug_fail_step_token``, that step raises on this rank only (a
    failure the other ranks do not share). ``None``: off."""
    debug_tp_check_state: bool = False
    """Tensor parallel: after every step the ranks also compare a digest of their scheduler
    and pool state (running and waiting requests, held lengths, block tables, output
    tokens); a difference is a ``TPError``. Costs a pass over the batch per step: tests only."""

    def __post_init__(self) -> None:
        if self.debug_fail_step_token is not None and self.debug_fail_step_token < 0:
            raise ValueError(f"debug_fail_step_token must be a token id (>= 0), got {self.debug_fail_step_token}")

    def check_step(self, requests: Sequence["Request"], rank: int = 0) -> None:
        """Raise ``InjectedFault`` if this step is one to fail (``rank``: this process's
        tensor-parallel rank)."""
        token = self.debug_fail_step_token
        if token is None:
            return
        poisoned = [r.request_id for r in requests if token in r.prompt_token_ids]
        if poisoned and self.debug_exit_rank is not None:
            if rank == self.debug_exit_rank:
                import os

                os._exit(3)
            return
        if poisoned and self.debug_raise_rank is not None and rank != self.debug_raise_rank:
            return
        if poisoned:
            raise InjectedFault(f"injected step failure (prompt token {token} in request {poisoned[0]})")

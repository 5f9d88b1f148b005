"""A launched step whose sampled tokens the host has not read yet.

Launching a step only queues work on the device: the forward, the sampling, and copies of
the sampled ids (and any logprobs) into pinned host memory, followed by an event. Reading
them is a separate, later act (``wait``). With async scheduling the engine launches step n+1
before it reads step n, so the host's scheduling, metadata and output work overlaps the
GPU's, and step n+1 takes the ids it needs as inputs from ``tokens`` on the device (vLLM v1's
async scheduling and SGLang's overlap scheduler work the same way).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from batchmax.engine.request import Request

LogprobTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""``Sampler.logprobs``: chosen (B,), their ranks (B,), top ids (B, k) or None, top values (B, k)
or None."""


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Queue a copy of ``t`` into pinned host memory; the caller's event marks its arrival.
    (A copy into pageable memory would make the host wait for the GPU right here.)"""
    if t is None or t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


@dataclass
class StepInFlight:
    requests: list[Request]
    """Every request the step ran (prefill chunks and decodes)."""
    sampled: list[Request] = field(default_factory=list)
    """Requests that sample a token in this step, in row order of ``tokens``."""
    tokens: torch.Tensor | None = None
    """(S,) int64 sampled ids on the device: the next step's inputs are read from here."""
    row_of: dict[str, int] = field(default_factory=dict)
    """Request id -> its row of ``tokens``."""
    host_tokens: torch.Tensor | None = None
    """(S,) the same ids, arriving in host memory."""
    logprobs: LogprobTensors | None = None
    """Host copies of ``Sampler.logprobs`` for the sampled rows."""
    prompt_rows: list[tuple[Request, int]] = field(default_factory=list)
    """(request, index of the prompt token) of each prompt-logprob row."""
    prompt_logprobs: LogprobTensors | None = None
    """Host copies of ``Sampler.logprobs`` for ``prompt_rows``."""
    ready: torch.cuda.Event | None = None
    """Recorded after the copies were queued; ``None`` on the CPU (copies are done at once)."""

    def record(self, device: torch.device) -> None:
        """Mark the point after which the host copies are complete (queued after them)."""
        if device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        """Block until the host copies have landed (the step's GPU work has run)."""
        if self.ready is not None:
            self.ready.synchronize()

    def input_fill(self, request: Request) -> int:
        """Row of ``tokens`` holding ``request``'s newest token, which the next step reads
        as its input before the host knows it."""
        row = self.row_of.get(request.request_id)
        if row is None:
            raise RuntimeError(f"request {request.request_id} needs a token that no step in flight samples")
        return row

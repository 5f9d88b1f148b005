"""What the engine hands back after each step, per request."""
from __future__ import annotations

from dataclasses import dataclass, field

from batchmax.engine.request import TokenLogprob


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """All tokens generated so far (cumulative)."""
    text: str
    """Text of ``token_ids`` that is safe to show: never ends in an incomplete UTF-8
    character and, until the request finishes, holds back a tail that could be the start of
    a stop string. A finished request's text excludes the stop string."""
    finished: bool
    finish_reason: str | None = None
    """``stop``, ``length``, ``abort`` or ``error`` once finished."""
    stop_reason: int | str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per generated token when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

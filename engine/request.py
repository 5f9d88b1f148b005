"""A request's life in the engine: tokens, progress, status and timestamps."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from batchmax.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # aborted by the client or the server
    ERROR = "error"  # the engine failed while running this request


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token, with the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None
    """The token's rank in the vocabulary by probability (1: the most likely)."""


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens of prompt + output that the model has already read (their K/V were computed,
    whether or not eviction kept them). Catches up with ``num_tokens`` chunk by chunk."""
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    """The stop token id or stop string that finished the request, if any."""
    error: str | None = None
    generator: torch.Generator | None = None
    """Per-request RNG: sampling does not depend on what else is in the batch."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_preemptions: int = 0
    policy: object | None = None
    """The request's ``EvictionPolicy``; ``None`` for the full cache."""
    layer_budgets: list[int] | None = None
    """Tokens kept per layer and KV head; ``None`` for the full cache."""
    recall: bool = False
    """Park evicted prefill K/V in host memory and re-select at the last chunk."""
    num_pending_tokens: int = 0
    """Tokens sampled on the device whose ids the host has not read back yet (async
    scheduling: the next step is launched before this one's tokens are known). They count as
    generated (``num_output_tokens``, ``num_tokens``) but are not in ``output_token_ids``;
    the step that computes one reads it from the device."""
    logits_spec: object | None = None
    """The request's ``LogitsSpec`` (logits_processors.py): bias, allowed ids, bad words,
    penalties, resolved at admission; ``None`` when it has none (most requests)."""
    logits_slot: int | None = None
    """Its row in ``LogitsProcessors``' device tables, from its first sampling step on."""
    grammar: object | None = None
    """The request's ``GrammarState`` (structured_output.py): its matcher, host-side and never
    in the KV cache; ``None`` without structured outputs."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def token_ids(self, start: int, n: int) -> list[int]:
        """Known token ids ``start .. start + n - 1`` of prompt + output, without building
        the whole list (hot in every step). Shorter than ``n`` where the range reaches
        pending tokens, whose ids are still on the device."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : start - p + n]
        if start + n <= p:
            return self.prompt_token_ids[start : start + n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: start + n - p]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far, pending ones included."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens, pending ones included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_time = time.monotonic()

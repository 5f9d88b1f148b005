"""What the engine-core process and its front end say to each other over ZeroMQ, encoded
with msgspec's MessagePack (typed structs: decoding validates and builds them in C).

Front end -> core: ``AddMsg`` (requests added together, all or none), ``AbortMsg``, ``StopMsg``.
Core -> front end: ``ReadyMsg`` once the model is loaded (or ``FatalMsg``), then
``AcceptedMsg`` for each add and ``OutputsMsg`` for each step that produced outputs: per
request, only what is new since the last message (a delta), never the whole output again.
"""
from __future__ import annotations

import msgspec

from batchmax.engine.sampling import SamplingParams
from batchmax.engine.stats import EngineStats

# (token id, logprob, [(alternative id, its logprob), ...], rank); None: a position with no
# logprob (the first prompt token)
WireLogprob = tuple[int, float, list[tuple[int, float]], int | None]


class CoreRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AddMsg(msgspec.Struct, tag="add", array_like=True):
    batch_id: int
    requests: list[CoreRequest]


class AbortMsg(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str] | None  # None: every request
    reason: str = "abort"


class StopMsg(msgspec.Struct, tag="stop", array_like=True):
    pass


class Delta(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's news from one step (or from an abort or a failure)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[WireLogprob] = []
    new_prompt_logprobs: list[WireLogprob | None] = []
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


class ReadyMsg(msgspec.Struct, tag="ready", array_like=True):
    model_name: str
    max_model_len: int
    vocab_size: int
    stats: EngineStats


class FatalMsg(msgspec.Struct, tag="fatal", array_like=True):
    error: str


class AcceptedMsg(msgspec.Struct, tag="accepted", array_like=True):
    batch_id: int
    error: str | None
    client_error: bool
    """The engine refused the batch with a ValueError (the client's fault: a 400)."""
    stats: EngineStats


class OutputsMsg(msgspec.Struct, tag="outputs", array_like=True):
    t: float
    """When these outputs became known (``time.monotonic()``, the same clock in both processes)."""
    deltas: list[Delta]
    stats: EngineStats
    consecutive_step_failures: int
    step_tokens: list[int]
    """Tokens scheduled in each step since the last message (the per-step histogram)."""


ToCore = AddMsg | AbortMsg | StopMsg
FromCore = ReadyMsg | FatalMsg | AcceptedMsg | OutputsMsg

encoder = msgspec.msgpack.Encoder()
to_core_decoder = msgspec.msgpack.Decoder(ToCore)
from_core_decoder = msgspec.msgpack.Decoder(FromCore)

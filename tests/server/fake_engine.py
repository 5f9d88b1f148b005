"""A stand-in for ``LLMEngine`` that follows its contract exactly, without a model: request
``r`` generates token ids 1000, 1001, ... . Tests use it for what the real engine cannot be
made to do on demand (fail a step, load slowly)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from batchmax.engine.outputs import RequestOutput
from batchmax.engine.sampling import SamplingParams
from batchmax.engine.stats import EngineStats


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class FakeEngine:
    def __init__(self, tokenizer, max_model_len: int = 512, step_delay: float = 0.005) -> None:
        self.tokenizer = tokenizer
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.config = None
        self.step_delay = step_delay
        self.fail_steps = 0
        """The next ``fail_steps`` calls of step() raise."""
        self.running: dict[str, _Req] = {}
        self.unreported: list[_Req] = []
        self.prompt_total = 0
        self.gen_total = 0

    def add_request(self, request_id: str, prompt, params: SamplingParams) -> None:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if request_id in self.running:
            raise ValueError(f"duplicate request id {request_id!r}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"context length {self.max_model_len} exceeded: {len(ids)} + {params.max_tokens}")
        self.running[request_id] = _Req(request_id, ids, params)
        self.prompt_total += len(ids)

    def abort_request(self, request_id: str) -> None:
        r = self.running.pop(request_id, None)
        if r is not None:
            r.finish_reason = "abort"
            self.unreported.append(r)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.unreported)

    def step(self) -> list[RequestOutput]:
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("simulated device failure")
        time.sleep(self.step_delay)
        outs = []
        for r in list(self.running.values()):
            r.tokens.append(1000 + len(r.tokens))
            self.gen_total += 1
            if len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
                del self.running[r.rid]
            outs.append(self._out(r))
        outs += [self._out(r) for r in self.unreported]
        self.unreported = []
        return outs

    def _out(self, r: _Req) -> RequestOutput:
        now = time.monotonic()
        return RequestOutput(
            request_id=r.rid, prompt_token_ids=r.prompt, token_ids=list(r.tokens),
            text=self.tokenizer.decode(r.tokens) if self.tokenizer is not None else "", finished=r.finish_reason is not None,
            finish_reason=r.finish_reason, arrival_time=r.arrival, first_scheduled_time=r.arrival,
            first_token_time=now, finished_time=now if r.finish_reason else None,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.running), kv_usage=len(self.running) / 100,
            prompt_tokens_total=self.prompt_total, generation_tokens_total=self.gen_total,
        )


class ScriptedEngine(FakeEngine):
    """FakeEngine whose requests generate a given text (the tokens of ``script(prompt_text,
    params)``, one per step), then stop as a model that emits EOS does (``finish_reason``
    ``stop``); ``max_tokens`` still cuts them short. Keeps what each request was added with."""

    def __init__(self, tokenizer, script) -> None:
        super().__init__(tokenizer)
        self.script = script
        self.added: list[tuple[list[int], SamplingParams]] = []
        self._planned: dict[str, list[int]] = {}

    def add_request(self, request_id: str, prompt, params: SamplingParams) -> None:
        super().add_request(request_id, prompt, params)
        self.added.append((list(prompt), params))
        text = self.script(self.tokenizer.decode(list(prompt)), params)
        self._planned[request_id] = self.tokenizer.encode(text, add_special_tokens=False)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_delay)
        outs = []
        for r in list(self.running.values()):
            plan = self._planned[r.rid]
            if len(r.tokens) < len(plan):
                r.tokens.append(plan[len(r.tokens)])
                self.gen_total += 1
            if len(r.tokens) >= len(plan):
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
            if r.finish_reason:
                del self.running[r.rid]
            outs.append(self._out(r))
        outs += [self._out(r) for r in self.unreported]
        self.unreported = []
        return outs

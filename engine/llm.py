"""``LLM``: the offline API. ``LLM(model, **engine_options).generate(prompts, params)``."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from batchmax.engine.config import EngineConfig
from batchmax.engine.llm_engine import LLMEngine
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.sampling import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """``kwargs`` are engine options by field name: ``chunk_size``, ``max_num_seqs``,
        ``num_tokens``, ``kv_policy``, ``device``, ``dtype`` ... (see ``engine.config``)."""
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do with one process)."""
        self.engine.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.engine.add_request(rid, prompt, p)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate")
        while len(results) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [results[i] for i in ids]

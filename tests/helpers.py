"""Shared test utilities: transformers' own generate as the reference."""
from __future__ import annotations

import asyncio
import functools
import random

import torch

from batchmax.engine.attention import PoolAttention


@functools.lru_cache(maxsize=8)
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (stops at EOS like the engine)."""
    model = hf_model(str(path))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


def hf_logprobs(path, prompt_ids: list[int]) -> torch.Tensor:
    """(len(prompt), V) float32 log-softmax of transformers' logits over the prompt: row i
    is the distribution of token i + 1 (what scoring reads as prompt logprobs)."""
    with torch.no_grad():
        logits = hf_model(str(path))(torch.tensor([prompt_ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    # skip the special tokens at the start of the vocabulary
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


class PeakRecorder:
    """Wraps PoolAttention.attend to record, per request and layer, the most tokens held at
    any moment (held before the step + the step's new tokens, before eviction), separately
    for prefill steps (no token generated yet) and decode steps."""

    def __init__(self, monkeypatch):
        self.engine = None
        self.prefill: dict[tuple[str, int], int] = {}
        self.decode: dict[tuple[str, int], int] = {}
        orig = PoolAttention.attend
        rec = self

        def attend(self_, layer_idx, q, k, v):
            m = self_.meta
            for b, rid in enumerate(m.request_ids):
                phase = rec.decode if rec.engine.requests[rid].num_output_tokens else rec.prefill
                key = (rid, layer_idx)
                phase[key] = max(phase.get(key, 0), m.lens[b][layer_idx] + m.num_new[b])
            return orig(self_, layer_idx, q, k, v)

        monkeypatch.setattr(PoolAttention, "attend", attend)


def stream_all(engine, prompts: list, params: list, prefix: str) -> list:
    """Every prompt through a streaming engine (``AsyncEngine``, ``EngineCoreClient``) at once,
    request ids ``prefix0``, ``prefix1``, ...; the last output of each."""
    async def one(i):
        last = None
        async for out in engine.generate(prompts[i], params[i], request_id=f"{prefix}{i}"):
            last = out
        return last

    async def run():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    return asyncio.run(run())

"""Shared test utilities: transformers' own generate as the reference."""
from __future__ import annotations

import functools
import random

import torch


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


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    # skip the special tokens at the start of the vocabulary
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]

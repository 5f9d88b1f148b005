"""A request's KV footprint in tokens per layer: the scheduler's admission unit, and what
``batchmax plan`` tabulates (docs/ARCHITECTURE.md, "Footprint and admission")::

    full cache               prompt + max_tokens
    eviction in prefill      max(min(prompt, budget + chunk), min(prompt, budget) + max_tokens)
    eviction in decode too   max(min(prompt, budget + chunk), min(prompt + max_tokens, budget + k))

``budget`` is the largest per-layer budget (one block table serves every layer).
"""
from __future__ import annotations


def footprint_tokens(
    num_tokens: int,
    max_new_tokens: int,
    budget: int | None,
    chunk: int,
    evict_decode_every: int = 0,
) -> int:
    """``num_tokens``: tokens to prefill (the prompt, plus earlier output after a preemption);
    ``max_new_tokens``: decode tokens to reserve; ``budget``: ``None`` for the full cache."""
    if budget is None:
        return num_tokens + max_new_tokens
    prefill_peak = min(num_tokens, budget + chunk)
    if evict_decode_every:
        decode_peak = min(num_tokens + max_new_tokens, budget + evict_decode_every)
    else:
        decode_peak = min(num_tokens, budget) + max_new_tokens
    return max(prefill_peak, decode_peak)

"""``streaming`` (StreamingLLM, arXiv 2309.17453): attention sinks + the most recent tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreContext, ScoreResult


@dataclass
class StreamingPolicy(EvictionPolicy):
    name = "streaming"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> ScoreResult:
        # The engine always keeps the sinks; ranking the rest by position makes its top-k
        # keep the most recent ones, so the kept set is sinks + a recent window of the budget.
        B, H_kv, T, _ = ctx.keys.shape
        scores = ctx.key_positions.to(torch.float32)[:, None, :].expand(B, H_kv, T)  # (B, H_kv, T)
        return ScoreResult(scores.contiguous())

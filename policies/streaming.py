"""``streaming`` (StreamingLLM, arXiv 2309.17453): attention sinks + the most recent tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult, positions_per_head


@dataclass
class StreamingPolicy(EvictionPolicy):
    name = "streaming"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> ScoreResult:
        # The engine always keeps the sinks; ranking the rest by position makes its top-k
        # keep the most recent ones, so the kept set is sinks + a recent window of the budget.
        return ScoreResult(positions_per_head(ctx).to(torch.float32).contiguous())  # (B, H_kv, T)

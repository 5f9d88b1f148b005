"""``full``: never evicts; the request keeps its whole KV cache (the accuracy reference)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult


@dataclass
class FullPolicy(EvictionPolicy):
    name = "full"
    evicts = False
    needs_queries = False

    def score(self, ctx: ScoreContext) -> ScoreResult:
        # Never called by the engine (evicts=False); defined so the interface is total.
        B, H_kv, T, _ = ctx.keys.shape
        return ScoreResult(torch.zeros(B, H_kv, T, dtype=torch.float32, device=ctx.keys.device))

    def validate_budget(self, budget: int) -> None:
        # The budget is ignored: nothing is evicted, so any value (or none) is fine.
        return None

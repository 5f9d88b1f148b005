"""``knorm``: attention-free; keys with a small L2 norm tend to attract attention
(Devoto et al., "A simple and effective L2 norm-based strategy for KV cache compression", 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult


@dataclass
class KNormPolicy(EvictionPolicy):
    name = "knorm"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> ScoreResult:
        return ScoreResult(-torch.linalg.vector_norm(ctx.keys.float(), dim=-1))  # (B, H_kv, T)

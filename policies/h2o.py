"""``h2o`` (Heavy-Hitter Oracle, arXiv 2306.14048): keep the keys that have received the most
attention so far, accumulated across evictions in a running state."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult, _require_queries, attention_received, positions_per_head


@dataclass
class H2OPolicy(EvictionPolicy):
    name = "h2o"
    stateful = True
    obs_window: int | None = None
    """None: every query since the previous eviction, so the accumulated sum is exact."""

    def score(self, ctx: ScoreContext) -> ScoreResult:
        _require_queries(ctx)
        received = attention_received(ctx)  # (B, H_kv, T), summed over G heads and W queries
        state = received if ctx.state is None else ctx.state.to(torch.float32) + received
        state = state.masked_fill(~ctx.key_mask[:, None, :], 0.0)
        # Normalise by how many queries could see each key (docs/ARCHITECTURE.md, "Footprint
        # and admission"): a raw sum favours old keys just for having been seen longer, which
        # after chunked eviction crowds out the prompt's end. Every query since the request's
        # start has been observed (the engine's contract for obs_window=None), so key at p was
        # seen by positions p..q_max.
        q_max = ctx.query_positions.masked_fill(~ctx.query_mask, -1).amax(dim=1)  # (B,)
        count = (q_max[:, None, None] - positions_per_head(ctx) + 1).clamp_min(1).to(torch.float32)  # (B, H_kv, T)
        return ScoreResult(scores=state / count, state=state)

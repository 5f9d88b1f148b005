"""``tova`` (TOVA, arXiv 2401.06104): keep the keys the newest query attends to most."""
from __future__ import annotations

from dataclasses import dataclass, replace

from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult, _require_queries, window_attention


@dataclass
class TOVAPolicy(EvictionPolicy):
    name = "tova"
    obs_window: int | None = 1
    """Queries the engine hands over; only the newest real one is used (TOVA's definition)."""

    def score(self, ctx: ScoreContext) -> ScoreResult:
        _require_queries(ctx)
        # Newest real query of each row; padding may be on either side, so go by position.
        newest = ctx.query_positions.masked_fill(~ctx.query_mask, -1).argmax(dim=1)  # (B,)
        B, H_q, _, D = ctx.queries.shape
        last = replace(
            ctx,
            queries=ctx.queries.gather(2, newest.view(B, 1, 1, 1).expand(B, H_q, 1, D)),  # (B, H_q, 1, D)
            query_positions=ctx.query_positions.gather(1, newest[:, None]),  # (B, 1)
            query_mask=ctx.query_mask.gather(1, newest[:, None]),  # (B, 1)
        )
        attn = window_attention(last)  # (B, H_kv, G, 1, T)
        return ScoreResult(attn[:, :, :, 0].mean(dim=2))  # mean over the G query heads: (B, H_kv, T)

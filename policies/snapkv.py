"""``snapkv`` (SnapKV, arXiv 2404.14469): mean attention from the latest queries, max-pooled
over neighbouring positions so a kept token brings its immediate context along."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult, _require_queries, attention_received


@dataclass
class SnapKVPolicy(EvictionPolicy):
    name = "snapkv"
    obs_window: int | None = 8
    """Latest queries observed. Measured on SmolLM2-135M-Instruct, 10 chat-templated passkey
    prompts of 396-756 tokens, 25% retained, one eviction after the prompt: 8 queries 9/10,
    16 queries 0/10, 32 queries 0/10 (bench/results/passkey-window-smollm2.md). The prompt's
    last tokens are the chat template's; a wider window is mostly template and filler and
    drowns the question's signal (docs/ARCHITECTURE.md, "Footprint and admission": kvpress
    showed the same)."""
    kernel: int = 5
    """Max-pool width (odd) over neighbouring key positions."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel must be a positive odd number, got {self.kernel}")

    def score(self, ctx: ScoreContext) -> ScoreResult:
        _require_queries(ctx)
        B, H_kv, T, _ = ctx.keys.shape
        G = ctx.queries.shape[1] // H_kv
        n_queries = ctx.query_mask.sum(dim=1, dtype=torch.float32).clamp_min(1.0)  # (B,)
        # padded keys received exactly 0 (no query sees them), so pooling cannot pull a padded
        # value into a real key: attention is >= 0
        mean = attention_received(ctx) / (G * n_queries)[:, None, None]  # (B, H_kv, T)
        if self.kernel > 1:
            # stride 1 and padding kernel//2 keep length T; the implicit padding is -inf.
            pooled = F.max_pool1d(mean.reshape(B * H_kv, 1, T), self.kernel, 1, self.kernel // 2)
            mean = pooled.reshape(B, H_kv, T)
        return ScoreResult(mean)

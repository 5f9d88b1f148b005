"""``pyramid`` (PyramidKV, arXiv 2406.02069): per-layer budgets that fall linearly with depth
at the same total, on top of any evicting scorer (SnapKV by default, as in the paper).

Lower layers spread attention widely and need more tokens; upper layers concentrate on a few.
Budget schedule, following PyramidKV's (KVCache-Factory ``pyramidkv_utils``, also kvpress):
the pyramid is built on the evictable part of the budget only, since the sink + window tokens
are kept in every layer anyway. With ``reserved = sink + window`` and ``extra = budget - reserved``:

    top layer     min_l = reserved + extra // beta
    bottom layer  max_l = 2 * budget - min_l            (so that the mean is ``budget``)
    layer l       max_l - l * (max_l - min_l) / (L - 1)  (linear), then rounded to integers

Rounding floors every layer and hands the remainder out one token each to the lowest layers,
which keeps the sum exactly ``budget * L`` and the schedule non-increasing with depth; every
layer gets at least ``reserved``. ``beta`` = 20 is the paper's default (larger: steeper).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult
from batchmax.policies.snapkv import SnapKVPolicy


@dataclass
class PyramidPolicy(EvictionPolicy):
    """Layer-budget schedule wrapped around ``scorer``, to which scoring is delegated.

    ``sink``/``window`` default to the scorer's; when given they are written into (a copy of)
    the scorer so that both agree.
    """

    sink: int | None = None  # type: ignore[assignment]
    window: int | None = None  # type: ignore[assignment]
    scorer: EvictionPolicy = field(default_factory=SnapKVPolicy)
    beta: int = 20
    """Steepness: the top layer keeps ``1/beta`` of the evictable budget (PyramidKV default 20)."""

    def __post_init__(self) -> None:
        scorer = self.scorer
        if not isinstance(scorer, EvictionPolicy) or isinstance(scorer, PyramidPolicy) or not scorer.evicts:
            raise ValueError(f"pyramid: scorer must be an evicting, non-pyramid policy, got {self.scorer!r}")
        if self.beta < 1:
            raise ValueError(f"pyramid: beta must be >= 1, got {self.beta}")
        self.sink = self.scorer.sink if self.sink is None else self.sink
        self.window = self.scorer.window if self.window is None else self.window
        # A copy, so a scorer instance shared by the caller is not mutated.
        self.scorer = dataclasses.replace(self.scorer, sink=self.sink, window=self.window)
        super().__post_init__()

    @classmethod
    def from_scorer(cls, scorer_cls: type[EvictionPolicy], **overrides: Any) -> PyramidPolicy:
        """Build ``pyramid_<scorer>``: ``beta``/``sink``/``window`` go to the pyramid, every
        other override (``obs_window``, ``kernel``, ...) to the scorer."""
        own = {"beta", "sink", "window"}
        scorer = scorer_cls(**{k: v for k, v in overrides.items() if k not in own})
        return cls(scorer=scorer, **{k: v for k, v in overrides.items() if k in own})

    # Scoring traits are the scorer's.
    @property
    def name(self) -> str:  # type: ignore[override]
        return "pyramid" if isinstance(self.scorer, SnapKVPolicy) else f"pyramid_{self.scorer.name}"

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.scorer.needs_queries

    @property
    def needs_values(self) -> bool:  # type: ignore[override]
        return self.scorer.needs_values

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.scorer.stateful

    @property
    def rows_independent(self) -> bool:  # type: ignore[override]
        return self.scorer.rows_independent

    @property
    def obs_window(self) -> int | None:
        return getattr(self.scorer, "obs_window", None)

    def score(self, ctx: ScoreContext) -> ScoreResult:
        return self.scorer.score(ctx)

    def layer_budgets(self, budget: int, num_layers: int) -> list[int]:
        self.validate_budget(budget)
        if num_layers < 1:
            raise ValueError(f"pyramid: num_layers must be >= 1, got {num_layers}")
        if num_layers == 1:
            return [budget]
        reserved = self.sink + self.window
        lo = reserved + (budget - reserved) // self.beta  # top layer
        hi = 2 * budget - lo  # bottom layer; (hi + lo) / 2 == budget
        steps = num_layers - 1
        # Exact integer arithmetic: layer l's real budget is (hi * steps - l * (hi - lo)) / steps.
        budgets = [(hi * steps - layer * (hi - lo)) // steps for layer in range(num_layers)]
        # The reals sum to budget * L exactly, so the floors fall short by fewer than L tokens.
        for layer in range(budget * num_layers - sum(budgets)):
            budgets[layer] += 1
        return budgets

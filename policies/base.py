"""The eviction-policy interface: a policy is one ``score()`` over a layer's held keys.

The engine owns everything around the score: after a layer's attention it builds a
``ScoreContext`` for the requests that must shrink, calls ``policy.score``, always keeps the
first ``sink`` and the last ``window`` tokens, takes the top-k of the rest per KV head
(``engine.eviction.select_keep``) and gathers K/V (and ``ScoreResult.state`` for stateful
policies) with the kept indices. A policy therefore never sees budgets or does top-k itself,
so adding one is a single small ``score()``.

Tensors are batched over the requests being evicted and right-padded along T (keys); query
padding may sit on either side, so policies always go through the masks.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class ScoreContext:
    """What a policy sees for one layer, batched over the requests being evicted (right-padded).
    Read-only: the masks are shared by the layers of a step, and keys and values are views of
    the cache's gather."""

    keys: torch.Tensor
    """(B, H_kv, T, D) post-RoPE keys held in this layer: kept tokens, then this step's new ones."""
    values: torch.Tensor | None
    """(B, H_kv, T, D) aligned with keys, for policies that set ``needs_values``; None for the
    others (recall's re-selection then never sorts the union's values)."""
    key_positions: torch.Tensor
    """(B, H_kv, T) int64 original token positions, per KV head since each head keeps its own
    tokens (ascending along T); (B, T) is accepted when all heads hold the same tokens.
    Padding entries arbitrary. Read it through ``positions_per_head``."""
    key_mask: torch.Tensor
    """(B, T) bool, True for real keys."""
    queries: torch.Tensor | None
    """(B, H_q, W, D) post-RoPE queries of the observation window (the request's latest W
    queries), or None if the policy does not need queries."""
    query_positions: torch.Tensor | None
    """(B, W) int64."""
    query_mask: torch.Tensor | None
    """(B, W) bool, True for real queries (padding may be on either side)."""
    state: torch.Tensor | None
    """(B, H_kv, T) float32 running state of stateful policies, aligned with keys; 0 for keys
    new since the last eviction. None for stateless policies."""
    layer_idx: int
    """The layer of every row, or -1 when the rows come from several layers (only for policies
    with ``rows_independent``)."""
    num_layers: int


@dataclass
class ScoreResult:
    scores: torch.Tensor
    """(B, H_kv, T) float32; higher = more worth keeping. Padded keys may hold anything."""
    state: torch.Tensor | None = None
    """New running state (B, H_kv, T) for stateful policies; the engine gathers it with the kept keys."""


@dataclass
class EvictionPolicy(abc.ABC):
    """Base of all policies. Subclasses are small dataclasses that set the ClassVars and
    implement ``score``; fields are the knobs ``registry.get_policy(name, **overrides)`` sets."""

    sink: int = 4
    """The engine always keeps the first ``sink`` tokens (attention sinks, StreamingLLM)."""
    window: int = 16
    """... and the last ``window`` tokens held (the most recent context)."""

    name: ClassVar[str]
    evicts: ClassVar[bool] = True
    """False only for ``full``: the engine never calls score and reserves the full footprint."""
    needs_queries: ClassVar[bool] = True
    """False: the engine passes queries=None and does not keep an observation window."""
    needs_values: ClassVar[bool] = False
    """True: the engine passes ``ScoreContext.values``."""
    stateful: ClassVar[bool] = False
    """True: the engine carries ``ScoreResult.state`` between evictions, aligned with the keys."""
    rows_independent: ClassVar[bool] = True
    """True: ``score`` treats every row of its batch on its own and reads no ``layer_idx``, so
    the engine may score the rows of several layers in one call (``layer_idx`` is then -1): one
    set of operators per step instead of one per layer. False: one layer per call."""
    # Policies with needs_queries also declare an instance field
    #   obs_window: int | None  — how many latest queries to observe; None = every query since
    #   this request's previous eviction in this layer.

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 0:
            raise ValueError(f"{self.name}: sink and window must be >= 0, got {self.sink} and {self.window}")
        obs_window = getattr(self, "obs_window", None)
        if obs_window is not None and obs_window < 1:
            raise ValueError(f"{self.name}: obs_window must be >= 1 or None, got {obs_window}")

    @abc.abstractmethod
    def score(self, ctx: ScoreContext) -> ScoreResult:
        """Scores (B, H_kv, T): higher means more worth keeping."""

    def layer_budgets(self, budget: int, num_layers: int) -> list[int]:
        """Tokens kept per KV head in each layer; uniform unless a policy reshapes it (pyramid)."""
        return [budget] * num_layers

    def validate_budget(self, budget: int) -> None:
        """Raise ValueError if ``budget`` (tokens kept per layer and KV head) is unusable."""
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise ValueError(f"{self.name}: kv budget must be an integer, got {budget!r}")
        if budget < 1:
            raise ValueError(f"{self.name}: kv budget must be positive, got {budget}")
        if budget < self.sink + self.window:
            raise ValueError(
                f"{self.name}: kv budget {budget} is smaller than the tokens always kept, "
                f"sink ({self.sink}) + window ({self.window}) = {self.sink + self.window}; "
                f"raise the budget or lower sink/window"
            )


def positions_per_head(ctx: ScoreContext) -> torch.Tensor:
    """Key positions as (B, H_kv, T), whichever shape the context carries."""
    kp = ctx.key_positions
    if kp.dim() == 2:
        kp = kp[:, None, :].expand(-1, ctx.keys.shape[1], -1)
    return kp


def _require_queries(ctx: ScoreContext) -> None:
    if ctx.queries is None or ctx.query_positions is None or ctx.query_mask is None:
        raise ValueError("this policy needs queries: ctx.queries, query_positions and query_mask must be set")


def window_attention(ctx: ScoreContext) -> torch.Tensor:
    """Softmax attention of the observation-window queries over the held keys.

    Returns (B, H_kv, G, W, T) float32 with G = H_q // H_kv (the query heads sharing a KV
    head), scale 1/sqrt(D). A query sees a key only if the key is real and its position is
    <= the query's, which reproduces the causal attention the model computed (keys are
    post-RoPE, so q·k needs no re-rotation). Rows of padded queries, and of queries that see
    no key, are all zero, never NaN.
    """
    _require_queries(ctx)
    B, H_kv, T, D = ctx.keys.shape
    H_q, W = ctx.queries.shape[1], ctx.queries.shape[2]
    if H_q % H_kv:
        raise ValueError(f"query heads ({H_q}) must be a multiple of KV heads ({H_kv})")
    G = H_q // H_kv
    # query heads grouped by KV head, the scale folded into the (smaller) queries
    q = ctx.queries.reshape(B, H_kv, G * W, D).to(torch.float32) * (1.0 / math.sqrt(D))  # (B, H_kv, G*W, D)
    logits = torch.matmul(q, ctx.keys.to(torch.float32).transpose(-1, -2)).view(B, H_kv, G, W, T)  # (B, H_kv, G, W, T)

    kp = positions_per_head(ctx)  # (B, H_kv, T)
    visible = (
        (kp[:, :, None, :] <= ctx.query_positions[:, None, :, None])
        & ctx.key_mask[:, None, None, :]
        & ctx.query_mask[:, None, :, None]
    )  # (B, H_kv, W, T)
    logits = torch.where(visible[:, :, None], logits, float("-inf"))
    # a row with no visible key is all -inf: softmax makes it NaN, and it must be zeros
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def attention_received(ctx: ScoreContext, query_block: int = 128) -> torch.Tensor:
    """Attention each key received, summed over the G query heads and the W queries: (B, H_kv, T).

    Computed over blocks of ``query_block`` queries so memory stays O(B·H_q·block·T) when the
    window is a whole chunk (h2o observes every query).
    """
    _require_queries(ctx)
    W = ctx.queries.shape[2]
    B, H_kv, T, _ = ctx.keys.shape
    if W <= query_block:  # one block (snapkv's window): no running total
        return window_attention(ctx).sum(dim=(2, 3))
    total = torch.zeros(B, H_kv, T, dtype=torch.float32, device=ctx.keys.device)
    for start in range(0, W, query_block):
        end = min(start + query_block, W)
        block = dataclasses.replace(
            ctx,
            queries=ctx.queries[:, :, start:end],
            query_positions=ctx.query_positions[:, start:end],
            query_mask=ctx.query_mask[:, start:end],
        )
        total += window_attention(block).sum(dim=(2, 3))
    return total

"""Which keys a layer keeps after a policy scored them: sinks + recent window + top-k per KV head.

Pure tensor functions, kept apart from the policies (which only score) and from the cache
(which only gathers), so the selection rule lives in one place and is tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeepPlan:
    """Everything of a selection but the scores: the same for every layer of a step that
    evicts the same rows to the same counts, so the evictor makes it once per step and each
    layer pays only the sorts (``select_planned``)."""

    bias: torch.Tensor
    """(B, 1, T) float32 added to the scores: +inf for keys always kept (sinks, the window,
    rows that fit), -inf for padding, 0 for the candidates."""
    keep_len: torch.Tensor
    """(B,) int64 = min(budget_b, len_b)."""
    K: int
    """max_b keep_len[b]: the width of ``keep_idx``."""
    slot_kept: torch.Tensor | None
    """(B, 1, K) bool, True for the slots of ``keep_idx`` a row fills; None when every row
    fills all K (then no slot repeats an index)."""


def keep_plan(
    key_mask: torch.Tensor,
    budgets: torch.Tensor | int,
    sink: int,
    window: int,
    max_keep: int | None = None,
    uniform: bool = False,
) -> KeepPlan:
    """The plan of ``select_keep`` (see there for the arguments). ``uniform``: the caller knows
    on the host that every row keeps exactly ``max_keep``, so no slot needs filling."""
    B, T = key_mask.shape
    device = key_mask.device
    lens = key_mask.sum(dim=1).to(torch.int64)  # (B,)
    if isinstance(budgets, int):  # a fill on the device: as_tensor would copy from the host and sync
        budgets = torch.full((B,), budgets, dtype=torch.int64, device=device)
    budgets = budgets.to(torch.int64).expand(B)  # (B,)
    keep_len = torch.minimum(budgets, lens)  # (B,)
    # K sizes the output; a caller that knows it on the host saves a device sync
    K = max_keep if max_keep is not None else (int(keep_len.max()) if B else 0)
    pos = torch.arange(T, device=device)  # (T,)
    fits = (lens <= budgets)[:, None]  # (B, 1): keep the whole row
    forced = key_mask & (fits | (pos < sink) | (pos >= (lens - window)[:, None]))  # (B, T)
    # three tiers in one float key: forced (+inf) > real candidates (finite) > padding (-inf)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    bias = torch.where(forced, float("inf"), torch.where(key_mask, zero, float("-inf")))[:, None, :]  # (B, 1, T)
    slot_kept = None
    if not uniform:
        slot_kept = (torch.arange(K, device=device)[None, :] < keep_len[:, None])[:, None, :]  # (B, 1, K)
    return KeepPlan(bias, keep_len, K, slot_kept)


def select_planned(scores: torch.Tensor, plan: KeepPlan) -> torch.Tensor:
    """``keep_idx`` (B, H, K) of ``select_keep`` for ``scores`` (B, H, T) under ``plan``."""
    B, H, T = scores.shape
    if plan.K == 0:
        return torch.zeros(B, H, 0, dtype=torch.int64, device=scores.device)
    fmax = torch.finfo(torch.float32).max
    # finite scores (NaN lowest) plus the tiers: inf + finite stays inf, -inf + finite stays -inf
    priority = scores.to(torch.float32).nan_to_num(nan=-fmax, posinf=fmax, neginf=-fmax) + plan.bias  # (B, H, T)
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., : plan.K]  # (B, H, K)
    if plan.slot_kept is None:
        return order.sort(dim=-1).values
    # Slots past a row's keep_len are not kept: push them to the end with a sentinel index T,
    # sort to ascending position, then overwrite the sentinels with the last kept index.
    slot_kept = plan.slot_kept
    keep_idx = torch.where(slot_kept, order, T).sort(dim=-1).values  # (B, H, K)
    last = keep_idx.gather(-1, (plan.keep_len - 1).clamp_min(0).view(B, 1, 1).expand(B, H, 1))  # (B, H, 1)
    last = torch.where(last < T, last, 0)  # rows keeping nothing (len 0) point at index 0
    return torch.where(slot_kept, keep_idx, last)


def select_keep(
    scores: torch.Tensor,
    key_mask: torch.Tensor,
    budgets: torch.Tensor | int,
    sink: int,
    window: int,
    max_keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the keys to keep, per request and KV head.

    scores (B, H, T) float; key_mask (B, T) bool (real keys are a prefix: lengths =
    key_mask.sum(1)); budgets (B,) int64 (or one int for all rows) tokens to keep per head.

    Returns ``keep_idx`` (B, H, K) int64 with K = max_b min(budget_b, len_b), sorted ascending
    per (b, h), and ``keep_len`` (B,) int64 = min(budget_b, len_b). A row with len_b <=
    budget_b keeps everything; otherwise exactly budget_b per head: the first ``sink`` tokens,
    the last ``window`` real tokens and the top (budget_b - sink - window) of the rest by
    score. Entries past keep_len[b] repeat the row's last kept index, so a gather with them
    stays in range. Assumes budget_b >= sink + window (the policy validates budgets).
    ``max_keep``: max_b min(budget_b, len_b) when the caller knows it (no device sync).

    Ties go to the earlier index (stable sort), so the result is deterministic on CPU and CUDA.
    NaN scores rank below every real score and +/-inf are clamped to finite values, so the
    sinks and window always win.
    """
    plan = keep_plan(key_mask, budgets, sink, window, max_keep)
    return select_planned(scores, plan), plan.keep_len

"""Which keys a layer keeps after a policy scored them: sinks + recent window + top-k per KV head.

A pure tensor function, kept apart from the policies (which only score) and from the cache
(which only gathers), so the selection rule lives in one place and is tested on its own.
"""
from __future__ import annotations

import torch


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
    B, H, T = scores.shape
    device = scores.device
    lens = key_mask.sum(dim=1).to(torch.int64)  # (B,)
    if isinstance(budgets, int):  # a fill on the device: as_tensor would copy from the host and sync
        budgets = torch.full((B,), budgets, dtype=torch.int64, device=device)
    budgets = budgets.to(torch.int64).expand(B)  # (B,)
    keep_len = torch.minimum(budgets, lens)  # (B,)
    # K sizes the output; a caller that knows it on the host saves a device sync
    K = max_keep if max_keep is not None else (int(keep_len.max()) if B else 0)
    if K == 0:
        return torch.zeros(B, H, 0, dtype=torch.int64, device=device), keep_len

    pos = torch.arange(T, device=device)  # (T,)
    fits = (lens <= budgets)[:, None]  # (B, 1): keep the whole row
    forced = key_mask & (fits | (pos < sink) | (pos >= (lens - window)[:, None]))  # (B, T)

    # Three tiers in one float key: forced (+inf) > real candidates (finite) > padding (-inf).
    fmax = torch.finfo(torch.float32).max
    priority = scores.to(torch.float32).nan_to_num(nan=-fmax, posinf=fmax, neginf=-fmax)  # (B, H, T)
    priority = priority.masked_fill(forced[:, None, :], float("inf"))
    priority = priority.masked_fill(~key_mask[:, None, :], float("-inf"))
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :K]  # (B, H, K)

    # Slots past a row's keep_len are not kept: push them to the end with a sentinel index T,
    # sort to ascending position, then overwrite the sentinels with the last kept index.
    slot_kept = (torch.arange(K, device=device)[None, :] < keep_len[:, None])[:, None, :]  # (B, 1, K)
    keep_idx = torch.where(slot_kept, order, T).sort(dim=-1).values  # (B, H, K)
    last = keep_idx.gather(-1, (keep_len - 1).clamp_min(0).view(B, 1, 1).expand(B, H, 1))  # (B, H, 1)
    last = torch.where(last < T, last, 0)  # rows keeping nothing (len 0) point at index 0
    keep_idx = torch.where(slot_kept, keep_idx, last)
    return keep_idx, keep_len

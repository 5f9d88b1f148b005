"""Attention over the KV pool for one step, and the hook where eviction runs.

``StepMetadata`` describes the packed batch (built once per step by the ModelRunner);
``PoolAttention`` is the ``AttentionContext`` the model calls in every layer: it writes the
new tokens' K/V into their slots, attends each request's queries to its cached tokens plus
the new ones (causal within the new ones), then hands the layer to the eviction hook.

This is the torch reference path (CPU, tests, and a correct CUDA path through SDPA). The
fast CUDA kernels live beside it and must match it within bf16 tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache


@dataclass
class StepMetadata:
    request_ids: list[str]
    num_new: list[int]
    """New tokens of each request in this step (B,)."""
    query_start: list[int]
    """Offsets of each request's tokens in the packed batch (B + 1,)."""
    lens: list[list[int]]
    """Tokens each request held per layer before this step, [B][L]."""
    slots: torch.Tensor
    """(B, S) slot ids of each request's blocks in token order (device)."""
    write_idx: torch.Tensor
    """(L, N) slot each new token is written to, per layer (device)."""
    positions: torch.Tensor
    """(N,) true positions of the new tokens (device)."""

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @classmethod
    def build(cls, cache: KVCache, request_ids: list[str], num_new: list[int], positions: torch.Tensor) -> "StepMetadata":
        device = cache.device
        lens = [list(cache.seqs[r].lens) for r in request_ids]
        query_start = [0]
        for n in num_new:
            query_start.append(query_start[-1] + n)
        slots = cache.slots(cache.block_table(request_ids))  # (B, S)
        # where each new token goes, per layer: slot of (request, held_l + offset)
        req_idx = torch.repeat_interleave(torch.arange(len(num_new)), torch.tensor(num_new))  # (N,)
        tok_off = torch.cat([torch.arange(n) for n in num_new])  # (N,)
        starts = torch.tensor(lens, dtype=torch.int64).T  # (L, B)
        col = (starts[:, req_idx] + tok_off[None, :]).to(device)  # (L, N)
        write_idx = slots[req_idx.to(device)[None, :].expand_as(col), col]  # (L, N)
        return cls(request_ids, list(num_new), query_start, lens, slots, write_idx, positions)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int) -> torch.Tensor:
    """One request: q (n, H_q, D) are the newest n tokens; k, v (T, H_kv, D) hold the
    ``num_cached`` earlier tokens then these n. Query j sees keys [0, num_cached + j].
    Returns (n, H_q, D)."""
    n, hq, _ = q.shape
    t, hkv, _ = k.shape
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, n|T, D)
    # Without a mask SDPA groups query heads itself (GQA); a mask needs whole heads.
    if n == 1:
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hq != hkv)
    elif num_cached == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=hq != hkv)
    else:
        if hq != hkv:
            kt = kt.repeat_interleave(hq // hkv, dim=0)
            vt = vt.repeat_interleave(hq // hkv, dim=0)
        mask = torch.arange(t, device=q.device)[None, :] <= (num_cached + torch.arange(n, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(0, 1)


# Called after each layer's attention, while the layer's new K/V and queries are at hand.
EvictionHook = Callable[[int, torch.Tensor, "PoolAttention"], None]


class PoolAttention:
    """The model's ``AttentionContext`` for one step (torch reference implementation)."""

    def __init__(self, cache: KVCache, meta: StepMetadata, hook: EvictionHook | None = None) -> None:
        self.cache, self.meta, self.hook = cache, meta, hook

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, meta = self.cache, self.meta
        idx = meta.write_idx[layer_idx]  # (N,)
        cache.k[layer_idx, idx] = k
        cache.v[layer_idx, idx] = v
        cache.pos[layer_idx, idx] = meta.positions.to(torch.int32)[:, None]
        out = torch.empty_like(q)
        kl, vl = cache.k[layer_idx], cache.v[layer_idx]  # (S_pool, H_kv, D)
        for b in range(meta.num_requests):
            s, e = meta.query_start[b], meta.query_start[b + 1]
            held = meta.lens[b][layer_idx]
            sl = meta.slots[b, : held + (e - s)]
            out[s:e] = attend_one(q[s:e], kl[sl], vl[sl], held)
        if self.hook is not None:
            self.hook(layer_idx, q, self)
        return out

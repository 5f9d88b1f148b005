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
from typing import Protocol

import numpy as np
import torch

from batchmax.engine.attention_ref import attend_one
from batchmax.engine.fused_ops import store_kv
from batchmax.engine.kv_cache import KVCache
from batchmax.engine.triton_attention import paged_attention


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
    block_table: torch.Tensor
    """(B, W) int32 block ids of each request (device), for the fused kernel."""
    seq_lens: torch.Tensor
    """(L, B) int32 keys each request has per layer once this step's are written (device)."""
    query_start_loc: torch.Tensor
    """(B + 1,) int32 ``query_start`` on the device."""
    num_decodes: int
    """Leading requests with exactly one new token (decode-first order)."""

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @classmethod
    def build(cls, cache: KVCache, request_ids: list[str], num_new: list[int], positions: torch.Tensor) -> "StepMetadata":
        # Host arithmetic in numpy, then one staged copy per tensor: at batch 256 a decode
        # step's metadata costs well under a millisecond of host time.
        stage, bs = cache.stager.to_device, cache.block_size
        seqs = [cache.seqs[r] for r in request_ids]
        lens = [list(s.lens) for s in seqs]
        nn = np.asarray(num_new, dtype=np.int64)  # (B,)
        qs = np.zeros(len(num_new) + 1, dtype=np.int64)
        np.cumsum(nn, out=qs[1:])
        table = cache.block_table(request_ids)  # (B, W) on the host
        starts = np.asarray(lens, dtype=np.int64).reshape(len(seqs), -1).T  # (L, B) held before the step
        req_idx = np.repeat(np.arange(len(seqs)), nn)  # (N,) request of each new token
        col = starts[:, req_idx] + (np.arange(len(req_idx)) - qs[req_idx])  # (L, N) its index in the request's cache
        write_idx = table[req_idx, col // bs] * bs + col % bs  # (L, N) its slot, per layer
        table_dev = stage(torch.from_numpy(table), torch.int32)
        slots = cache.slots(table_dev.to(torch.int64))  # (B, S), on the device
        num_decodes = 0
        for n in num_new:
            if n != 1:
                break
            num_decodes += 1
        return cls(list(request_ids), list(num_new), qs.tolist(), lens, slots, stage(torch.from_numpy(write_idx), torch.int64),
                   positions, table_dev, stage(torch.from_numpy(starts + nn[None, :]), torch.int32), stage(torch.from_numpy(qs), torch.int32),
                   num_decodes)

class EvictionHook(Protocol):
    """Runs around each layer's attention while its new K/V and queries are at hand."""

    def before_attention(self, layer_idx: int, q: torch.Tensor, attn: "PoolAttention") -> None: ...

    def __call__(self, layer_idx: int, q: torch.Tensor, attn: "PoolAttention") -> None: ...


class PoolAttention:
    """The model's ``AttentionContext`` for one step. ``fused``: the Triton paged-attention
    kernels read the pool directly; otherwise the torch reference gathers each request's
    tokens and calls SDPA (CPU, tests, and the oracle the kernels are checked against)."""

    def __init__(self, cache: KVCache, meta: StepMetadata, hook: EvictionHook | None = None, fused: bool = False) -> None:
        self.cache, self.meta, self.hook, self.fused = cache, meta, hook, fused

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_score: torch.Tensor | None = None) -> torch.Tensor:
        """``q_score``: the queries eviction sees instead of ``q`` (tensor parallel with
        replicated KV heads: every query head of the KV head's group, not only this rank's)."""
        cache, meta = self.cache, self.meta
        qs = q if q_score is None else q_score
        store_kv(k, v, meta.positions, meta.write_idx[layer_idx], cache.k[layer_idx], cache.v[layer_idx], cache.pos[layer_idx], self.fused)
        if self.hook is not None:
            self.hook.before_attention(layer_idx, qs, self)
        if self.fused:
            out = paged_attention(
                q, cache.k[layer_idx], cache.v[layer_idx], meta.block_table, meta.seq_lens[layer_idx],
                meta.query_start_loc, max(meta.num_new), cache.block_size, num_decodes=meta.num_decodes,
            )
            if self.hook is not None:
                self.hook(layer_idx, qs, self)
            return out
        out = torch.empty_like(q)
        kl, vl = cache.k[layer_idx], cache.v[layer_idx]  # (S_pool, H_kv, D)
        for b in range(meta.num_requests):
            s, e = meta.query_start[b], meta.query_start[b + 1]
            held = meta.lens[b][layer_idx]
            sl = meta.slots[b, : held + (e - s)]
            out[s:e] = attend_one(q[s:e], kl.index_select(0, sl), vl.index_select(0, sl), held)
        if self.hook is not None:
            self.hook(layer_idx, qs, self)
        return out

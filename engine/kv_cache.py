"""The KV pool: preallocated once per layer, handed out in blocks.

Layout: for every layer a flat array of ``num_blocks * block_size`` token slots, each slot
holding one token's key and value for every KV head::

    k, v : (L, num_slots, H_kv, D)        pos : (L, num_slots, H_kv) int32

A request owns a list of blocks (its block table), shared by all layers. Its cache in layer
``l`` is the first ``lens[l]`` slots of those blocks, in order. Eviction compacts each layer's
kept tokens to the front per KV head, so different heads may keep different tokens in the
same slot; ``pos`` records the original position each head keeps there (the keys are stored
after RoPE, so positions are only needed by the policies, not by attention).

Why one block table for all layers rather than one per layer: it keeps the bookkeeping and
the per-step metadata O(requests) instead of O(requests x layers). All layers hold the same
number of tokens with the full cache and with uniform budgets; with per-layer budgets
(PyramidKV) a request's blocks cover its largest layer, so pyramid budgets change accuracy,
not memory. The paged layout lets requests of any length share the pool without
fragmentation, and freeing a request returns its blocks at once. One extra block
(``scratch_block``) is never handed out; padded rows of a CUDA-graph batch use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from batchmax.engine.transfer import PinnedStager


@dataclass
class SeqKV:
    """One request's share of the pool."""

    blocks: list[int] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    """Tokens held per layer."""
    seen: int = 0
    """Tokens written per layer since the request (re)started: held + evicted."""


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pin_memory: bool = False,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV pool must hold at least one block")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        # one block past the last is never handed out: padded rows of a CUDA-graph batch write
        # their K/V there and read it back, so padding never touches a request's cache
        self.scratch_block = num_blocks
        slots = (num_blocks + 1) * block_size
        self.pin_memory = pin_memory
        self.state: torch.Tensor | None = None
        """(L, num_slots, H_kv) float32 running scores of stateful policies (h2o), made on first use."""
        self._allocate((num_layers, slots, num_kv_heads), head_dim, dtype)
        self.stager = PinnedStager(self.device)
        """Stages the small host->device copies of the steps over this pool."""
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # stack: low ids first
        self.seqs: dict[str, SeqKV] = {}

    def _allocate(self, shape: tuple[int, int, int], head_dim: int, dtype: torch.dtype) -> None:
        """``k``, ``v`` (L, num_slots, H_kv, D) and ``pos`` (L, num_slots, H_kv) int32."""
        # empty, not zeros: only slots below a request's held length are ever read
        self.k = torch.empty(*shape, head_dim, dtype=dtype, device=self.device, pin_memory=self.pin_memory)
        self.v = torch.empty(*shape, head_dim, dtype=dtype, device=self.device, pin_memory=self.pin_memory)
        self.pos = torch.empty(*shape, dtype=torch.int32, device=self.device, pin_memory=self.pin_memory)

    def ensure_state(self) -> torch.Tensor:
        if self.state is None:
            self.state = torch.zeros(self.pos.shape, dtype=torch.float32, device=self.device, pin_memory=self.pin_memory)
        return self.state

    # ---- sizing ---------------------------------------------------------------------------

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of every layer, plus the int32 position per head."""
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * num_kv_heads * (2 * head_dim * elem + 4)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- allocation -----------------------------------------------------------------------

    def seq(self, request_id: str) -> SeqKV:
        s = self.seqs.get(request_id)
        if s is None:
            s = self.seqs[request_id] = SeqKV(lens=[0] * self.num_layers)
        return s

    def grow(self, request_id: str, new_tokens: int) -> bool:
        """Make room for ``new_tokens`` more tokens in every layer. All or nothing: returns
        False, allocating nothing, if the pool has too few free blocks."""
        s = self.seq(request_id)
        need = self.blocks_for(max(s.lens) + new_tokens) - len(s.blocks)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        s.blocks.extend(self._free.pop() for _ in range(need))
        return True

    def commit(self, request_id: str, new_tokens: int) -> None:
        """Record that ``new_tokens`` were written to every layer."""
        s = self.seqs[request_id]
        s.lens = [n + new_tokens for n in s.lens]
        s.seen += new_tokens

    def set_lens(self, request_id: str, lens: list[int]) -> None:
        """After eviction: the layers now hold ``lens`` tokens; trailing blocks go back."""
        s = self.seqs[request_id]
        s.lens = list(lens)
        keep = self.blocks_for(max(lens))
        while len(s.blocks) > keep:
            self._free.append(s.blocks.pop())

    def free(self, request_id: str) -> None:
        s = self.seqs.pop(request_id, None)
        if s is not None:
            self._free.extend(reversed(s.blocks))

    # ---- tensors for a step ----------------------------------------------------------------

    def block_table(self, request_ids: list[str]) -> np.ndarray:
        """(B, W) int64 block ids on the host, padded with 0; W = the most blocks of any row
        (at least 1). The step stages it to the device with its other metadata."""
        rows = [self.seqs[r].blocks for r in request_ids]
        table = np.zeros((len(rows), max((len(r) for r in rows), default=1) or 1), dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        return table

    def slots(self, block_table: torch.Tensor) -> torch.Tensor:
        """(B, width) block ids -> (B, width * block_size) slot ids, token order."""
        offs = torch.arange(self.block_size, device=block_table.device)
        return (block_table[:, :, None] * self.block_size + offs).flatten(1)

"""CUDA graphs for decode-only steps: the forward of a batch of single-token requests,
captured once per batch-size bucket and replayed, so a decode step costs a handful of copies
and one graph launch on the host instead of ~30 kernel launches per layer.

A graph reads its inputs from fixed buffers sized for the largest bucket: token ids,
positions, the pool slots the new K/V go to, block table, per-layer key counts. A step of B
requests copies its metadata into the first B rows and pads the rest of its bucket with rows
that write to and read from the pool's scratch block, so padding never touches a request's
cache. The block table has a fixed width (the longest request the engine admits), which also
fixes the attention kernel's launch configuration (``pick_config`` reads only host-side
sizes). The LM head runs outside the graph on the real rows: its (B, vocab) float32 output
per bucket would otherwise pin ~0.5 MB per row of every bucket.

Only steps without eviction are captured (eviction's shapes change with the data); steps that
evict, carry prefill chunks or need prompt logprobs run eagerly.
"""
from __future__ import annotations

import torch

from batchmax.engine.attention import PoolAttention, StepMetadata
from batchmax.engine.kv_cache import KVCache

# Batch sizes with a graph (vLLM's are 1, 2, 4 and multiples of 8): finer steps waste fewer
# padded rows, coarser ones capture faster; a decode step at batch 100 runs as 128 rows here,
# which costs little since weight reads dominate a decode step.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def graph_buckets(max_batch: int) -> list[int]:
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    """Graphs of ``model``'s forward over ``cache`` for decode batches up to ``max_batch``."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, max_batch: int, max_blocks: int) -> None:
        self.model, self.cache = model, cache
        self.buckets = graph_buckets(max_batch)
        self.max_blocks = max_blocks
        n, L, dev = self.buckets[-1], cache.num_layers, cache.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.write_idx = torch.zeros(L, n, dtype=torch.int64, device=dev)  # (L, B) pool slot of each new token
        self.block_table = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)  # (B, W)
        self.seq_lens = torch.ones(L, n, dtype=torch.int32, device=dev)  # (L, B) keys once written
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one query each
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.replays = 0
        self.pool = None  # one memory pool for all graphs: they never run concurrently

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def usable(self, meta: StepMetadata) -> bool:
        return self.bucket(meta.num_requests) is not None and meta.block_table.shape[1] <= self.max_blocks

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) become padding: one key, in the scratch block."""
        if start >= end:
            return
        bs = self.cache.block_size
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.write_idx[:, start:end].fill_(self.cache.scratch_block * bs)
        self.seq_lens[:, start:end].fill_(1)
        self.block_table[start:end, 0].fill_(self.cache.scratch_block)

    def _context(self, n: int) -> PoolAttention:
        meta = StepMetadata(
            request_ids=[""] * n, num_new=[1] * n, query_start=list(range(n + 1)), lens=[], slots=None,
            write_idx=self.write_idx[:, :n], positions=self.positions[:n], block_table=self.block_table[:n],
            seq_lens=self.seq_lens[:, :n], query_start_loc=self.query_start_loc[: n + 1], num_decodes=n,
        )
        return PoolAttention(self.cache, meta, None, fused=True)

    def capture(self, n: int) -> None:
        self._pad(0, n)
        ctx = self._context(n)
        ids, pos = self.input_ids[:n], self.positions[:n]
        if self.cache.device.type != "cuda":
            # no graphs off CUDA: "replay" runs the same padded forward eagerly, which lets the
            # CPU tests check the buffers and the padding
            self.graphs[n] = (None, None)
            return
        # warm up on a side stream (Triton compiles, cuBLAS picks its kernels), as capture needs
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(ids, pos, ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(ids, pos, ctx)  # (n, hidden) bf16: the graph's static output
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[n] = (graph, hidden)

    def capture_all(self) -> None:
        # largest first, so the shared pool is sized once by the biggest graph
        for n in reversed(self.buckets):
            self.capture(n)

    def run(self, meta: StepMetadata, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, hidden) of a decode step of B = meta.num_requests requests."""
        b = meta.num_requests
        n = self.bucket(b)
        if n not in self.graphs:
            self.capture(n)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.write_idx[:, :b].copy_(meta.write_idx)
        self.seq_lens[:, :b].copy_(meta.seq_lens)
        # columns past a row's blocks keep stale ids; the kernel never reads past seq_lens
        self.block_table[:b, : meta.block_table.shape[1]].copy_(meta.block_table)
        self._pad(b, n)
        self.replays += 1
        graph, hidden = self.graphs[n]
        if graph is None:
            return self.model(self.input_ids[:n], self.positions[:n], self._context(n))[:b]
        graph.replay()
        return hidden[:b]

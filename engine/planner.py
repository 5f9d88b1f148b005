"""Capacity planning: how many requests of a shape fit on a GPU, with and without eviction.

Pure arithmetic over the model's config; nothing is loaded. ``batchmax plan`` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchmax.engine.footprint import footprint_tokens
from batchmax.engine.kv_cache import KVCache
from batchmax.engine.models.llama import ModelSpec


def weight_bytes(spec: ModelSpec, elem: int) -> int:
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size + 2 * h
    embed = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return (spec.num_layers * per_layer + embed + h) * elem


@dataclass
class PlanRow:
    label: str
    footprint_tokens: int
    footprint_bytes: int
    max_batch: int
    host_bytes: int = 0
    """Host memory recall parks per request during its prefill (0 without eviction)."""


@dataclass
class Plan:
    spec: ModelSpec
    kv_bytes_per_token: int
    weights_bytes: int
    pool_bytes: int
    pool_tokens: int
    rows: list[PlanRow]

    def table(self) -> str:
        s = self.spec
        gib = 2**30
        lines = [
            f"model: {s.model_type}, {s.num_layers} layers, {s.num_heads} query / {s.num_kv_heads} KV heads x {s.head_dim}",
            f"KV per token: {self.kv_bytes_per_token:,} bytes ({self.kv_bytes_per_token / 1024:.1f} KiB, K+V of every layer plus positions)",
            f"weights {self.weights_bytes / gib:.1f} GiB; KV pool {self.pool_bytes / gib:.1f} GiB = {self.pool_tokens:,} tokens per layer",
            "",
            f"| {'cache':<18} | {'footprint (tokens)':>18} | {'footprint (MiB)':>15} | {'max concurrent requests':>23} | {'recall host MiB/request':>23} |",
            f"|{'-' * 20}|{'-' * 19}:|{'-' * 16}:|{'-' * 24}:|{'-' * 24}:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.label:<18} | {r.footprint_tokens:>18,} | {r.footprint_bytes / 2**20:>15,.1f} | {r.max_batch:>23,} | {r.host_bytes / 2**20:>23,.1f} |"
            )
        lines.append("")
        lines.append("recall parks a request's evicted prompt tokens in pinned host memory until its prefill ends;")
        lines.append("host memory needed = that figure x the requests in prefill at once (max_num_batched_tokens / chunk).")
        return "\n".join(lines)


def make_plan(
    spec: ModelSpec,
    gpu_mem_gb: float,
    prompt_len: int,
    max_tokens: int,
    budgets: list[int],
    chunk: int,
    dtype: torch.dtype = torch.bfloat16,
    reserve_gb: float = 2.0,
    block_size: int = 16,
    evict_decode_every: int = 0,
    tensor_parallel_size: int = 1,
) -> Plan:
    """``reserve_gb``: activations and allocator slack kept out of the pool.
    ``tensor_parallel_size``: one GPU's share (its KV heads, about 1/N of the weights); the
    batch sizes are the engine's, every GPU holding its heads of every request."""
    elem = torch.empty((), dtype=dtype).element_size()
    tp = tensor_parallel_size
    kv_heads = spec.num_kv_heads if tp == 1 else max(1, spec.num_kv_heads // tp)
    per_token = KVCache.bytes_per_token(spec.num_layers, kv_heads, spec.head_dim, dtype)
    weights = -(-weight_bytes(spec, elem) // tp)
    pool = max(0, int(gpu_mem_gb * 1e9) - weights - int(reserve_gb * 2**30))
    pool_tokens = pool // per_token // block_size * block_size

    def row(label: str, budget: int | None) -> PlanRow:
        fp = footprint_tokens(prompt_len, max_tokens, budget, chunk, evict_decode_every)
        blocks = -(-fp // block_size)
        parked = 0 if budget is None else max(0, prompt_len - budget)
        return PlanRow(label, fp, fp * per_token, pool_tokens // block_size // blocks, parked * per_token)

    rows = [row("full", None)] + [row(f"budget {b}", b) for b in budgets]
    return Plan(spec, per_token, weights, pool, pool_tokens, rows)

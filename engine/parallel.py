"""Tensor parallelism: the process group, each rank's share of the model, the collectives.

One process per rank (``torch.distributed``: NCCL on CUDA, gloo on the CPU). Every rank runs
the whole engine (scheduler, KV pool of its own KV heads, evictor) on the same commands, so
its decisions are the same; only the model's forward talks across ranks (see
``docs/ARCHITECTURE.md``, "Tensor parallelism"). With ``tensor_parallel_size=1`` there is no
``TPGroup`` at all and nothing here runs.

Sharding (Megatron-style, as vLLM does):

- q/k/v and gate/up are column-parallel: rank ``r`` computes its query heads, its KV heads and
  its slice of the MLP's intermediate features;
- o_proj and down_proj are row-parallel: each rank multiplies its slice, the partial sums are
  all-reduced (a bias is added once, after the reduction);
- the embedding is vocab-parallel (each rank looks up the ids of its vocabulary slice, zeros
  elsewhere, all-reduce); the LM head too (each rank its vocabulary slice of the logits, then
  an all-gather, so every rank holds the full logits and samples over the whole vocabulary);
- KV heads are split over the ranks; with more ranks than KV heads each KV head is replicated
  on ``size // num_kv_heads`` ranks (rank ``r`` holds KV head ``r // (size // num_kv_heads)``).
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


class TPError(RuntimeError):
    """The tensor-parallel group is broken (a rank died, a collective timed out, the ranks
    disagree about a step): fatal for the engine, which cannot go on with fewer ranks."""


@dataclass(frozen=True)
class Shard:
    """One rank's share of a model of ``num_heads`` query heads and ``num_kv_heads`` KV heads."""

    rank: int
    size: int
    num_heads: int  # query heads of this rank
    num_kv_heads: int  # KV heads of this rank (1 when replicated)
    q_head_start: int  # first query head of this rank (global index)
    kv_head_start: int  # first KV head of this rank (global index)
    inter_start: int
    inter_size: int
    vocab_start: int
    vocab_size: int  # this rank's slice of the (padded) vocabulary
    vocab_total: int  # the model's vocabulary
    proj_head_start: int  # first query head this rank projects (global index)
    proj_heads: int  # query heads this rank projects: its own, or with replicated KV heads
    # every head of its KV head's group (eviction scores a KV head from all of its queries,
    # as with one rank); attention uses ``num_heads`` of them from ``attn_head_offset``
    attn_head_offset: int

    @staticmethod
    def of(rank: int, size: int, num_heads: int, num_kv_heads: int, intermediate: int, vocab: int) -> "Shard":
        if num_heads % size:
            raise ValueError(f"tensor_parallel_size {size} must divide the number of attention heads ({num_heads})")
        if intermediate % size:
            raise ValueError(f"tensor_parallel_size {size} must divide the MLP's intermediate size ({intermediate})")
        if size <= num_kv_heads:
            if num_kv_heads % size:
                raise ValueError(f"tensor_parallel_size {size} must divide the number of KV heads ({num_kv_heads})")
            kv, kv_start = num_kv_heads // size, rank * (num_kv_heads // size)
        else:  # replicate: size // num_kv_heads ranks share each KV head (vLLM's rule)
            if size % num_kv_heads:
                raise ValueError(f"with more ranks than KV heads, the number of KV heads ({num_kv_heads}) must divide tensor_parallel_size {size}")
            kv, kv_start = 1, rank // (size // num_kv_heads)
        hq = num_heads // size
        vslice = -(-vocab // size)
        vstart = min(rank * vslice, vocab)
        if size <= num_kv_heads:
            proj_start, proj, offset = rank * hq, hq, 0
        else:
            group = num_heads // num_kv_heads
            proj_start, proj = kv_start * group, group
            offset = rank * hq - proj_start
        return Shard(
            rank, size, hq, kv, rank * hq, kv_start, rank * (intermediate // size), intermediate // size,
            vstart, vslice, vocab, proj_start, proj, offset,
        )

    @property
    def replicated(self) -> bool:
        """More ranks than KV heads: this rank's KV head is also held by others."""
        return self.proj_heads != self.num_heads

    @property
    def vocab_valid(self) -> int:
        """Real (unpadded) vocabulary entries in this rank's slice."""
        return max(0, min(self.vocab_size, self.vocab_total - self.vocab_start))


class TPGroup:
    """This process's place in the tensor-parallel group, and the collectives the model needs."""

    def __init__(self, rank: int, size: int, init_method: str, device: torch.device, timeout_s: float) -> None:
        self.rank, self.size, self.device = rank, size, device
        if dist.is_initialized():
            raise TPError("this process already is a rank of a tensor-parallel engine (one per process): shut that engine down first")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
        self.group = dist.group.WORLD
        # small host-side messages (step status) over gloo whatever the device, and on a
        # communicator of their own: a rank that failed mid-forward and reports its status
        # cannot be matched against the others' model collectives
        self.cpu_group = dist.new_group(backend="gloo", timeout=timeout)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        try:
            dist.all_reduce(x, group=self.group)
        except RuntimeError as exc:
            raise TPError(f"tensor-parallel all-reduce failed (a rank died or timed out): {exc}") from exc
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along its last dimension (rank order)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous(), group=self.group)
        except RuntimeError as exc:
            raise TPError(f"tensor-parallel all-gather failed (a rank died or timed out): {exc}") from exc
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        try:
            dist.broadcast(x, src, group=self.group)
        except RuntimeError as exc:
            raise TPError(f"tensor-parallel broadcast failed (a rank died or timed out): {exc}") from exc
        return x

    def agree(self, *values: int) -> list[tuple[int, ...]]:
        """Every rank's ``values`` (host ints over the CPU group), rank order."""
        t = torch.tensor(values, dtype=torch.int64)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        try:
            dist.all_gather(parts, t, group=self.cpu_group)
        except RuntimeError as exc:
            raise TPError(f"tensor-parallel status exchange failed (a rank died or timed out): {exc}") from exc
        return [tuple(int(x) for x in p) for p in parts]

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group cannot always be torn down cleanly
                pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``r`` uses CUDA device ``r`` (offset by the configured index); the CPU for all."""
    if device.type != "cuda":
        return device
    base = device.index or 0
    return torch.device("cuda", base + rank)


"""Continuous batching with chunked prefill, admission by KV footprint, preemption.

Every step has a token budget (``max_num_batched_tokens``). Running requests go first: a
decoding request takes one token, a prefilling one its next chunk (at most ``chunk_size``).
Waiting requests are then admitted in arrival order while the budget, ``max_num_seqs`` and
the pool allow. There are no separate prefill and decode phases: each request's
``num_computed_tokens`` simply catches up with its length (vLLM v1).

Admission reserves a request's KV *footprint* (docs/ARCHITECTURE.md, "Footprint and
admission"): with eviction it is bounded by ``budget + chunk`` whatever the prompt length,
which is what lets Batch-Max run larger batches from the same pool. Blocks are still allocated as tokens arrive; when a
request cannot grow (only possible when ``decode_reserve_tokens`` under-reserves decode), the
most recently admitted request is preempted: its blocks are freed and it is recomputed from
its prompt and the tokens it already generated when it is readmitted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchmax.engine.config import SchedulerConfig
from batchmax.engine.footprint import footprint_tokens
from batchmax.engine.kv_cache import KVCache
from batchmax.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache, evict_decode_every: int = 0) -> None:
        self.config = config
        self.cache = cache
        self.evict_decode_every = evict_decode_every
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved: dict[str, int] = {}  # blocks reserved at admission, per running request
        self.num_preemptions = 0
        self.host = None
        """Recall's host store (``HostKVStore``), set by the engine when recall is used."""
        self.num_recall_fallbacks = 0

    # ---- footprint --------------------------------------------------------------------------

    def footprint_tokens(self, req: Request) -> int:
        """Most tokens the request will hold in any layer (docs/ARCHITECTURE.md, "Footprint and admission")."""
        decode = req.params.max_tokens - req.num_output_tokens
        if self.config.decode_reserve_tokens is not None:
            decode = min(decode, self.config.decode_reserve_tokens)
        budget = max(req.layer_budgets) if req.layer_budgets else None
        return footprint_tokens(req.num_tokens, decode, budget, self.config.chunk_size, self.evict_decode_every)

    def footprint_blocks(self, req: Request) -> int:
        return self.cache.blocks_for(self.footprint_tokens(req))

    @staticmethod
    def host_footprint_tokens(req: Request) -> int:
        """Most tokens recall parks per layer: everything its smallest layer budget drops."""
        if not req.recall or not req.layer_budgets:
            return 0
        return max(0, req.num_tokens - min(req.layer_budgets))

    def _free(self, req: Request) -> None:
        self.reserved.pop(req.request_id, None)
        self.cache.free(req.request_id)
        if self.host is not None:
            self.host.free(req.request_id)

    def fits_pool(self, req: Request) -> bool:
        """Could the request run at all, alone in the pool?"""
        return self.footprint_blocks(req) <= self.cache.num_blocks

    def _committed_blocks(self) -> int:
        return sum(max(self.reserved[r.request_id], len(self.cache.seq(r.request_id).blocks)) for r in self.running)

    # ---- queue management -------------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its KV at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._free(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- one step ---------------------------------------------------------------------------

    def _chunk(self, req: Request, budget: int) -> int:
        if req.num_output_tokens >= req.params.max_tokens:
            # its last token is still being sampled (async scheduling): nothing left to compute
            return 0
        return min(req.num_tokens - req.num_computed_tokens, self.config.chunk_size, budget)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, budget)
            if n <= 0:
                i += 1
                continue
            while not self.cache.grow(req.request_id, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: the requests after it are gone too

        # Admit only when nobody was preempted: the pool is tight.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            need = self.footprint_blocks(req)
            if self._committed_blocks() + need > self.cache.num_blocks:
                break  # first come, first served: no overtaking
            n = self._chunk(req, budget)
            if not self.cache.grow(req.request_id, n):
                self.cache.free(req.request_id)
                break
            self.waiting.popleft()
            host_need = self.host_footprint_tokens(req)
            if host_need and not self.host.reserve(req.request_id, host_need):
                # the host store is full: plain Batch-Max eviction for this one
                self.host.free(req.request_id)
                req.recall = False
                self.num_recall_fallbacks += 1
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.reserved[req.request_id] = need
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        return out

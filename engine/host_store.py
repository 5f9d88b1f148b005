"""Recall's second tier: K/V evicted during prefill, parked in host memory.

A ``KVCache`` on the CPU (pinned when the engine runs on CUDA) with large blocks. A request
reserves its blocks at admission as one contiguous run where it can, so that a layer's
parked run is a single slice of the store; and the store keeps one record per token and KV
head, [k | v | pos | state] in bytes (``rec``), so that parking or loading that slice is one
copy, not one per tensor. The copies are issued from Python one by one, and on W1 their
count, not their bytes, was what recall cost. ``k``, ``v``, ``pos`` and ``state`` are views
of the records.

Streams (CUDA): parks go to the host on ``copy_stream`` and overlap the next layers' compute;
loads come back on their own ``load_stream`` (PCIe is full duplex, so a load need not queue
behind the parks) and may be issued ahead of use (the evictor prefetches the next group
while the current one is scored). A load waits for the parks of the previous steps
(``step_event``, marked when a step ends): a request's parked run is complete when its last
chunk starts, since the last chunk itself parks nothing it will recall.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchmax.engine.kv_cache import KVCache

HOST_BLOCK = 1024
"""Tokens per host block. With 256-token blocks and one copy per block, W1's recall issued
~460k small copies; blocks now merge into one slice when they are adjacent, which the
contiguous reservation makes the rule, so the block size only sets the allocation grain."""


@dataclass
class StagedRun:
    """Parked tokens of several requests for one layer, on the compute device, in request
    order: k, v (P, H, D); pos (P, H) int32; state (P, H) or None; ``counts[i]`` rows each."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    state: torch.Tensor | None
    counts: list[int]
    event: torch.cuda.Event | None = None
    records: torch.Tensor | None = None
    """(P, H, R) uint8: the records that k, v, pos and state view."""

    def ready(self) -> "StagedRun":
        """Make the current stream wait for the copies (CUDA) before it reads the tensors."""
        if self.event is not None:
            cur = torch.cuda.current_stream(self.k.device)
            cur.wait_event(self.event)
            self.records.record_stream(cur)  # allocated on the load stream, freed after use here
            self.event = None
        return self


class HostKVStore(KVCache):
    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int, dtype: torch.dtype,
        for_device: torch.device, stage_tokens: int = 32768,
    ) -> None:
        cuda = for_device.type == "cuda"
        super().__init__(num_layers, num_kv_heads, head_dim, max(1, num_tokens // HOST_BLOCK), HOST_BLOCK, dtype, "cpu", pin_memory=cuda)
        self.for_device = for_device
        self._no_state: torch.Tensor | None = None  # the state field of records parked without one
        self.stage_tokens = stage_tokens
        """Most parked tokens (per layer, summed over the requests of one group) brought to the
        device at once; the evictor holds at most two such groups (the one being scored and
        the next one loading)."""
        self.copy_stream = torch.cuda.Stream(for_device) if cuda else None
        self.load_stream = torch.cuda.Stream(for_device) if cuda else None
        self.step_event: torch.cuda.Event | None = None

    # ---- records --------------------------------------------------------------------------

    def _allocate(self, shape: tuple[int, int, int], head_dim: int, dtype: torch.dtype) -> None:
        """``rec`` (L, num_slots, H_kv, R) uint8, and k, v, pos, state as views of it."""
        self._kb = head_dim * dtype.itemsize  # bytes of one head's k (and v)
        self._at_pos = -(-2 * self._kb // 4) * 4  # pos and state are 4-byte aligned
        self.dtype = dtype
        self.rec = torch.empty(*shape, self._at_pos + 8, dtype=torch.uint8, device=self.device, pin_memory=self.pin_memory)
        self.k, self.v, self.pos, self.state = self._fields(self.rec)

    def _fields(self, rec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """k, v (..., H, D), pos (..., H) int32 and state (..., H) float32: views of ``rec`` (..., H, R)."""
        kb, p = self._kb, self._at_pos
        return (rec[..., :kb].view(self.dtype), rec[..., kb : 2 * kb].view(self.dtype),
                rec[..., p : p + 4].view(torch.int32).squeeze(-1), rec[..., p + 4 : p + 8].view(torch.float32).squeeze(-1))

    def _pack(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """(B, C, H, R) uint8 records of k, v (B, C, H, D) and pos, state (B, C, H), on their
        device: one kernel, whatever their strides (the last dimension of k and v contiguous).
        The concatenation runs on 4-byte words when a head's k is a whole number of them (bf16
        with an even head size; the 1B and 8B shapes): a byte-wise cat moves 4x the elements
        for the same bytes."""
        if self._kb % 4 == 0:
            try:
                return self._cat(torch.int32, k, v, pos, state)
            except RuntimeError:  # a source whose strides or offset are not whole words
                pass
        return self._cat(torch.uint8, k, v, pos, state)

    def _cat(self, word: torch.dtype, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        lead, w = pos.shape, word.itemsize
        parts = [k.view(word), v.view(word)]
        gap = self._at_pos - 2 * self._kb  # 0 whenever k is whole words
        if gap:
            parts.append(torch.zeros((1,) * len(lead) + (gap,), dtype=torch.uint8, device=k.device).expand(*lead, gap))
        parts.append(pos.to(torch.int32).unsqueeze(-1).view(word))
        if state is None:  # never read back (the policy keeps none): any bytes
            if self._no_state is None or self._no_state.device != k.device or self._no_state.dtype != word:
                self._no_state = torch.zeros((1,) * len(lead) + (4 // w,), dtype=word, device=k.device)
            parts.append(self._no_state.expand(*lead, 4 // w))
        else:
            parts.append(state.to(torch.float32).unsqueeze(-1).view(word))
        return torch.cat(parts, dim=-1).view(torch.uint8)

    # ---- allocation -----------------------------------------------------------------------

    def reserve(self, request_id: str, tokens: int) -> bool:
        """Reserve room for ``tokens`` parked tokens per layer (admission); all or nothing.
        Takes one contiguous run of blocks when the free blocks have one."""
        s = self.seq(request_id)
        need = self.blocks_for(max(s.lens) + tokens) - len(s.blocks)
        if need <= 0 or need > len(self._free):
            return need <= 0
        free = sorted(self._free)
        for i in range(len(free) - need + 1):
            if free[i + need - 1] - free[i] == need - 1:  # sorted and distinct: a run
                run = set(free[i : i + need])
                self._free = [b for b in self._free if b not in run]
                s.blocks.extend(free[i : i + need])
                return True
        return self.grow(request_id, tokens)  # fragmented: any blocks (more copies, same data)

    def _runs(self, request_id: str, start: int, count: int):
        """Contiguous host slot ranges covering the request's parked tokens [start, start+count):
        (offset in the run, first slot, length); adjacent blocks merge into one range."""
        blocks, bs = self.seqs[request_id].blocks, self.block_size
        i, end = start, start + count
        while i < end:
            b, off = divmod(i, bs)
            e = b + 1
            while e * bs < end and blocks[e] == blocks[e - 1] + 1:
                e += 1
            n = min(e * bs, end) - i
            yield i - start, blocks[b] * bs + off, n
            i += n

    # ---- parking (device -> host) ------------------------------------------------------------

    def park(self, layer: int | list[int], items: list[tuple[str, int, int]], k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
             state: torch.Tensor | None) -> None:
        """Append tokens to the layers' parked runs. ``items``: (request id, row, count): row
        ``row``'s first ``count`` entries of k, v (B, C, H, D), pos, state (B, C, H), on the
        compute device, go after the request's tokens parked in ``layer`` (or in ``layer[j]``
        for item j: the rows of a batch of layers, packed in one kernel) so far."""
        src = self._pack(k, v, pos, state)  # (B, C, H, R)
        layers = [layer] * len(items) if isinstance(layer, int) else layer

        def copies(non_blocking: bool) -> None:
            for (rid, row, n), lr in zip(items, layers):
                seq = self.seqs[rid]
                for off, s0, m in self._runs(rid, seq.lens[lr], n):
                    self.rec[lr, s0 : s0 + m].copy_(src[row, off : off + m], non_blocking=non_blocking)
                seq.lens[lr] += n

        if self.copy_stream is None:
            copies(False)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.for_device))
        with torch.cuda.stream(self.copy_stream):
            copies(True)
        src.record_stream(self.copy_stream)  # keep the source alive until copied

    def mark_parks(self) -> None:
        """Loads issued from now on wait for the parks issued so far (the engine marks the end
        of each step; a load of what this step parks back marks before it loads)."""
        if self.copy_stream is not None:
            self.step_event = self.copy_stream.record_event()

    # ---- loading (host -> device) ------------------------------------------------------------

    def load(self, request_ids: list[str], layer: int, with_state: bool = True) -> StagedRun:
        """The layer's parked tokens of ``request_ids`` on the compute device, one after the
        other. Asynchronous on CUDA: call ``ready()`` on the result before reading it."""
        counts = [self.seqs[r].lens[layer] for r in request_ids]
        total, dev = sum(counts), self.for_device

        def fill() -> torch.Tensor:
            out = torch.empty((total, *self.rec.shape[2:]), dtype=torch.uint8, device=dev)  # (P, H, R)
            o = 0
            for rid, c in zip(request_ids, counts):
                for off, s0, m in self._runs(rid, 0, c):
                    out[o + off : o + off + m].copy_(self.rec[layer, s0 : s0 + m], non_blocking=self.load_stream is not None)
                o += c
            return out

        if self.load_stream is None:
            out, event = fill(), None
        else:
            with torch.cuda.stream(self.load_stream):
                if self.step_event is not None:
                    self.load_stream.wait_event(self.step_event)
                out = fill()
                event = self.load_stream.record_event()
        k, v, pos, state = self._fields(out)
        return StagedRun(k, v, pos, state if with_state else None, counts, event, out)

    def parked(self, request_id: str) -> int:
        s = self.seqs.get(request_id)
        return max(s.lens) if s else 0

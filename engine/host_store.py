"""Recall's second tier: K/V evicted during prefill, parked in host memory.

A ``KVCache`` on the CPU (pinned when the engine runs on CUDA) with large blocks, so that a
layer's parked run of a request spans few contiguous slices and each slice is one
asynchronous copy. Parking appends a layer's dropped tokens after the ones parked earlier;
at the prompt's last chunk the layer's parked tokens are read back, one layer of one request
at a time, and the request's share is freed when its prefill ends.

Copies to the host go on a side CUDA stream so they overlap the next layers' compute; the
main stream waits for that stream before anything is read back.
"""
from __future__ import annotations

import torch

from engine.kv_cache import KVCache

HOST_BLOCK = 1024
"""Tokens per host block. A parked run is copied one contiguous slice per block it touches:
with 256-token blocks W1's recall issued ~460k small copies (4 per slice); a prompt's parked
run is a few thousand tokens, so 1024 keeps it to a handful of slices per layer."""


class HostKVStore(KVCache):
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int, dtype: torch.dtype, for_device: torch.device) -> None:
        cuda = for_device.type == "cuda"
        super().__init__(num_layers, num_kv_heads, head_dim, max(1, num_tokens // HOST_BLOCK), HOST_BLOCK, dtype, "cpu", pin_memory=cuda)
        self.ensure_state()
        self.for_device = for_device
        self.copy_stream = torch.cuda.Stream(for_device) if cuda else None

    def reserve(self, request_id: str, tokens: int) -> bool:
        """Reserve room for ``tokens`` parked tokens per layer (admission); all or nothing."""
        return self.grow(request_id, tokens)

    def _runs(self, request_id: str, start: int, count: int):
        """Contiguous host slot ranges covering the request's parked tokens [start, start+count)."""
        blocks = self.seqs[request_id].blocks
        i = start
        while i < start + count:
            b, off = divmod(i, self.block_size)
            n = min(self.block_size - off, start + count - i)
            s0 = blocks[b] * self.block_size + off
            yield i - start, s0, n
            i += n

    def park(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, state: torch.Tensor | None) -> None:
        """Append tokens to the layer's parked run. k, v (n, H, D), pos (n, H), state (n, H)
        on the compute device."""
        seq = self.seqs[request_id]
        start, n = seq.lens[layer], k.shape[0]
        srcs = [(self.k, k), (self.v, v), (self.pos, pos.to(torch.int32))]
        if state is not None:
            srcs.append((self.state, state))
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.for_device))
            with torch.cuda.stream(self.copy_stream):
                for off, s0, m in self._runs(request_id, start, n):
                    for dst, src in srcs:
                        dst[layer, s0 : s0 + m].copy_(src[off : off + m], non_blocking=True)
            for _, src in srcs:
                src.record_stream(self.copy_stream)  # keep the source alive until copied
        else:
            for off, s0, m in self._runs(request_id, start, n):
                for dst, src in srcs:
                    dst[layer, s0 : s0 + m] = src[off : off + m]
        seq.lens[layer] = start + n

    def load(self, request_id: str, layer: int, with_state: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The layer's parked tokens on the compute device: k, v (P, H, D), pos (P, H) int64,
        state (P, H) (None unless ``with_state``: stateless policies parked none)."""
        n = self.seqs[request_id].lens[layer]
        dev = self.for_device
        srcs = (self.k, self.v, self.pos) + ((self.state,) if with_state else ())
        out = [torch.empty((n, *src.shape[2:]), dtype=src.dtype, device=dev) for src in srcs]
        if self.copy_stream is not None:
            torch.cuda.current_stream(dev).wait_stream(self.copy_stream)  # parked copies landed
        for off, s0, m in self._runs(request_id, 0, n):
            for dst, src in zip(out, srcs):
                dst[off : off + m].copy_(src[layer, s0 : s0 + m], non_blocking=True)
        out[2] = out[2].to(torch.int64)
        return out[0], out[1], out[2], out[3] if with_state else None

    def parked(self, request_id: str) -> int:
        s = self.seqs.get(request_id)
        return max(s.lens) if s else 0

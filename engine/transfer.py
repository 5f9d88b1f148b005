"""Host-to-device copies that do not stall the GPU.

A copy from pageable host memory makes CUDA synchronise the stream first, so every small
``torch.tensor(list, device="cuda")`` in a step drains the GPU's queue. Staging through pinned
memory lets the copy be queued like a kernel.

``PinnedStager`` stages through one preallocated pinned buffer. ``Tensor.pin_memory()`` per
copy (PyTorch's caching host allocator) was measured at ~250 us a call on the H100 during
prefill: a pinned block is reusable only once its copy has run, and with the GPU hundreds of
milliseconds behind the host every call allocated anew, and a step makes hundreds of them.
"""
from __future__ import annotations

import torch


class PinnedStager:
    """Stages host data to ``device`` through a pinned buffer used as two halves: before the
    host writes into a half again, it waits for the event recorded when it last left that
    half, i.e. until the copies queued from it have run (in practice long done, so no wait)."""

    def __init__(self, device: torch.device | str, nbytes: int = 64 << 20) -> None:
        """``nbytes``: the pinned buffer. A W1 prefill step (8B shape, 16 chunks of 512,
        snapkv@512) stages 10 MiB of indices, and one where 16 recall prompts complete 34 MiB
        (counted on the CPU); with halves of 4 MiB the host switched halves up to 9 times in
        such a step, each time waiting for the GPU to pass the previous switch, which caps how
        far ahead of the GPU it may run. Halves of 32 MiB switch about once in three steps."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.half = nbytes // 2
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) if self.cuda else None
        self.cur = 0  # the half being filled
        self.off = 0  # next free byte
        self.left: list[torch.cuda.Event | None] = [None, None]  # recorded when leaving each half

    def to_device(self, data, dtype: torch.dtype) -> torch.Tensor:
        """``data`` (list or CPU tensor) as a contiguous ``dtype`` tensor on the device."""
        t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        t = t.to(dtype).contiguous()  # kernels index raw pointers: row-major, always
        if not self.cuda:
            return t.to(self.device)
        n = t.numel() * t.element_size()
        if n > self.half:  # too big to stage: PyTorch's own pinned copy
            return t.pin_memory().to(self.device, non_blocking=True)
        start = (self.off + 255) & ~255  # aligned for any dtype and for fast copies
        if start + n > (self.cur + 1) * self.half:  # does not fit in this half: move to the other
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.left[self.cur] = ev
            self.cur = 1 - self.cur
            if self.left[self.cur] is not None:
                self.left[self.cur].synchronize()
            start = self.cur * self.half
        view = self.buf[start : start + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        self.off = start + n
        return view.to(self.device, non_blocking=True)


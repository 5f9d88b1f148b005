"""Host-to-device copies that do not stall the GPU.

A copy from pageable host memory makes CUDA synchronise the stream first, so every small
``torch.tensor(list, device="cuda")`` in a step drains the GPU's queue. Staging through pinned
memory (PyTorch caches those buffers) lets the copy be queued like a kernel.
"""
from __future__ import annotations

import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    t = t.to(dtype).contiguous()  # kernels index raw pointers: row-major, always
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

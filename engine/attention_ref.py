"""Attention of one request's new queries over its cached keys, in plain torch (SDPA).

A leaf module: the pool attention (``attention.py``) uses it on the CPU and as its torch
path, and the Triton attention (``triton_attention.py``) falls back to it where its kernels
cannot run; neither imports the other for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int) -> torch.Tensor:
    """One request: q (n, H_q, D) are the newest n tokens; k, v (T, H_kv, D) hold the
    ``num_cached`` earlier tokens then these n. Query j sees keys [0, num_cached + j].
    Returns (n, H_q, D).

    SDPA gets 4-D (batch, heads, len, D) tensors: 3-D inputs fall off its fused CPU kernel
    (measured 25x slower for a 600-token prefill)."""
    n, hq, d = q.shape
    t, hkv, _ = k.shape
    g = hq // hkv
    kt, vt = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H_kv, T, D)
    if n == 1:
        # decode: the G query heads sharing a KV head are G query rows against its keys
        out = F.scaled_dot_product_attention(q.view(1, hkv, g, d), kt, vt)  # (1, H_kv, G, D)
        return out.reshape(1, hq, d)
    qt = q.transpose(0, 1)[None]  # (1, H_q, n, D)
    if num_cached == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=g > 1)
    else:
        mask = torch.arange(t, device=q.device)[None, :] <= (num_cached + torch.arange(n, device=q.device))[:, None]
        if g > 1 and q.is_cuda:  # CUDA's masked kernels want whole heads
            kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=g > 1)
    return out[0].transpose(0, 1)

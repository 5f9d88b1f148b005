"""The decode step's matrix products on their own: Llama-3-8B's projections at decode batch
sizes, cuBLAS (``F.linear``, and ``mm`` on a pre-transposed weight) against a plain Triton
kernel for few-row products (``skinny_linear`` below) over a sweep of tilings. Each is checked
against a float32 product and timed with ``triton.testing.do_bench`` (median; L2 flushed
before every run), and reported as weight bytes read per second against the measured copy
ceiling, beside the compute floor (2·M·N·K at the measured bf16 matmul rate).

Why it exists: at batch 256 a decode step's products looked bandwidth-starved (cuBLAS reads
the weights at ~2.2 TB/s on an H200 whose copies run at 4.3). This measured whether a kernel
with narrower tiles (more programs per wave, split-K for N = 4,096) reads them faster. It
does not (H200, 2026-11-30: slower than cuBLAS for every shape, results in bench/results/):
at M = 256 the products are compute-bound on the H200 (256 FLOP per weight byte, above its
~185 FLOP/byte ridge), so cuBLAS's ~650 TFLOP/s is near the floor and the kernel stays here,
out of the engine.

    python -m bench.decode_gemms --m 128 256 --json bench/results/DATE-GPU-decode-gemms.jsonl
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench import append_jsonl


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, m: int, n: int, k: int) -> bool:
        return n % self.block_n == 0 and k % (self.block_k * self.split_k) == 0


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the programs reading one weight tile run together
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_len = K // SPLIT_K
    k0 = pid_k * k_len
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    row_ok = offs_m[:, None] < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_len, BLOCK_K):
        a = tl.load(x_ptrs, mask=row_ok, other=0.0)
        b = tl.load(w_ptrs)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(out_ptrs, acc, mask=row_ok, sem="relaxed")



def skinny_linear(x: torch.Tensor, w: torch.Tensor, cfg: GemmConfig) -> torch.Tensor:
    """x (M, K) @ w (N, K).T -> (M, N) in x's dtype; both row-major."""
    m, k = x.shape
    n = w.shape[0]
    if not cfg.fits(m, n, k):
        raise ValueError(f"{cfg} does not tile ({m}, {n}, {k})")
    x = x.contiguous()
    grid = (triton.cdiv(m, cfg.block_m), n // cfg.block_n, cfg.split_k)
    if cfg.split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    _skinny_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if cfg.split_k == 1 else out.to(x.dtype)


SHAPES = {  # name: (N, K) of Llama-3-8B's weights; per layer except lm_head
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}

SWEEP = [
    GemmConfig(bm, bn, bk, sk, nw, ns)
    for bm, bn, bk, sk, nw, ns in [
        (64, 64, 128, 1, 4, 4), (128, 64, 128, 1, 4, 4), (128, 64, 128, 1, 8, 4), (256, 64, 64, 1, 8, 4),
        (128, 32, 128, 1, 4, 5), (256, 32, 128, 1, 8, 4), (128, 128, 64, 1, 8, 4), (64, 128, 128, 1, 4, 3),
        (128, 64, 128, 2, 4, 4), (128, 64, 128, 4, 4, 4), (256, 64, 64, 2, 8, 4), (128, 32, 128, 2, 4, 5),
        (64, 64, 256, 1, 4, 3), (128, 64, 256, 2, 8, 3),
    ]
]


def main(argv=None) -> None:
    from triton.testing import do_bench

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[128, 256])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ceiling = 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src), rep=200, return_mode="median") * 1e-3)
    del src, dst
    ga, gb = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rate = 2 * 8192**3 / (do_bench(lambda: ga @ gb, rep=200, return_mode="median") * 1e-3)
    del ga, gb
    dev = torch.cuda.get_device_name()
    print(f"{dev}: copy ceiling {ceiling / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    print("| shape | M | weights MB | bandwidth floor us | compute floor us | cuBLAS linear us (TB/s) | cuBLAS mm(w.T) us | best Triton us (TB/s) | config | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.shapes:
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wt = w.t().contiguous()
        for m in a.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ w.float().t())
            nbytes = w.numel() * 2
            t_lin = do_bench(lambda: F.linear(x, w), rep=100, return_mode="median")
            t_mm = do_bench(lambda: x @ wt, rep=100, return_mode="median")
            best = None
            rows = []
            for cfg in SWEEP:
                if not cfg.fits(m, n, k) or cfg.block_m > max(64, m):
                    continue
                try:
                    y = skinny_linear(x, w, cfg)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    t = do_bench(lambda: skinny_linear(x, w, cfg), rep=100, return_mode="median")
                except Exception as exc:  # a tiling that does not compile here (shared memory)
                    rows.append(dict(config=repr(cfg), error=f"{type(exc).__name__}: {exc}"[:200]))
                    continue
                rows.append(dict(config=repr(cfg), us=t * 1e3, rel_err=err))
                if err < 1e-2 and (best is None or t < best[0]):
                    best = (t, cfg, err)
            floors = f"{nbytes / ceiling * 1e6:.1f} | {2 * m * n * k / rate * 1e6:.1f}"
            res = dict(device=dev, shape=name, m=m, n=n, k=k, weight_bytes=nbytes, ceiling_bytes_s=ceiling, matmul_flop_s=rate,
                       cublas_linear_us=t_lin * 1e3, cublas_mm_wt_us=t_mm * 1e3, triton=rows,
                       best_triton_us=best[0] * 1e3 if best else None, best_config=repr(best[1]) if best else None)
            append_jsonl(a.json, res)
            bt = f"{best[0] * 1e3:.1f} ({nbytes / best[0] / 1e9:.2f})" if best else "-"
            cfg_s = f"{best[1].block_m}x{best[1].block_n}x{best[1].block_k} sk{best[1].split_k} w{best[1].num_warps} s{best[1].num_stages}" if best else "-"
            err_s = f"{best[2]:.1e}" if best else "-"
            print(f"| {name} | {m} | {nbytes / 1e6:.0f} | {floors} | {t_lin * 1e3:.1f} ({nbytes / t_lin / 1e9:.2f}) | {t_mm * 1e3:.1f} | {bt} | {cfg_s} | {err_s} |",
                  flush=True)
        del w, wt
        torch.cuda.empty_cache()
    print(json.dumps(dict(device=dev, ceiling_tb_s=round(ceiling / 1e12, 2), matmul_tflop_s=round(rate / 1e12))))


if __name__ == "__main__":
    main()

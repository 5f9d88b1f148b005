"""Micro-benchmark of the paged attention kernels (engine/triton_attention.py) on one GPU.

1. ceilings: device-to-device copy bandwidth and a bf16 matmul rate, measured here;
2. correctness: the Triton kernels in bf16 vs the float32 oracle on random pools (shuffled
   blocks, NaN in every slot no request may read, output poisoned with NaN before the call);
3. decode: Llama-3-8B shape (H_q 32, H_kv 8, D 128) at B = 64 / 256 x seq 768 / 4352, plus
   small batches with long sequences (where split-KV matters), against the bandwidth floor
   (each request's K/V read once) and SDPA on a dense copy of the same keys;
4. prefill: 16 requests x 512 new queries over 4096 cached keys, against the FLOP floor and
   SDPA flash on a dense copy; 5. a mixed decode + prefill step.

    python -m bench.attention_kernels                          # everything, prints tables
    python -m bench.attention_kernels --sweep --json out.json  # also launch-config variants
    python -m bench.attention_kernels --sections prefill --sweep --skip-correctness

Times are medians: ``graph us`` replays the call captured in a CUDA graph
(``triton.testing.do_bench_cudagraph``: kernel time without Python launch cost, as the engine
sees it under CUDA graphs); ``eager us`` is ``triton.testing.do_bench`` (CUDA events) on plain
calls, where small kernels show the host's launch cost.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from batchmax.engine.triton_attention import (
    paged_attention_ref,
    paged_attention_torch,
    paged_attention_triton,
    pick_config,
)

LLAMA = dict(hq=32, hkv=8, d=128)
SMOLLM = dict(hq=9, hkv=3, d=64)


def gpu_case(q_lens, seq_lens, hq, hkv, d, block_size=16, dtype=torch.bfloat16, seed=0, spare=8):
    """Random pool and step built on the GPU (fast at benchmark sizes); blocks shuffled."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    nb = torch.tensor([-(-s // block_size) for s in seq_lens], device=dev)
    total = int(nb.sum()) + spare
    perm = torch.randperm(total, device=dev, generator=g).to(torch.int32)
    width = int(nb.max())
    start = torch.cumsum(nb, 0) - nb
    col = torch.arange(width, device=dev)
    idx = (start[:, None] + col[None, :]).clamp(max=total - 1)
    table = torch.where(col[None, :] < nb[:, None], perm[idx], torch.zeros_like(perm[idx])).to(torch.int32)
    slots = total * block_size
    k = torch.randn(slots, hkv, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(slots, hkv, d, device=dev, dtype=dtype, generator=g)
    n = sum(q_lens)
    q = torch.randn(n, hq, d, device=dev, dtype=dtype, generator=g)
    qsl = torch.tensor([0] + list(q_lens), device=dev).cumsum(0).to(torch.int32)
    return dict(q=q, k_cache=k, v_cache=v, block_table=table,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                query_start_loc=qsl, max_query_len=max(q_lens), block_size=block_size)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def oracle(case):
    """float32 output of the oracle."""
    return paged_attention_ref(**case, out=torch.empty(case["q"].shape, dtype=torch.float32, device="cuda"))


def check(case, config=None, ref=None):
    """(max abs error, relative error, all written) of the Triton path vs the oracle."""
    ref = oracle(case) if ref is None else ref
    out = torch.full_like(case["q"], float("nan"))
    paged_attention_triton(**case, out=out, config=config)
    torch.cuda.synchronize()
    written = bool(torch.isfinite(out).all())
    return (out.float() - ref).abs().max().item(), rel_err(out, ref), written


def bench(fn, graph=False):
    import triton.testing as tt

    if graph:
        return tt.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3  # us
    return tt.do_bench(fn, warmup=25, rep=150, return_mode="median") * 1e3


def kv_bytes(case):
    _, hkv, d = case["k_cache"].shape
    el = case["k_cache"].element_size()
    return int(case["seq_lens"].sum()) * hkv * d * el * 2 + 2 * case["q"].numel() * case["q"].element_size()


def attn_flops(q_lens, seq_lens, hq, d):
    """2 matmuls x 2 flop per visible (query, key) pair per head."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(q_lens, seq_lens))
    return 4 * hq * d * pairs


def ceilings():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x)) * 1e-6
    bw = 2 * x.numel() / t
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = bench(lambda: a @ b) * 1e-6
    del x, y, a, b
    return bw, 2 * 8192**3 / tm


def correctness(rows):
    g = torch.Generator().manual_seed(0)
    cases = []
    seq = torch.randint(100, 16384, (48,), generator=g).tolist()
    cases.append(("decode ragged 100-16k llama", [1] * 48, seq, LLAMA))
    seq = torch.randint(1, 8000, (40,), generator=g).tolist()
    cases.append(("decode ragged smollm g3 d64", [1] * 40, seq, SMOLLM))
    cases.append(("prefill 3x chunk + prefix llama", [512, 300, 2048], [512 + 4096, 300 + 17, 2048], LLAMA))
    cases.append(("prefill g3 d64", [512, 77, 1000], [512 + 1500, 77, 1000 + 31], SMOLLM))
    seq = torch.randint(1, 6000, (30,), generator=g).tolist()
    cases.append(("mixed decode+prefill llama", [1] * 30 + [512, 1, 129], seq + [512 + 2000, 3, 129], LLAMA))
    cases.append(("mixed decode+prefill smollm", [1] * 30 + [512, 1, 129], seq + [512 + 2000, 3, 129], SMOLLM))
    cases.append(("mha d64 (16/16)", [1, 64, 1], [999, 64 + 500, 5], dict(hq=16, hkv=16, d=64)))
    worst = 0.0
    for name, ql, sl, shape in cases:
        case = gpu_case(ql, sl, **shape, seed=len(name))
        # poison every slot no request may read: a stray read shows as NaN
        used = torch.zeros(case["k_cache"].shape[0], dtype=torch.bool, device="cuda")
        for b, s in enumerate(sl):
            t = torch.arange(s, device="cuda")
            used[case["block_table"][b].long()[t // 16] * 16 + t % 16] = True
        case["k_cache"][~used] = float("nan")
        case["v_cache"][~used] = float("nan")
        ref = oracle(case)
        for cfg in (None, {"num_splits": 1}, {"num_splits": 4}, {"num_splits": 8, "tile": 32}):
            mx, rel, ok = check(case, cfg, ref)
            worst = max(worst, rel if ok else float("inf"))
            rows.append(dict(section="correct", case=name, config=str(cfg), max_abs=mx, rel=rel, written=ok))
            print(f"  {name:34s} cfg={str(cfg):34s} max_abs={mx:.3e} rel={rel:.3e} {'ok' if ok and rel < 1e-2 else 'FAIL'}", flush=True)
    # the torch fallback on the GPU too
    case = gpu_case([1] * 8 + [100], [50, 900, 3, 16, 17, 2000, 1, 64, 300], **LLAMA, seed=99)
    rel = rel_err(paged_attention_torch(**case), oracle(case))
    print(f"  {'torch fallback (gpu)':34s} rel={rel:.3e}")
    return worst


def time_configs(name, case, cfgs, rows, section, floor_us=None, work=None, unit="TB/s", extra=None):
    """Check and time each config (None = the automatic choice) of one case; CUDA-graph
    medians for all, and the eager median for the automatic choice (launch cost included)."""
    out = torch.empty_like(case["q"])
    ref = oracle(case)
    for cfg in cfgs:
        fn = lambda: paged_attention_triton(**case, out=out, config=cfg, **(extra or {}))  # noqa: E731
        try:
            _, rel, ok = check(case, cfg, ref)
            gus = bench(fn, graph=True)
            us = bench(fn) if cfg is None else float("nan")
        except Exception as e:  # noqa: BLE001 - a config that does not compile (resources)
            print(f"{name:>22s} {str(cfg):>40s} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        label = "auto" if cfg is None else str(cfg)
        rate = work / gus / 1e6 if work else float("nan")
        pct = 100 * floor_us / gus if floor_us else float("nan")
        rows.append(dict(section=section, case=name, config=label, graph_us=gus, eager_us=us, rate=rate, unit=unit,
                         floor_us=floor_us, rel=rel, written=ok))
        print(f"{name:>22s} {label:>40s} {gus:9.1f} {us:9.1f} {rate:8.2f} {floor_us or float('nan'):9.1f} {pct:6.0f}% {rel:8.1e}"
              f"{'' if ok else ' UNWRITTEN'}", flush=True)


def header(unit):
    print(f"{'case':>22s} {'config':>40s} {'graph us':>9s} {'eager us':>9s} {unit:>8s} {'floor us':>9s} {'%floor':>7s} {'rel':>8s}")


def decode_section(rows, sweep, floor_bw):
    shapes = [(64, 768, LLAMA), (256, 768, LLAMA), (64, 4352, LLAMA), (256, 4352, LLAMA),
              (8, 16384, LLAMA), (16, 4352, LLAMA), (32, 4352, LLAMA), (256, 768, SMOLLM), (64, 4352, SMOLLM)]
    print(f"\n== decode: one query per request, per-layer time; floor = K/V bytes / {floor_bw / 1e12:.2f} TB/s (the copy rate measured) ==")
    header("TB/s")
    for b, s, shape in shapes:
        case = gpu_case([1] * b, [s] * b, **shape, seed=b + s)
        byt = kv_bytes(case)
        auto = pick_config(b, b, shape["hq"], shape["hkv"], shape["d"], 1, case["block_table"].shape[1] * 16, case["q"].device)
        name = f"B{b} s{s} {shape['hq']}/{shape['hkv']}x{shape['d']}"
        print(f"{'':>22s} auto = {auto}")
        cfgs = [None]
        if sweep:
            sp = auto["num_splits"]
            cfgs += [{"num_splits": sp * 2}] + ([{"num_splits": sp // 2}] if sp > 1 else [])
            cfgs += [{"num_warps": 2}, {"num_stages": 3}, {"num_stages": 4}, {"tile": 32}, {"tile": 128 if auto["tile"] == 64 else 64},
                     {"tile": 128, "num_warps": 8, "num_stages": 3}, {"tile": 32, "num_stages": 4}]
        time_configs(name, case, cfgs, rows, "decode", byt / floor_bw * 1e6, byt)
        # yardsticks: SDPA over a dense copy (the gather not counted), and the gather itself
        hq, _hkv, d = shape["hq"], shape["hkv"], shape["d"]
        if b * s <= 256 * 768 or b <= 16:
            qd = case["q"].view(b, hq, 1, d)
            t = torch.arange(s, device="cuda")
            slots = case["block_table"].long()[:, t // 16] * 16 + t % 16  # (B, s)
            try:
                kd = case["k_cache"][slots].transpose(1, 2).contiguous()  # (B, H_kv, s, D)
                vd = case["v_cache"][slots].transpose(1, 2).contiguous()
                us = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), graph=True)
                rows.append(dict(section="decode", case=name, config="sdpa dense (no gather)", graph_us=us))
                print(f"{name:>22s} {'sdpa on dense copy (gather excluded)':>40s} {us:9.1f} {'':9s} {byt / us / 1e6:8.2f}")
                us = bench(lambda: (case["k_cache"][slots], case["v_cache"][slots]))
                print(f"{name:>22s} {'gather into a dense copy (K and V)':>40s} {us:9.1f}")
                del kd, vd
            except Exception as e:  # noqa: BLE001
                print(f"{name:>22s} sdpa yardstick failed: {type(e).__name__}: {e}")
        if b == 256 and s == 768 and shape is LLAMA:
            # host cost of one call (Python + launch), GPU left to run behind
            out = torch.empty_like(case["q"])
            for _ in range(10):
                paged_attention_triton(**case, out=out)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                paged_attention_triton(**case, out=out)
            host = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            print(f"{name:>22s} {'host time per call (no sync)':>40s} {host:9.1f}")
            rows.append(dict(section="decode", case=name, config="host us per call", us=host))
        del case
        torch.cuda.empty_cache()


def prefill_section(rows, sweep, flops_peak):
    for shape, sname in ((LLAMA, "llama"), (SMOLLM, "smollm")):
        print(f"\n== prefill: 16 requests x 512 new queries over 4096 cached keys ({sname} shape); floor = FLOP / matmul rate ==")
        ql, sl = [512] * 16, [4096 + 512] * 16
        case = gpu_case(ql, sl, **shape, seed=5)
        fl = attn_flops(ql, sl, shape["hq"], shape["d"])
        header("TFLOP/s")
        cfgs = [None]
        if sweep and shape["d"] >= 128:
            cfgs += [{"num_stages": 2}, {"num_stages": 4}, {"tile": 64, "num_warps": 4, "num_stages": 3},
                     {"block_m": 64, "tile": 64, "num_warps": 4, "num_stages": 3}]
        elif sweep:
            cfgs += [{"block_m": 128, "tile": 128, "num_warps": 8, "num_stages": 3},
                     {"block_m": 128, "tile": 64, "num_warps": 4, "num_stages": 3},
                     {"tile": 128}, {"num_stages": 4}, {"num_stages": 2}, {"num_warps": 2},
                     {"block_m": 32, "tile": 64, "num_warps": 2, "num_stages": 3}]
        name = f"16x512/4608 {shape['hq']}/{shape['hkv']}x{shape['d']}"
        time_configs(name, case, cfgs, rows, "prefill", fl / flops_peak * 1e6, fl, "TFLOP/s")
        # yardstick: SDPA flash on a dense copy, bottom-right causal, heads expanded for GQA
        b, h, hkv, d, t = 16, shape["hq"], shape["hkv"], shape["d"], 4608
        qd = case["q"].view(b, 512, h, d).transpose(1, 2).contiguous()
        tt = torch.arange(t, device="cuda")
        slots = case["block_table"].long()[:, tt // 16] * 16 + tt % 16
        kd = case["k_cache"][slots].repeat_interleave(h // hkv, dim=2).transpose(1, 2).contiguous()
        vd = case["v_cache"][slots].repeat_interleave(h // hkv, dim=2).transpose(1, 2).contiguous()
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(512, t)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ref_out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
                us = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask), graph=True)
            rel = rel_err(ref_out.transpose(1, 2).reshape(-1, h, d), oracle(case))
            rows.append(dict(section="prefill", case=name, config="sdpa flash dense", graph_us=us, rate=fl / us / 1e6, rel=rel))
            print(f"{name:>22s} {'sdpa flash, dense copy, causal lower-right':>40s} {us:9.1f} {'':9s} {fl / us / 1e6:8.1f} {'':9s} {'':7s} {rel:8.1e}")
        except Exception as e:  # noqa: BLE001
            print(f"sdpa flash yardstick failed: {type(e).__name__}: {e}")
        del kd, vd, case
        torch.cuda.empty_cache()


def mixed_section(rows, floor_bw):
    print("\n== mixed step: 254 decode requests (seq 100..4000) then 2 prefill chunks of 512 over 2048 cached ==")
    g = torch.Generator().manual_seed(1)
    dec = torch.randint(100, 4000, (254,), generator=g).tolist()
    ql = [1] * 254 + [512, 512]
    sl = dec + [2048 + 512] * 2
    case = gpu_case(ql, sl, **LLAMA, seed=7)
    byt = kv_bytes(case)
    ref = oracle(case)
    out = torch.empty_like(case["q"])
    res = {}
    for label, nd in (("one launch", 0), ("num_decodes=254 (two launches)", 254)):
        out.fill_(float("nan"))
        paged_attention_triton(**case, out=out, num_decodes=nd)
        rel = rel_err(out, ref)
        ok = bool(torch.isfinite(out).all())
        us = bench(lambda: paged_attention_triton(**case, out=out, num_decodes=nd), graph=True)
        res[label] = us
        print(f"  {label:34s} {us:8.1f} us  rel {rel:.1e} written {ok}")
        rows.append(dict(section="mixed", config=label, graph_us=us, rel=rel, written=ok, bytes=byt))
    dcase = gpu_case([1] * 254, dec, **LLAMA, seed=7)
    pcase = gpu_case([512, 512], [2560, 2560], **LLAMA, seed=7)
    ud = bench(lambda: paged_attention_triton(**dcase), graph=True)
    up = bench(lambda: paged_attention_triton(**pcase), graph=True)
    print(f"  decode part alone {ud:.1f} us + prefill part alone {up:.1f} us = {ud + up:.1f} us;"
          f" bandwidth floor of the whole step {byt / floor_bw * 1e6:.1f} us")
    rows.append(dict(section="mixed", config="separate", decode_us=ud, prefill_us=up))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time variants of the launch configuration")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--sections", default="decode,prefill,mixed", help="comma-separated subset of decode,prefill,mixed")
    p.add_argument("--json", default=None, help="write all rows to this file")
    args = p.parse_args()
    import triton

    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    bw, fl = ceilings()
    print(f"measured: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {fl / 1e12:.0f} TFLOP/s")
    rows = [dict(section="ceilings", copy_bw=bw, matmul_flops=fl, device=props.name)]
    if not args.skip_correctness:
        print("\n== correctness: Triton bf16 vs float32 oracle ==")
        worst = correctness(rows)
        print(f"  worst rel error {worst:.3e} ({'PASS' if worst < 1e-2 else 'FAIL'})  [{time.time() - t0:.0f}s]")
    sections = args.sections.split(",")
    if "decode" in sections:
        decode_section(rows, args.sweep, bw)
        print(f"[{time.time() - t0:.0f}s]")
    if "prefill" in sections:
        prefill_section(rows, args.sweep, fl)
    if "mixed" in sections:
        mixed_section(rows, bw)
    print(f"\ndecode floor = bytes / the measured copy rate {bw / 1e12:.2f} TB/s (every visible K/V row read once"
          f" + q + out); total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()

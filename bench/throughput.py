"""Throughput of batchmax against vLLM and HF transformers on one GPU, in one device call (docs/ARCHITECTURE.md, "Benchmarks and workloads").

W1: 128 prompts x 4096 tokens -> 256; W2: 16k-token prompts -> 512. Every configuration runs
on the Llama-3-8B-shaped model with random bf16 weights; EOS is ignored so every request
produces exactly the output length. The peers get the best settings found for them:

- HF static ``generate`` (static batching): batches of ``--static-batch`` (32), its default
  dynamic cache and SDPA attention, greedy, ``min_new_tokens = max_new_tokens`` (no early
  stop). ``cache_implementation="static"`` without ``torch.compile`` measured 2.8x slower
  (1,496 vs 4,199 total tok/s on W1, H100) and compiling costs minutes per shape, so it is
  not used.
- HF ``generate_batch`` (continuous batching, paged attention, its default CUDA-graph
  warm-up), greedy.
- vLLM (``--peers vllm``): ``vllm.LLM`` in a process of its own on the same prompts
  (``bench/vllm_peer.py`` says its settings: defaults, prefix caching off).

``--kv-gib G`` caps the KV pool of batchmax (``num_tokens``) and of vLLM
(``kv_cache_memory_bytes``) at the same G GiB: a card whose memory is short of the workload
(~6 GiB: a 24 GB card serving the 8B model in bf16; ~28: a 48 GB card; ~60: an 80 GB card).

Slow peers run on a stated subset of the prompts (``--peer-prompts``). Each line has total and
output tok/s, the largest running batch, peak GPU memory, the ratio to each peer, and the
roofline time: prefill at the measured bf16 matmul rate plus decode at the measured copy
bandwidth (weights once per decode step of each wave, plus every request's kept K/V).

    python -m bench.throughput --workload W1 --configs full snapkv@512 snapkv@1024 snapkv@512+recall
    python -m bench.throughput --workload W2 --num-prompts 96 --configs full snapkv@1024 --peer-prompts 8 --static-batch 8

``--structured-schema builtin|FILE`` constrains every batchmax request to one JSON schema
(grammar-constrained decoding, ``engine/structured_output.py``): ``builtin`` is
``BUILTIN_SCHEMA``, an array of at least 64 records that no output of 256 or 512 tokens
completes, so every request still produces exactly the output length; a FILE's schema may end
outputs early (their real token count is reported). The shape-only model has no tokenizer:
the grammar is built over ``--structured-tokenizer`` (default: the default model's, vocab
49,152; the model's other rows are masked as padding). The peers run unconstrained. Without
the option nothing changes.

Appends JSON lines to ``--json``; ``--plot`` draws tok/s against budget and running batch
from every line of that file (matplotlib); ``--plot-kv`` draws tok/s against KV memory for both
systems (the ``--kv-gib`` runs, and uncapped ones as "whole GPU") and prints that table with
batchmax's ratio to vLLM at each size:

    python -m bench.throughput --workload W2 --num-prompts 192 --configs snapkv@512 --peers vllm --kv-gib 6 --json kv.jsonl
    python -m bench.throughput --configs --json kv.jsonl --plot-kv kv.png
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch

from bench import append_jsonl
from bench.models import LLAMA3_8B, SHAPES, shape_only_model

SHAPE = LLAMA3_8B
"""The model shape the run uses (``--model-shape``)."""

WORKLOADS = {"W1": (128, 4096, 256), "W2": (96, 16384, 512)}
BUILTIN_SCHEMA = {
    "type": "array", "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
            "name": {"type": "string", "maxLength": 16},
            "active": {"type": "boolean"},
            "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["id", "name", "active", "score", "tags"],
        "additionalProperties": False,
    },
}
"""``--structured-schema builtin``: records of typical API fields; at least 64 of them (well
over 512 tokens), so the grammar never ends an output before ``max_tokens``."""


def structured_schema(spec: str | None) -> dict | None:
    """``builtin``, a JSON schema file, or None (unconstrained)."""
    if spec is None:
        return None
    if spec == "builtin":
        return BUILTIN_SCHEMA
    with open(spec) as f:
        return json.load(f)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- the device's two ceilings --------------------------------------------------------------

def measure_ceilings() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s), measured once: 8192^3 GEMM and a 2 GiB copy."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192**3 / (do_bench(lambda: a @ b, rep=200, return_mode="median") * 1e-3)
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src), rep=200, return_mode="median") * 1e-3)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return flops, bw


def roofline_s(n: int, prompt: int, out: int, kept: int | None, batch: int, flops: float, bw: float) -> float:
    """Lower bound of the run: prefill compute-bound; each decode step bound by its products
    (reading the weights, or their arithmetic if that takes longer) plus reading the K/V.

    Prefill: 2 x params FLOPs per token plus attention (4 x layers x heads x head_dim per
    query-key pair, causal; with a budget the chunk sees at most budget + chunk keys, bounded
    here by ``kept``). Decode: each step of each wave reads the weights once, or spends
    2 x params x rows FLOPs on them where that is longer (at 256 rows on an H200, whose
    matmul rate over copy bandwidth is ~185 FLOP/byte, it is), and reads every running
    request's K/V (kept + generated so far)."""
    c = SHAPE
    L, hq, hkv, hd, hidden = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["hidden_size"]
    params = (hidden * (hq + 2 * hkv) * hd + hq * hd * hidden + 3 * hidden * c["intermediate_size"]) * L + 2 * c["vocab_size"] * hidden
    matmul_params = params - c["vocab_size"] * hidden  # the input embedding is a lookup
    pairs = prompt * (prompt + 1) / 2 if kept is None else prompt * min(prompt, kept)
    prefill_flop = n * (2 * params * prompt + 4 * L * hq * hd * pairs)
    kv_token = L * hkv * hd * 2 * 2  # bytes: K and V, bf16
    held = prompt if kept is None else min(prompt, kept)
    batch = max(1, min(batch, n))
    waves = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    weights_s = sum(out * max(2 * params / bw, 2 * matmul_params * rows / flops) for rows in waves)
    kv_bytes = n * kv_token * (out * held + out * (out + 1) / 2)
    return prefill_flop / flops + weights_s + kv_bytes / bw


# ---- runners --------------------------------------------------------------------------------

def parse_config(s: str) -> dict:
    """``full``, ``snapkv@512``, ``snapkv@512+recall``."""
    recall = s.endswith("+recall")
    s = s.removesuffix("+recall")
    policy, _, budget = s.partition("@")
    return dict(name=s + ("+recall" if recall else ""), policy=policy, budget=int(budget) if budget else None, recall=recall)


def kv_token_bytes() -> int:
    """K and V of one token in every layer, bf16 (128 KiB for the 8B shape)."""
    c = SHAPE
    return c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2 * 2


def kv_token_bytes_per_rank(tp: int) -> int:
    """One rank's share of ``kv_token_bytes`` (its KV heads; replicated past the KV heads)."""
    c = SHAPE
    return kv_token_bytes() * max(1, c["num_key_value_heads"] // tp) // c["num_key_value_heads"]


def run_vllm(prompts, out_len: int, a) -> dict:
    """vLLM in a subprocess (it owns the GPU while it runs; this process holds nothing then)."""
    import os
    import subprocess
    import sys
    import tempfile

    folder = tempfile.mkdtemp(prefix="batchmax-vllm-")
    with open(os.path.join(folder, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    cmd = [sys.executable, "-m", "bench.vllm_peer", "--model", shape_only_model(SHAPE), "--prompts", os.path.join(folder, "prompts.json"),
           "--output-len", str(out_len), "--max-model-len", str(len(prompts[0]) + out_len)]
    if a.kv_gib:
        cmd += ["--kv-bytes", str(int(a.kv_gib * 2**30))]
    cmd += ["--tensor-parallel-size", str(a.tensor_parallel_size)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"vLLM exited with {r.returncode}: {r.stderr[-3000:]}")
    from bench.vllm_peer import MARK

    lines = [x for x in r.stdout.splitlines() if x.startswith(MARK)]
    if not lines:
        raise RuntimeError(f"vLLM printed no result line; its output ends: {(r.stdout + r.stderr)[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def run_batchmax(cfg: dict, prompts, out_len: int, a, model: str | None = None) -> dict:
    """``model``: another model folder (default: the Llama-3-8B shape; tests pass a tiny one
    to run this on the CPU)."""
    from batchmax.engine import LLM, SamplingParams
    from batchmax.engine.sampling import StructuredOutputsParams

    schema = structured_schema(a.structured_schema)
    so = None if schema is None else StructuredOutputsParams(json=schema)
    if so is None:
        tok = dict(skip_tokenizer_init=True)
    else:  # the grammar needs a tokenizer; outputs stay token ids (no detokenizing in the timed loop)
        from batchmax.engine.default_model import default_model_dir

        tok = dict(tokenizer=str(a.structured_tokenizer or default_model_dir()), detokenize=False)

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, structured_outputs=so)

    cuda = torch.cuda.is_available()
    tp = a.tensor_parallel_size
    # --kv-gib caps each GPU's pool (with TP, a rank holds its share of the KV heads)
    pool = dict(num_tokens=int(a.kv_gib * 2**30) // kv_token_bytes_per_rank(tp)) if a.kv_gib else {}
    llm = LLM(model or shape_only_model(SHAPE), load_format="dummy", **pool, **tok, chunk_size=a.chunk, tensor_parallel_size=tp,
              max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, kv_policy=cfg["policy"],
              kv_budget=cfg["budget"], kv_recall=cfg["recall"], host_kv_tokens=a.host_kv_tokens if cfg["recall"] else None,
              max_model_len=len(prompts[0]) + out_len + a.chunk, fused_ops=a.fused_ops, async_scheduling=a.async_scheduling,
              cuda_graph_max_batch=max(256, a.max_num_seqs))  # every decode batch the run can reach has a graph
    # warm-up on the workload's own shapes: full chunks for a step's worth of requests, so
    # eviction, parking and recall run and every Triton kernel variant the run needs is
    # compiled before the clock starts (a 64-token warm-up left that to the first timed
    # configuration of each process: W1 snapkv@512 measured 16,557 tok/s first, 19,476 later)
    n_warm = min(len(prompts), max(1, a.max_num_batched_tokens // a.chunk))
    # (with a schema, the warm-up also compiles it: the timed run takes it from the LRU)
    llm.generate([p[: 3 * a.chunk] for p in prompts[:n_warm]], params(8))
    _sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eng = llm.engine
    eng.reset_peak_running_batch()
    fallbacks0 = eng.stats().num_recall_fallbacks_total
    # caching-allocator frees + retries (each syncs)
    retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params(out_len), use_tqdm=a.progress)
    _sync()
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.token_ids) for o in outs)
    if schema is None or a.structured_schema == "builtin":
        assert produced == len(prompts) * out_len, "every request produces exactly the output length"
    st = eng.stats()
    res = dict(system="batchmax", config=cfg["name"] + (f" +json:{a.structured_schema}" if so else ""), prompts=len(prompts),
               elapsed_s=elapsed, out_tokens=produced, structured_schema=a.structured_schema,
               peak_batch=st.peak_running_batch_size, peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
               recall_fallbacks=st.num_recall_fallbacks_total - fallbacks0, kv_pool_tokens=eng.cache.capacity_tokens,
               budget=cfg["budget"], recall=cfg["recall"], fused_ops=eng.runner.fused_ops, async_scheduling=eng.async_scheduling,
               chunk=a.chunk, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
               alloc_retries=(torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0) - retries0)
    res.update(tensor_parallel_size=tp, model_shape=a.model_shape)
    llm.shutdown()
    del llm, eng, outs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def _hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in SHAPE.items() if k not in ("architectures", "model_type", "dtype")})
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config,  # noqa: SLF001 - HF's random-init constructor
                                               dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():  # random weights, as for batchmax (no checkpoint on this machine)
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    return model.eval()


def run_hf_static(model, prompts, out_len: int, batch: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    warm = torch.tensor([prompts[0][:64]], device="cuda")
    model.generate(warm, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    produced = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                             pad_token_id=0)
        produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    torch.cuda.synchronize()
    return dict(system="hf-static-generate", config=f"batch {batch}, dynamic cache, sdpa", prompts=len(prompts),
                elapsed_s=time.perf_counter() - t0, out_tokens=produced, peak_batch=batch, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


def run_hf_generate_batch(model, prompts, out_len: int) -> dict:
    from transformers import GenerationConfig

    gc_ = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=[prompts[0][:64]], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gc_)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    produced = sum(len(r.generated_tokens) for r in res.values())
    return dict(system="hf-generate_batch", config="continuous batching, defaults", prompts=len(prompts), elapsed_s=elapsed,
                out_tokens=produced, peak_batch=None, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


# ---- report ---------------------------------------------------------------------------------

def finish(r: dict, prompt: int, out: int, flops: float, bw: float) -> dict:
    n = r["prompts"]
    r["prompt_len"], r["output_len"] = prompt, out
    r["total_tok_s"] = (n * prompt + r["out_tokens"]) / r["elapsed_s"]
    r["output_tok_s"] = r["out_tokens"] / r["elapsed_s"]
    kept = r.get("budget") if r["system"] == "batchmax" else None
    r["roofline_s"] = roofline_s(n, prompt, out, kept, r["peak_batch"] or n, flops, bw)
    r["roofline_tok_s"] = (n * (prompt + out)) / r["roofline_s"]
    return r


def table(rows: list[dict]) -> str:
    peers = [r for r in rows if r["system"].startswith("hf-") or r["system"] == "vllm"]
    head = "| system | config | prompts | total tok/s | output tok/s | peak batch | peak GB | roofline tok/s (% reached) |"
    head += "".join(f" vs {p['system']} |" for p in peers)
    lines = [head, "|---" * (8 + len(peers)) + "|"]
    for r in rows:
        line = (f"| {r['system']} | {r['config']} | {r['prompts']} | {r['total_tok_s']:,.0f} | {r['output_tok_s']:,.0f} | "
                f"{r['peak_batch'] if r['peak_batch'] is not None else '-'} | {r['peak_gb'] or 0:.1f} | "
                f"{r['roofline_tok_s']:,.0f} ({100 * r['total_tok_s'] / r['roofline_tok_s']:.0f}%) |")
        line += "".join(f" {r['total_tok_s'] / p['total_tok_s']:.2f}x |" for p in peers)
        lines.append(line)
    return "\n".join(lines)


def plot(json_path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(json_path)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for wl, marker in (("W1", "o"), ("W2", "s")):
        sel = [r for r in rows if r.get("workload") == wl and r["system"] != "batchmax-cold-start"]
        for r in sel:
            label = f"{wl} {r['system']} {r['config']}"
            x = r.get("budget") or (r["prompt_len"] + r["output_len"])
            color = "C0" if r["system"] == "batchmax" and not r.get("recall") else "C1" if r["system"] == "batchmax" else "C3"
            axes[0].scatter([x], [r["total_tok_s"]], marker=marker, color=color)
            axes[0].annotate(label, (x, r["total_tok_s"]), fontsize=6)
            if r["peak_batch"]:
                axes[1].scatter([r["peak_batch"]], [r["output_tok_s"]], marker=marker, color=color)
                axes[1].annotate(label, (r["peak_batch"], r["output_tok_s"]), fontsize=6)
    axes[0].set(xscale="log", xlabel="KV budget per request (tokens; full cache: prompt + output)", ylabel="total tok/s")
    axes[1].set(xlabel="largest running batch", ylabel="output tok/s")
    fig.suptitle("Llama-3-8B shape, random bf16 weights (o: W1 4096->256, s: W2 16k->512; red: HF peers)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=130)


WHOLE = "whole GPU"
"""The KV column of uncapped runs (each system sized its pool to what fits: ~109-112 GiB of
KV on an H200 for the 8B shape, a little different per system and configuration)."""


def kv_point(r: dict) -> tuple[float | str, float] | None:
    """(column, GiB) of a run's KV memory: its cap, or ``WHOLE`` and the pool it sized."""
    if r.get("kv_gib"):
        return r["kv_gib"], r["kv_gib"]
    if r.get("kv_pool_tokens"):
        return WHOLE, r["kv_pool_tokens"] * kv_token_bytes() / 2**30
    return None


def kv_series(rows: list[dict], workload: str) -> dict[str, dict[float | str, tuple[float, float]]]:
    """Per system and config, per KV column: (GiB, tok/s) from every run of ``workload``
    (W1: total tok/s, W2: output tok/s, as issue 18's targets; the last run of a column wins)."""
    key = "total_tok_s" if workload == "W1" else "output_tok_s"
    out: dict[str, dict[float | str, tuple[float, float]]] = {}
    for r in rows:
        if r.get("workload") != workload or r["system"] == "batchmax-cold-start" or r.get("structured_schema"):
            continue
        pt = kv_point(r)
        if pt is not None:
            out.setdefault(f"{r['system']} {r['config']}", {})[pt[0]] = (pt[1], r[key])
    return out


def _columns(series: dict) -> list[float | str]:
    cols = {c for pts in series.values() for c in pts}
    return sorted(c for c in cols if c != WHOLE) + ([WHOLE] if WHOLE in cols else [])


def kv_table(rows: list[dict], workload: str) -> str:
    """Markdown: each system's tok/s at each KV size, and batchmax's ratio to vLLM there."""
    series = kv_series(rows, workload)
    cols = _columns(series)
    vllm = next((pts for name, pts in series.items() if name.startswith("vllm")), {})
    unit = "total tok/s" if workload == "W1" else "output tok/s"
    head = " | ".join(c if c == WHOLE else f"{c:g} GiB" for c in cols)
    lines = [f"| {workload}, {unit}, KV memory | {head} |", "|---" * (len(cols) + 1) + "|"]
    for name, pts in series.items():
        cells = []
        for c in cols:
            if c not in pts:
                cells.append("-")
            elif name.startswith("vllm") or c not in vllm:
                cells.append(f"{pts[c][1]:,.0f}")
            else:
                cells.append(f"{pts[c][1]:,.0f} ({pts[c][1] / vllm[c][1]:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_kv(json_path: str, png: str) -> None:
    """Throughput against KV memory, both systems, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(json_path)]
    workloads = [wl for wl in ("W1", "W2") if kv_series(rows, wl)]  # a panel only where a run landed
    if not workloads:
        raise SystemExit(f"--plot-kv: no --kv-gib run in {json_path}")
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        for name, pts in kv_series(rows, wl).items():
            xs, ys = zip(*(pts[c] for c in _columns({name: pts})))
            ax.plot(xs, ys, marker="o", linestyle="--" if name.startswith("vllm") else "-", label=name)
        ax.set(xscale="log", xlabel="KV cache memory (GiB)", ylabel="total tok/s" if wl == "W1" else "output tok/s",
               title=f"{wl} ({'128 x 4096 -> 256' if wl == 'W1' else '16,384 -> 512'})")
        ax.legend(fontsize=7)
    fig.suptitle("Llama-3-8B shape, random bf16 weights: batchmax and vLLM with the same KV memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=130)


def draw(a: argparse.Namespace) -> None:
    """``--plot`` and ``--plot-kv`` (with its tables) from every line of ``--json``."""
    if a.plot:
        plot(a.json, a.plot)
    if a.plot_kv:
        plot_kv(a.json, a.plot_kv)
        rows = [json.loads(x) for x in open(a.json)]
        for wl in ("W1", "W2"):
            if kv_series(rows, wl):
                print(kv_table(rows, wl) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=list(WORKLOADS), default="W1")
    p.add_argument("--model-shape", choices=list(SHAPES), default="8b", help="Llama-3 shape (random bf16 weights)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="batchmax over N GPUs (one process each); the rooflines use N GPUs' aggregate ceilings")
    p.add_argument("--num-prompts", type=int, default=None, help="default: 128 (W1), 96 (W2)")
    p.add_argument("--configs", nargs="*", default=["full", "snapkv@512", "snapkv@1024"])
    p.add_argument("--peers", nargs="*", default=["static", "generate_batch"], choices=["static", "generate_batch", "vllm"])
    p.add_argument("--kv-gib", type=float, default=None, help="cap batchmax's and vLLM's KV pools at this many GiB (default: what fits)")
    p.add_argument("--peer-prompts", type=int, default=32, help="the subset the HF peers run (the first N prompts)")
    p.add_argument("--batch-peer-prompts", type=int, default=None, help="subset for generate_batch (default: --peer-prompts)")
    p.add_argument("--static-batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--warmup-prompts", type=int, default=None,
                   help="discarded pass of the first configuration on this many prompts before the timed runs (default: all for W1, none for W2)")
    p.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="Triton RMSNorm/RoPE/SiLU kernels (default: with the Triton attention)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch step n+1 before reading step n's tokens (default: on with CUDA)")
    p.add_argument("--host-kv-tokens", type=int, default=131072, help="recall's host store, tokens per layer (W1 needs ~17 requests x 3,584 parked at once: 65,536 let a few fall back)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG from every line of --json (no run when --configs is empty)")
    p.add_argument("--plot-kv", default=None, metavar="PNG",
                   help="throughput against KV memory from every line of --json (after this run's), and its table (no run when --configs is empty)")
    p.add_argument("--structured-schema", default=None, metavar="builtin|FILE",
                   help="constrain every batchmax request to this JSON schema (builtin: BUILTIN_SCHEMA); default: unconstrained")
    p.add_argument("--structured-tokenizer", default=None, help="tokenizer folder for the grammar (default: the default model's)")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    global SHAPE
    SHAPE = SHAPES[a.model_shape]
    if (a.plot or a.plot_kv) and not a.configs:
        draw(a)
        return
    n, prompt, out = WORKLOADS[a.workload]
    n = a.num_prompts or n
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, SHAPE["vocab_size"] - 1000) for _ in range(prompt)] for _ in range(n)]
    flops, bw = measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {flops / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s", flush=True)
    flops, bw = flops * a.tensor_parallel_size, bw * a.tensor_parallel_size  # ideal scaling: the bound
    rows = []
    vllm_rows = []
    if "vllm" in a.peers:  # first, while this process holds no more than its CUDA context
        try:
            vllm_rows.append(finish(run_vllm(prompts, out, a), prompt, out, flops, bw))
            print(json.dumps(vllm_rows[-1]), flush=True)
        except Exception as e:  # a peer's failure must not lose batchmax's numbers
            print(f"peer vllm failed: {type(e).__name__}: {e}", flush=True)
    warm_n = (n if a.workload == "W1" else 0) if a.warmup_prompts is None else a.warmup_prompts
    if warm_n and a.configs:
        # Triton compiles a kernel variant the first time a launch configuration appears (split
        # counts, query blocks: they follow the batch and chunk shapes), so the first
        # configuration of a process paid seconds of compiles that the later ones did not
        # (W1, H100: snapkv@512 17,451 tok/s first, 29,795 third). A discarded pass of the
        # first configuration compiles them for all; its figure is kept as the cold start.
        r = run_batchmax(parse_config(a.configs[0]), prompts[:warm_n], out, a)
        r = dict(finish(r, prompt, out, flops, bw), system="batchmax-cold-start")
        print(json.dumps(r), flush=True)
        cold = r
    for c in a.configs:
        rows.append(finish(run_batchmax(parse_config(c), prompts, out, a), prompt, out, flops, bw))
        print(json.dumps(rows[-1]), flush=True)
    rows += vllm_rows
    hf = [x for x in a.peers if x != "vllm"]
    if hf:
        model = _hf_model()
        for peer in hf:
            try:
                if peer == "static":
                    r = run_hf_static(model, prompts[: a.peer_prompts], out, a.static_batch)
                else:
                    r = run_hf_generate_batch(model, prompts[: a.batch_peer_prompts or a.peer_prompts], out)
                rows.append(finish(r, prompt, out, flops, bw))
                print(json.dumps(rows[-1]), flush=True)
            except Exception as e:  # a peer's failure must not lose batchmax's numbers
                print(f"peer {peer} failed: {type(e).__name__}: {e}", flush=True)
    if warm_n and a.configs:
        rows.append(cold)  # last: the table's ratios stay against the peers
    for r in rows:
        r.update(workload=a.workload, device=torch.cuda.get_device_name(), torch=torch.__version__,
                 matmul_tflops=flops / 1e12, copy_tbs=bw / 1e12, date=time.strftime("%Y-%m-%d"))
    kv = f", KV capped at {a.kv_gib:g} GiB" if a.kv_gib else ""
    for r in rows:
        r["kv_gib"] = a.kv_gib
    print(f"\n{a.workload}: {n} x {prompt} -> {out} (HF peers on the first {a.peer_prompts} prompts{kv})\n" + table(rows))
    append_jsonl(a.json, *rows)
    draw(a)


if __name__ == "__main__":
    main()

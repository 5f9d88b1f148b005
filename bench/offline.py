"""Offline throughput: N prompts x prompt length -> output length through ``LLM.generate``.

EOS is ignored so every request generates exactly ``--output-len`` tokens. Prints total and
output tokens/s, the largest running batch and peak memory; ``--json`` appends the result.

    python -m bench.offline --model llama3-8b --num-prompts 64 --prompt-len 4096 --output-len 256
    python -m bench.offline --model /path/to/hf/dir --device cpu --num-prompts 8 --prompt-len 256 --output-len 32
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import time

import torch

from batchmax.engine import LLM, SamplingParams
from bench import append_jsonl
from bench.models import LLAMA3_8B, shape_only_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", help="'llama3-8b' (random bf16 weights of that shape) or a local HF dir")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-tokens", type=int, default=None, help="pool capacity in tokens (default: from free memory)")
    p.add_argument("--kv-policy", default="full")
    p.add_argument("--kv-budget", type=int, default=None)
    p.add_argument("--kv-recall", action="store_true", help="park evicted prefill K/V in host memory, re-select at the last chunk")
    p.add_argument("--host-kv-tokens", type=int, default=None, help="recall's host store capacity (tokens per layer)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    dummy = a.model == "llama3-8b"
    model = shape_only_model(LLAMA3_8B) if dummy else a.model
    t0 = time.perf_counter()
    llm = LLM(
        model,
        load_format="dummy" if dummy else "auto",
        skip_tokenizer_init=dummy,
        device=a.device,
        dtype=a.dtype,
        chunk_size=a.chunk,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        num_tokens=a.kv_tokens,
        kv_policy=a.kv_policy,
        kv_budget=a.kv_budget,
        kv_recall=a.kv_recall,
        host_kv_tokens=a.host_kv_tokens,
        attention_backend=a.attention_backend,
    )
    load_s = time.perf_counter() - t0
    eng = llm.engine
    device = eng.runner.device
    vocab = eng.runner.spec.vocab_size
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(a.prompt_len)] for _ in range(a.num_prompts)]
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)

    # warm-up: kernels, allocator, autotuning stay out of the timing
    llm.generate([prompts[0][:64]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    eng.reset_peak_running_batch()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == a.output_len for o in outs)
    st = eng.stats()
    out_tokens = a.num_prompts * a.output_len
    total_tokens = a.num_prompts * (a.prompt_len + a.output_len)
    peak_gb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    result = dict(
        model=a.model,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        num_prompts=a.num_prompts,
        prompt_len=a.prompt_len,
        output_len=a.output_len,
        chunk=a.chunk,
        kv_policy=a.kv_policy,
        kv_budget=a.kv_budget,
        kv_recall=a.kv_recall,
        attention=("triton" if eng.runner.fused else "torch"),
        recall_fallbacks=st.num_recall_fallbacks_total,
        kv_pool_tokens=eng.cache.capacity_tokens,
        load_s=round(load_s, 1),
        elapsed_s=round(elapsed, 2),
        total_tok_s=round(total_tokens / elapsed, 1),
        output_tok_s=round(out_tokens / elapsed, 1),
        peak_running_batch=st.peak_running_batch_size,
        peak_memory_gb=round(peak_gb, 2),
        steps=st.num_steps_total,
    )
    print(
        f"\n{a.num_prompts} x {a.prompt_len} -> {a.output_len} on {result['device']} ({a.kv_policy}"
        f"{'@' + str(a.kv_budget) if a.kv_budget else ''}{' + recall' if a.kv_recall else ''}): {elapsed:.1f} s, "
        f"total {result['total_tok_s']:,.0f} tok/s, output {result['output_tok_s']:,.0f} tok/s, "
        f"peak running batch {result['peak_running_batch']}, peak memory {result['peak_memory_gb']:.1f} GB"
    )
    print(json.dumps(result))
    append_jsonl(a.json, result)
    return result


if __name__ == "__main__":
    main()

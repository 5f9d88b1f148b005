"""One decode step at a fixed batch, batchmax against vLLM, measured the same way for both.

``--batch`` prompts of ``--prompt-len`` random token ids (full cache, greedy, EOS ignored)
generate ``L1`` tokens, then, in a second run, ``L2``. The second run does the same prefill
and the same first ``L1`` steps plus ``L2 - L1`` decode steps of the whole batch, so

    step = (t(L2) - t(L1)) / (L2 - L1)

is one decode step at that batch, each request holding prompt + (L1 + L2) / 2 tokens on
average; prefill, start-up and warm-up cancel out. Each length runs ``--repeats`` times,
alternating, and the medians are used. vLLM runs in its own process (``bench/vllm_peer.py
--decode-lens``) on the same prompts, after batchmax, in the same call.

    python -m bench.decode_step --batch 256 --prompt-len 700 --lens 16 144 --peers vllm

Issue 18 asks for batch 256 with ~780 tokens each: 700 + (16 + 144) / 2 = 780.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from bench import append_jsonl
from bench.models import SHAPES, shape_only_model


def decode_step_s(times: dict[int, list[float]], l1: int, l2: int) -> float:
    """Seconds of one decode step from the timed runs at each length (medians)."""
    return (statistics.median(times[l2]) - statistics.median(times[l1])) / (l2 - l1)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(prompt_len)] for _ in range(batch)]


def time_lengths(generate, l1: int, l2: int, repeats: int) -> dict[int, list[float]]:
    """``generate(n)`` runs the whole batch to ``n`` tokens and returns when it is done."""
    generate(l1)  # warm-up: compiles, graphs, allocator
    times: dict[int, list[float]] = {l1: [], l2: []}
    for _ in range(repeats):
        for n in (l1, l2):
            t0 = time.perf_counter()
            generate(n)
            times[n].append(time.perf_counter() - t0)
    return times


def run_batchmax(prompts: list[list[int]], l1: int, l2: int, a, model: str) -> dict:
    import torch

    from batchmax.engine import LLM, SamplingParams

    llm = LLM(model, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=len(prompts),
              max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=len(prompts[0]) + l2 + 16,
              cuda_graph_max_batch=max(256, len(prompts)))

    def generate(n: int) -> None:
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        assert all(len(o.token_ids) == n for o in outs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times = time_lengths(generate, l1, l2, a.repeats)
    llm.shutdown()
    return dict(system="batchmax", times=times)


def run_vllm(prompts: list[list[int]], l1: int, l2: int, a, model: str) -> dict:
    from bench.vllm_peer import MARK

    folder = tempfile.mkdtemp(prefix="batchmax-vllm-")
    with open(os.path.join(folder, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    cmd = [sys.executable, "-m", "bench.vllm_peer", "--model", model, "--prompts", os.path.join(folder, "prompts.json"),
           "--output-len", str(l2), "--max-model-len", str(len(prompts[0]) + l2 + 16),
           "--decode-lens", str(l1), str(l2), "--repeats", str(a.repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith(MARK)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM exited with {r.returncode}: {(r.stdout + r.stderr)[-3000:]}")
    res = json.loads(lines[-1][len(MARK):])
    return dict(system="vllm", times={int(k): v for k, v in res["times"].items()})


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=700)
    p.add_argument("--lens", type=int, nargs=2, default=[16, 144], metavar=("L1", "L2"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model-shape", choices=list(SHAPES), default="8b")
    p.add_argument("--model", default=None, help="a model folder instead of the shape (tests: a tiny one on the CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--peers", nargs="*", default=[], choices=["vllm"])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    l1, l2 = a.lens
    if not 0 < l1 < l2:
        p.error("--lens L1 L2 needs 0 < L1 < L2")
    model = a.model or shape_only_model(SHAPES[a.model_shape])
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    prompts = make_prompts(a.batch, a.prompt_len, vocab)
    # vLLM first: it sizes its pool from the memory free when it starts, and this process keeps the
    # batchmax engine's memory cached after its run.
    runs = [run_vllm(prompts, l1, l2, a, model)] if "vllm" in a.peers else []
    runs.insert(0, run_batchmax(prompts, l1, l2, a, model))
    ctx = a.prompt_len + (l1 + l2) / 2
    rows = []
    print(f"decode step at batch {a.batch}, ~{ctx:.0f} tokens per request (prompt {a.prompt_len}, lengths {l1} and {l2}, "
          f"{a.repeats} runs each, medians)")
    print("| system | t(L1) s | t(L2) s | decode step (ms) | vs vllm |\n|---|---|---|---|---|")
    steps = {r["system"]: decode_step_s(r["times"], l1, l2) for r in runs}
    for r in runs:
        s = steps[r["system"]]
        ratio = f"{steps['vllm'] / s:.2f}x" if "vllm" in steps else "-"
        print(f"| {r['system']} | {statistics.median(r['times'][l1]):.3f} | {statistics.median(r['times'][l2]):.3f} | {s * 1e3:.2f} | {ratio} |")
        rows.append(dict(system=r["system"], batch=a.batch, prompt_len=a.prompt_len, lens=[l1, l2], mean_context=ctx,
                         times={str(k): v for k, v in r["times"].items()}, decode_step_ms=s * 1e3))
    append_jsonl(a.json, *rows)
    return rows


if __name__ == "__main__":
    main()

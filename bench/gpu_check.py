"""CUDA vs CPU agreement of the engine's eviction and recall paths (float32, tiny model).

    python -m bench.gpu_check

Greedy tokens of a tiny random Llama (GQA) must match between devices for every policy,
with and without recall, chunked; the fused path with CUDA graphs must match it without, and
async scheduling (inputs read from the previous step's sampled ids on the device) must match
the synchronous engine; prints a table and exits non-zero on a mismatch.
"""
from __future__ import annotations

import sys
import tempfile

import torch

from batchmax.engine import LLM, SamplingParams
from tests.helpers import random_prompts
from tests.tiny_models import build_tiny_model


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    path = build_tiny_model(tempfile.mkdtemp(), "llama", max_position_embeddings=4096)
    prompts = random_prompts([400, 257, 130, 33, 1], seed=5)
    bad = 0
    for policy in ["full", "snapkv", "h2o", "tova", "pyramid", "knorm"]:
        for recall in ([False] if policy == "full" else [False, True]):
            outs = {}
            variants = (("cpu", "torch", False, False), ("cuda", "torch", False, False), ("cuda", "triton", False, False),
                        ("cuda", "triton", True, False), ("cuda", "triton", True, True))
            for dev, backend, graphs, async_ in variants:
                llm = LLM(str(path), device=dev, dtype="float32", skip_tokenizer_init=True, chunk_size=64, num_tokens=8192,
                          kv_policy=policy, kv_budget=None if policy == "full" else 96, kv_recall=recall, host_kv_tokens=4096,
                          attention_backend=backend, cuda_graphs=graphs, async_scheduling=async_)
                res = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
                outs[dev, backend, graphs, async_] = [o.token_ids for o in res]
                assert llm.engine.cache.usage == 0.0
            agree = lambda a, b: sum(x == y for x, y in zip(outs[a], outs[b]))  # noqa: E731
            same = agree(("cpu", "torch", False, False), ("cuda", "torch", False, False))
            fused = agree(("cpu", "torch", False, False), ("cuda", "triton", False, False))
            graphed = agree(("cuda", "triton", False, False), ("cuda", "triton", True, False))
            asynced = agree(("cuda", "triton", True, False), ("cuda", "triton", True, True))
            bad += same != len(prompts) or graphed != len(prompts) or asynced != len(prompts)
            print(f"{policy:8s} recall={recall!s:5s} cpu==cuda(torch) {same}/{len(prompts)}  cpu==cuda(triton) {fused}/{len(prompts)}"
                  f"  cuda(triton)==cuda(triton+graphs) {graphed}/{len(prompts)}  sync==async {asynced}/{len(prompts)}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

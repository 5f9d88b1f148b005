"""vLLM as a peer of ``bench/throughput.py``: the same token-id prompts through
``vllm.LLM`` in a process of its own (``python -m bench.vllm_peer``), with the Llama shape
and random weights (``load_format="dummy"``), no tokenizer, greedy, EOS ignored.

Settings: vLLM 0.26's defaults for ``LLM`` (chunked prefill, CUDA graphs, torch.compile,
async scheduling, 0.9 of the GPU's memory) except prefix caching, which is off (the prompts
share no prefix, but its hashing is work batchmax does not do), and the KV pool when
``--kv-bytes`` caps it (``kv_cache_memory_bytes``). One warm-up ``generate`` on the workload's
shapes runs before the timed one. Prints one line, ``MARK`` + JSON: what ``throughput.finish`` takes.

``--decode-lens L1 L2`` times the prompts to L1 and to L2 tokens instead (``--repeats`` each,
alternating) for ``bench/decode_step.py``, which takes the decode step from the difference.
"""
from __future__ import annotations

import argparse
import json
import time

MARK = "VLLM_PEER_RESULT "
"""Starts the result's line: vLLM writes its own lines to stdout too, before and after it."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a folder with the shape's config.json")
    p.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--kv-bytes", type=int, default=None)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--decode-lens", type=int, nargs=2, default=None, metavar=("L1", "L2"))
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    from vllm import LLM, SamplingParams, TokensPrompt

    prompts = json.load(open(a.prompts))
    kw = dict(kv_cache_memory_bytes=a.kv_bytes) if a.kv_bytes else {}
    llm = LLM(model=a.model, load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=False,
              max_model_len=a.max_model_len, dtype="bfloat16", tensor_parallel_size=a.tensor_parallel_size, **kw)
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    warm = [TokensPrompt(prompt_token_ids=pr) for pr in prompts[: min(len(prompts), 16)]]
    llm.generate(warm, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False), use_tqdm=False)
    import torch

    torch.cuda.synchronize()
    if a.decode_lens:
        return _decode_lens(llm, prompts, a.decode_lens, a.repeats)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=pr) for pr in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    sched = llm.llm_engine.vllm_config.scheduler_config  # the defaults vLLM chose for this GPU, on the record
    print(MARK + json.dumps(dict(system="vllm", config="0.26 defaults, prefix caching off", prompts=len(prompts), elapsed_s=elapsed,
                          out_tokens=produced, peak_batch=None, peak_gb=None,
                          kv_pool_tokens=blocks * cache.block_size if blocks else None,
                          max_num_batched_tokens=getattr(sched, "max_num_batched_tokens", None),
                          max_num_seqs=getattr(sched, "max_num_seqs", None))))
    return 0


def _decode_lens(llm, prompts, lens: list[int], repeats: int) -> int:
    """Wall time of the whole batch to each length (``bench/decode_step.py``'s method)."""
    from vllm import SamplingParams, TokensPrompt

    from bench.decode_step import time_lengths

    reqs = [TokensPrompt(prompt_token_ids=pr) for pr in prompts]

    def generate(n: int) -> None:
        outs = llm.generate(reqs, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)

    times = time_lengths(generate, lens[0], lens[1], repeats)
    print(MARK + json.dumps(dict(system="vllm", times=times)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

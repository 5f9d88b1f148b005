"""How many operators one engine step issues, and which of batchmax's functions issue them:
the host side of a step, measured on any machine.

On a GPU each operator is at least one kernel launch (~4-8 us of host time in PyTorch), so a
step whose matrix products are small (a 1B model, prefill chunks of a few thousand tokens, the
evictor's per-layer bookkeeping) can be bound by how many it issues rather than by its
arithmetic. Counting them needs no GPU: the same code issues the same operators on the CPU,
whatever the widths, so this runs the model's layout (layers, query and KV heads) with tiny
widths and random weights.

    python -m bench.step_ops --shape m1b --num-requests 4 --prompt-len 1024 --chunk 256 --kv-policy snapkv --kv-budget 64
    python -m bench.step_ops --shape m1b ... --kv-recall        # recall's share

Counts non-view ATen operators under a ``TorchDispatchMode`` during the chosen step (by
default the first prefill step that evicts, the second chunk of every prompt), each charged to
the innermost batchmax function on the Python stack, and times the same step without counting.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchmax.engine import LLM, SamplingParams
from bench import append_jsonl
from bench.models import SHAPES as LLAMA3_SHAPES
from bench.models import shape_only_model
from bench.serve_compare import LLAMA_1B

SHAPES = {"m1b": LLAMA_1B, **LLAMA3_SHAPES}  # the long-prompt workload's 1B, and bench/models.py's
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("engine", "policies"))
_VIEWS = {"view", "_unsafe_view", "as_strided", "alias", "detach", "t", "transpose", "permute", "expand",
          "unsqueeze", "squeeze", "select", "slice", "unbind", "split", "split_with_sizes", "chunk", "narrow",
          "reshape", "_reshape_alias", "view_as", "unfold", "diagonal", "movedim", "flatten", "lift_fresh"}


def tiny_layout(shape: dict, head_dim: int = 8) -> dict:
    """``shape``'s layers and heads with tiny widths (the operator count does not depend on them)."""
    heads = shape["num_attention_heads"]
    return dict(shape, hidden_size=heads * head_dim, head_dim=head_dim, intermediate_size=2 * heads * head_dim,
                vocab_size=1024, tie_word_embeddings=True, dtype="float32")


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_fn: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            self.by_fn[_caller()] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost frame in engine/ or policies/: ``file.py:function``."""
    f = sys._getframe(2)  # noqa: SLF001 - the stack is what this tool reports
    while f is not None:
        path = f.f_code.co_filename
        if path.startswith(_OURS):
            return f"{os.path.relpath(path, _ROOT)}:{f.f_code.co_name}"
        f = f.f_back
    return "(outside batchmax)"


def count_step(llm: LLM, at_step: int | None) -> dict:
    """Run the engine to the step to count (``None``: the first prefill step with evictions),
    count that step, time it on a twin run, and return the figures."""
    eng = llm.engine
    done = 0
    while eng.has_unfinished_requests():
        evicting = any(r.num_computed_tokens > 0 and r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running)
        if (at_step is None and evicting) or done == at_step:
            counter = _Counter()
            with counter:
                eng.step()
            return dict(step=done, ops=sum(counter.by_fn.values()), by_function=dict(counter.by_fn.most_common()))
        eng.step()
        done += 1
    raise SystemExit("the run ended before the step to count")


def build(a, recall: bool) -> LLM:
    layout = tiny_layout(SHAPES[a.shape])
    llm = LLM(shape_only_model(layout, f"{a.shape}-tiny"), load_format="dummy", skip_tokenizer_init=True, device="cpu",
              chunk_size=a.chunk, max_num_seqs=max(8, a.num_requests), max_num_batched_tokens=a.num_requests * a.chunk,
              kv_policy=a.kv_policy, kv_budget=a.kv_budget, kv_recall=recall, host_kv_tokens=65536 if recall else None,
              num_tokens=a.num_requests * (a.prompt_len + a.output_len) + 1024)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=a.output_len, ignore_eos=True)
    for i in range(a.num_requests):
        llm.engine.add_request(f"r{i}", [rng.randrange(3, 1000) for _ in range(a.prompt_len)], params)
    return llm


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="m1b")
    p.add_argument("--num-requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--kv-policy", default="snapkv")
    p.add_argument("--kv-budget", type=int, default=64)
    p.add_argument("--kv-recall", action="store_true")
    p.add_argument("--at-step", type=int, default=None, help="the step to count (0-based; default: the first that evicts)")
    p.add_argument("--top", type=int, default=25, help="functions listed")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    counted = count_step(build(a, a.kv_recall), a.at_step)
    # the same step again, uncounted: its host wall time (on the CPU the kernels run inline,
    # so with tiny widths this is almost all Python and dispatch)
    llm = build(a, a.kv_recall)
    for _ in range(counted["step"]):
        llm.engine.step()
    t = time.perf_counter()
    llm.engine.step()
    counted["step_ms"] = round((time.perf_counter() - t) * 1e3, 2)
    layers = SHAPES[a.shape]["num_hidden_layers"]
    counted.update(shape=a.shape, layers=layers, num_requests=a.num_requests, chunk=a.chunk, kv_policy=a.kv_policy,
                   kv_budget=a.kv_budget, kv_recall=a.kv_recall)
    print(f"step {counted['step']}: {counted['ops']} operators ({counted['ops'] / layers:.0f} per layer), "
          f"{counted['step_ms']} ms on this host")
    for fn, n in list(counted["by_function"].items())[: a.top]:
        print(f"{n:7d}  {n / layers:7.1f}/layer  {fn}")
    if a.json:
        append_jsonl(a.json, counted)
    return counted


if __name__ == "__main__":
    main()

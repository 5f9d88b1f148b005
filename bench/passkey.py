"""Passkey retrieval under eviction: every policy x retained fraction x chunk, against the
full cache, on prompts where the full cache answers (docs/ARCHITECTURE.md, "Footprint and admission").

The budget of each request is ``fraction x its prompt length`` tokens per layer and KV head.
``one-shot`` reads the whole prompt as one chunk (eviction once, after the prompt: the setting
of SnapKV and kvpress); ``chunk 128`` evicts after every 128-token chunk (Batch-Max), alone or
with recall (``compressed``: the last chunk attends to the held tokens, then re-selects over
held + parked; ``recalled``: re-selects first and attends to the recalled set).

    python -m bench.passkey --out bench/results/passkey-smollm2.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from batchmax.engine import LLM, SamplingParams
from bench.tasks import passkey_set

POLICIES = ["snapkv", "h2o", "tova", "knorm", "streaming", "pyramid"]
ONE_SHOT_CHUNK = 4096
# (label, chunk, recall): chunk 0 reads the whole prompt as one chunk (evict once, after it)
SETTINGS = {
    "one-shot": (0, None),
    "chunk 128": (128, None),
    "chunk 128 + recall": (128, "compressed"),
    "chunk 128 + recall, recalled attention": (128, "recalled"),
}


def run(model, tasks, policies, fractions, settings, device="cpu", max_tokens=12, progress=True, policy_args=None):
    """Returns (prompt lengths, full-cache correctness, {(policy, fraction, setting): [bool]})."""
    results: dict[tuple[str, float, str], list[bool]] = {}
    full_ok: list[bool] = []
    lens: list[int] = []
    for label in settings:
        chunk, recall = SETTINGS[label]
        size = chunk or ONE_SHOT_CHUNK
        # policy_args (e.g. {"obs_window": 16}) reach the engine's default policy, snapkv
        llm = LLM(
            model, device=device, chunk_size=size, max_num_batched_tokens=max(size, 2048), recall_attention=recall or "compressed",
            kv_policy="snapkv", kv_budget=64, kv_policy_args=policy_args or {},
        )
        prompts = [llm.apply_chat_template(t.messages) for t in tasks]
        ids = [llm.tokenizer.encode(p) for p in prompts]
        lens = [len(i) for i in ids]
        batch, keys = [], []
        if not full_ok:
            batch += [(i, SamplingParams(max_tokens=max_tokens, temperature=0.0, kv_policy="full")) for i in ids]
            keys += [("full", 1.0, "")] * len(ids)
        for pol in policies:
            for frac in fractions:
                for i in ids:
                    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, kv_policy=pol, kv_budget=max(24, int(frac * len(i))), kv_recall=recall is not None)
                    batch.append((i, sp))
                    keys.append((pol, frac, label))
        t0 = time.time()
        outs = llm.generate([b[0] for b in batch], [b[1] for b in batch], use_tqdm=progress)
        if progress:
            print(f"{label}: {len(batch)} requests in {time.time() - t0:.0f} s", file=sys.stderr)
        for j, (key, out) in enumerate(zip(keys, outs)):
            ok = tasks[j % len(tasks)].correct(out.text)
            if key[0] == "full":
                full_ok.append(ok)
            else:
                results.setdefault(key, []).append(ok)
    return lens, full_ok, results


def table(full_ok, results, policies, fractions, settings) -> str:
    cols = [(f, s) for s in settings for f in fractions]
    head = "| policy | " + " | ".join(f"{int(f * 100)}%, {s}" for f, s in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|", "| full | " + " | ".join(f"{sum(full_ok)}/{len(full_ok)}" for _ in cols) + " |"]
    for pol in policies:
        cells = [f"{sum(results[(pol, f, s)])}/{len(results[(pol, f, s)])}" for f, s in cols]
        lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--snapkv-args", type=json.loads, default={}, help='JSON fields of snapkv, e.g. \'{"obs_window": 16}\'')
    p.add_argument("--out", default=None, help="write the markdown table here")
    a = p.parse_args(argv)
    tasks = passkey_set(a.n, 12, 28, seed=a.seed)
    lens, full_ok, results = run(a.model, tasks, a.policies, a.fractions, a.settings, a.device, policy_args=a.snapkv_args)
    text = (
        f"Passkey retrieval, {a.n} prompts of {min(lens)}-{max(lens)} tokens (seed {a.seed}), greedy, "
        f"budget = fraction x prompt length per layer and KV head; policies at their defaults (sink 4, window 16, snapkv observation window 8)"
        + (f", snapkv {a.snapkv_args}" if a.snapkv_args else "")
        + f"; settings: {', '.join(a.settings)}.\n\n"
        + table(full_ok, results, a.policies, a.fractions, a.settings)
    )
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

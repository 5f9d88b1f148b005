"""Passkey retrieval on the real default model (SmolLM2-135M-Instruct), 10 prompts of
396-756 tokens: the full cache answers all; snapkv at 25% retained must reach 8/10 when it
evicts once after the prompt, and with recall when it evicts after every 128-token chunk.
The whole table (every policy, 25% and 50%) is bench/results/passkey-smollm2.md."""
from __future__ import annotations

from bench.passkey import run
from bench.tasks import passkey_set


def test_passkey_snapkv_one_shot_and_recall(default_model_path, capsys):
    tasks = passkey_set(10, 12, 28, seed=0)
    settings = ["one-shot", "chunk 128", "chunk 128 + recall"]
    lens, full_ok, res = run(None, tasks, ["snapkv"], [0.25], settings, progress=False)
    score = {s: sum(res[("snapkv", 0.25, s)]) for s in settings}
    with capsys.disabled():
        print(f"\npasskey, {min(lens)}-{max(lens)} tokens: full {sum(full_ok)}/10; snapkv 25%: " + ", ".join(f"{s} {v}/10" for s, v in score.items()))
    assert 350 <= min(lens) and max(lens) <= 800
    assert sum(full_ok) == 10
    assert score["one-shot"] >= 8
    assert score["chunk 128 + recall"] >= 8
    assert score["chunk 128"] < score["chunk 128 + recall"]  # what recall is for

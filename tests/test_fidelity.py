"""The fidelity suite (bench/fidelity.py) in CI size: its task generators and scorers, and a
few needle prompts of ~500 tokens on the real default model, evicting after every 128-token
chunk: the full cache answers all, and snapkv keeping 50% with recall scores the same."""
from __future__ import annotations

import pytest

from bench.fidelity import run, summarize, table
from bench.tasks import GENERATORS, ScoredTask, task_suite


@pytest.fixture(scope="module")
def llm(default_model_path):
    from batchmax.engine import LLM

    return LLM(str(default_model_path), device="cpu", chunk_size=128, max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def count(llm):
    return lambda messages: len(llm.tokenizer.encode(llm.apply_chat_template(messages)))


def test_generators_deterministic_and_sized(count):
    for target in (500, 2000):
        tasks = task_suite(list(GENERATORS), [target], 1, seed=3, count=count)
        again = task_suite(list(GENERATORS), [target], 1, seed=3, count=count)
        assert [t.messages for t in tasks] == [t.messages for t in again]
        assert [t.kind for t in tasks] == list(GENERATORS)
        for t in tasks:
            assert t.n_tokens == count(t.messages)
            assert abs(t.n_tokens - target) <= 0.1 * target, (t.kind, t.n_tokens)
    other = task_suite(list(GENERATORS), [500], 1, seed=4, count=count)
    assert all(a.messages != b.messages for a, b in zip(task_suite(list(GENERATORS), [500], 1, seed=3, count=count), other))


def test_scorers(count):
    for t in task_suite(list(GENERATORS), [500], 2, seed=0, count=count):
        assert isinstance(t, ScoredTask)
        text = t.messages[0]["content"]
        assert t.score(t.answer) == 1.0
        assert t.score("I don't know.") == 0.0
        if t.targets:  # graded: partial answers and answering with every candidate score less
            assert all(x in text for x in t.targets)
            assert 0.0 < t.score(t.targets[0]) < 1.0
            assert t.score(" ".join(t.candidates)) < 1.0
            assert t.score(" ".join(t.targets).upper()) == 1.0
        else:
            assert t.answer in text
            assert t.score(str(int(t.answer) + 1)) == 0.0


def test_fidelity_full_and_snapkv_recall(llm, count, capsys):
    kinds = ["needle@0.1", "needle@0.5", "needle@0.9"]
    tasks = task_suite(kinds, [500], 3, seed=0, count=count)
    scores, texts = run(None, tasks, ["snapkv"], [0.5], recall=(True,), progress=False, llm=llm)
    cols, rows = summarize(tasks, scores, texts)
    with capsys.disabled():
        print("\n" + table(cols, rows))
    assert scores[("full", 1.0, False)] == [1.0] * len(tasks)
    assert scores[("snapkv", 0.5, True)] == scores[("full", 1.0, False)]
    assert rows[("full", 1.0, False)]["agree"] == 1.0


def test_checkpoint_resumes_finished_configurations(llm, count, tmp_path, monkeypatch):
    """Each finished configuration is appended to the checkpoint; a rerun with the same
    prompts and settings generates nothing and scores the same, other prompts start over."""
    tasks = task_suite(["needle@0.5"], [500], 1, seed=5, count=count)
    ck = tmp_path / "ck.jsonl"
    first = run(None, tasks, ["snapkv"], [0.25], recall=(False,), progress=False, llm=llm, checkpoint=str(ck))
    assert len(ck.read_text().splitlines()) == 2  # full, snapkv 25%
    calls = []

    def generate(*a, **k):
        calls.append(a)
        raise RuntimeError("generate called")

    monkeypatch.setattr(llm, "generate", generate)
    assert run(None, tasks, ["snapkv"], [0.25], recall=(False,), progress=False, llm=llm, checkpoint=str(ck)) == first
    assert calls == []
    other = task_suite(["needle@0.5"], [500], 1, seed=6, count=count)
    with pytest.raises(RuntimeError, match="generate called"):  # nothing stored for these prompts
        run(None, other, ["snapkv"], [0.25], recall=(False,), progress=False, llm=llm, checkpoint=str(ck))
    assert len(calls) == 1

"""Scoring through a real ``batchmax serve`` (the engine core in its own process): echo +
logprobs on /v1/completions with max_tokens 0 (score only) and 1 (what lm-evaluation-harness'
``local-completions`` sends) returns a logprob for every prompt position after the first,
equal to transformers' log-softmax of the same model, for prompts of several chunks, with
and without async scheduling; and lm-evaluation-harness run against the server computes
the same loglikelihoods as its own HF backend."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest

from tests.helpers import hf_logprobs, random_prompts
from tests.server.conftest import start_server

LENGTHS = [600, 250, 2]  # chunk 512: two chunks, one, one; chunk 64: 10, 4, 1

SERVERS = {
    "sync-chunk512": ("--no-async-scheduling", "--chunk", "512"),
    "async-chunk512": ("--async-scheduling", "--chunk", "512"),
    "async-chunk64": ("--async-scheduling", "--chunk", "64"),
}


@pytest.fixture(scope="module", params=list(SERVERS))
def scoring_server(request, tiny_llama, tmp_path_factory):
    srv = start_server(tiny_llama, tmp_path_factory, *SERVERS[request.param])
    yield srv
    srv.stop()


def _complete(srv, **body) -> dict:
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _check_prompt_part(token_logprobs: list, top_logprobs: list | None, prompt: list[int], ref) -> None:
    """The prompt's entries of a choice's logprobs: the first null, every other one
    transformers' logprob of that token and (``top_logprobs`` given) the best alternative
    its best."""
    n = len(prompt)
    tl = token_logprobs[:n]
    assert tl[0] is None
    missing = [j for j in range(1, n) if tl[j] is None]
    assert not missing, f"{len(missing)} prompt positions without a logprob, from {missing[0]} to {missing[-1]}"
    for j in range(1, n):
        assert tl[j] == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-4), f"position {j}"
    if top_logprobs is not None:
        assert top_logprobs[0] is None
        for j in range(1, n):
            assert max(top_logprobs[j].values()) == pytest.approx(ref[j - 1].max().item(), abs=1e-4), f"position {j}"


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scoring_matches_transformers(scoring_server, tiny_llama, max_tokens):
    prompts = random_prompts(LENGTHS, seed=41)
    r = _complete(scoring_server, prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True, logprobs=1)
    choices = sorted(r["choices"], key=lambda c: c["index"])
    assert len(choices) == len(prompts)
    for prompt, ch in zip(prompts, choices):
        ref = hf_logprobs(tiny_llama, prompt)
        lp = ch["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + max_tokens
        _check_prompt_part(lp["token_logprobs"], lp["top_logprobs"], prompt, ref)
        assert ch["finish_reason"] == "length"
        if max_tokens == 1:  # the generated token: greedy, so transformers' best
            assert lp["token_logprobs"][-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)
    assert r["usage"]["completion_tokens"] == max_tokens * len(prompts)


def test_streamed_echo_scoring_is_complete(scoring_server, tiny_llama):
    prompt = random_prompts([600], seed=42)[0]
    body = dict(prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    whole = _complete(scoring_server, **body)["choices"][0]["logprobs"]["token_logprobs"]
    streamed = []
    with httpx.stream("POST", scoring_server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                if lp is not None:
                    streamed += lp["token_logprobs"]
    assert streamed == whole and len(whole) == 600
    _check_prompt_part(whole, None, prompt, hf_logprobs(tiny_llama, prompt))


# ---------------------------------------------------------------- lm-evaluation-harness

TASK = "batchmax_scoring_mc"

# Run in a child process: offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), with its own HF
# cache, so nothing is fetched from the hub or written to a shared cache, and lm-eval's
# seeding and logging stay out of the test session.
LM_EVAL = textwrap.dedent("""
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_dir, task, out_path, runs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    tm = TaskManager(include_path=task_dir)
    result = {}
    for name, (model, model_args) in runs.items():
        res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=tm,
                                      log_samples=True, bootstrap_iters=0)
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        result[name] = {
            "acc": res["results"][task]["acc,none"],
            "arguments": [[list(a) for a in s["arguments"]] for s in samples],
            # one (loglikelihood, is_greedy) per choice
            "resps": [[list(r[0]) for r in s["resps"]] for s in samples],
        }
    with open(out_path, "w") as f:
        json.dump(result, f)
""")


def _task_files(folder) -> None:
    """Ten multiple-choice items from a local JSONL file: contexts from a few words to ~700
    tokens (up to 12 chunks of 64) and choices of 1 to ~90 tokens, some crossing chunks."""
    import random

    rng = random.Random(5)
    words = ("the a cat dog river stone light quickly under over green seven house tree window music paper "
             "cold bright north slowly bridge garden letter").split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = []
    for i in range(10):
        ctx = [3, 40, 150, 400, 600][i % 5]
        lens = (1, 2, 5, 60) if i % 3 == 0 else (1, 3, 8, 2)
        rows.append({"question": text(ctx), "choices": [" " + text(k) for k in lens], "answer": i % 4})
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {folder / "datasets_cache"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))


@pytest.mark.slow
def test_lm_eval_harness_loglikelihoods_match_its_hf_backend(tiny_llama, tmp_path, tmp_path_factory):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-evaluation-harness is not installed (pip install 'lm-eval[api]'); it is not in the test extra "
                    "because it does not install from the local package index alone")
    _task_files(tmp_path)
    srv = start_server(tiny_llama, tmp_path_factory, "--chunk", "64", "--async-scheduling")
    try:
        model_id = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        runs = {
            "server": ["local-completions", {
                "base_url": srv.url + "/v1/completions", "model": model_id, "tokenizer": str(tiny_llama),
                "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": 4, "max_retries": 1,
            }],
            "hf": ["hf", {"pretrained": str(tiny_llama), "dtype": "float32", "device": "cpu", "batch_size": 4}],
        }
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
                   TOKENIZERS_PARALLELISM="false")
        out = tmp_path / "results.json"
        proc = subprocess.run([sys.executable, "-c", LM_EVAL, str(tmp_path), TASK, str(out), json.dumps(runs)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"lm-eval failed:\n{proc.stderr[-4000:]}\nserver log:\n{srv.log()}"
    finally:
        srv.stop()
    res = json.loads(out.read_text())
    api, hf = res["server"], res["hf"]
    assert api["arguments"] == hf["arguments"] and len(api["resps"]) == 10
    for doc, (a, h) in enumerate(zip(api["resps"], hf["resps"])):
        assert len(a) == len(h) == 4
        for (ll_a, greedy_a), (ll_h, greedy_h) in zip(a, h):
            assert ll_a == pytest.approx(ll_h, abs=1e-3), f"doc {doc}"
            assert greedy_a == greedy_h, f"doc {doc}"
    assert api["acc"] == hf["acc"]

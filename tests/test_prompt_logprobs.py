"""Prompt logprobs in scoring mode: a request whose first generated token finishes it
(max_tokens 1, as echo scoring runs; a stop token id) still has every prompt position's
logprob, the last chunk's included, equal to transformers' log-softmax of the same model.

Scoring clients (lm-evaluation-harness' ``local-completions``, ...) compute loglikelihoods
from exactly these rows. The last prefill chunk is also the step that samples the first
token; its prompt rows were once applied after that token had finished the request, and
dropped (a 600-token prompt with chunk 512 lost positions 513-599)."""
from __future__ import annotations

import pytest
import torch

from batchmax.engine import LLM, SamplingParams
from tests.helpers import hf_logprobs, random_prompts

TOP = 2  # alternatives asked for and compared


def check_prompt_logprobs(prompt_logprobs, prompt: list[int], ref: torch.Tensor, top: int = TOP) -> None:
    """Complete (one per prompt token, the first None) and equal to ``ref`` within 1e-4."""
    assert len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    missing = [j for j in range(1, len(prompt)) if prompt_logprobs[j] is None]
    assert not missing, f"{len(missing)} positions without a logprob, from {missing[0]} to {missing[-1]}"
    got = torch.tensor([e.logprob for e in prompt_logprobs[1:]])
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert [e.token_id for e in prompt_logprobs[1:]] == prompt[1:]
    assert torch.allclose(got, want, atol=1e-4, rtol=0), f"largest difference {(got - want).abs().max().item():.2e}"
    if top:
        want_top = ref[:-1].topk(top, dim=-1).indices.tolist()
        assert [[t for t, _ in e.top] for e in prompt_logprobs[1:]] == want_top


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("plen,chunk", [(600, 512), (600, 128), (250, 48), (40, 512)],
                         ids=["600-chunk512", "600-chunk128", "250-chunk48", "one-chunk"])
def test_prompt_logprobs_complete_when_the_first_token_finishes(tiny_llama, async_scheduling, plen, chunk):
    prompt = random_prompts([plen], seed=plen + chunk)[0]
    ref = hf_logprobs(tiny_llama, prompt)
    first = int(ref[-1].argmax())  # the greedy first token
    llm = LLM(str(tiny_llama), device="cpu", chunk_size=chunk, num_tokens=4096, async_scheduling=async_scheduling)
    params = [
        SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=TOP),  # scoring
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[first], prompt_logprobs=TOP),  # stops at once
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=TOP),  # runs past the prompt
    ]
    # together in one batch, as a scoring client sends them, and each alone
    outs = llm.generate([prompt] * len(params), params) + [llm.generate([prompt], p)[0] for p in params]
    for i, out in enumerate(outs):
        assert out.finished and out.token_ids[0] == first, f"request {i}"
        check_prompt_logprobs(out.prompt_logprobs, prompt, ref)
    scoring = outs[0]
    assert scoring.finish_reason == "length" and scoring.logprobs[0].logprob == pytest.approx(ref[-1, first].item(), abs=1e-4)
    assert outs[1].finish_reason == "stop" and outs[1].stop_reason == first and len(outs[1].token_ids) == 1
    assert llm.engine.cache.usage == 0.0 and not llm.engine.requests


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_many_scoring_requests_of_mixed_lengths(tiny_llama, async_scheduling):
    """A loglikelihood batch: prompts of many lengths, some spanning chunks, sharing steps
    under a token budget smaller than their sum, each asking for one token."""
    prompts = random_prompts([2, 17, 64, 65, 130, 300, 9, 200], seed=31)
    llm = LLM(str(tiny_llama), device="cpu", chunk_size=64, max_num_batched_tokens=160, num_tokens=4096, async_scheduling=async_scheduling)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, logprobs=0, prompt_logprobs=0))
    for prompt, out in zip(prompts, outs):
        check_prompt_logprobs(out.prompt_logprobs, prompt, hf_logprobs(tiny_llama, prompt), top=0)

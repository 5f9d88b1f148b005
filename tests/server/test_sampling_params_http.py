"""The sampling parameters through HTTP: out-of-range values and token ids are 400s naming the
parameter, and the official ``openai`` client sends each one (its own fields for
presence_penalty, frequency_penalty and logit_bias; ``extra_body`` for vLLM's) with the
result the offline engine gives for the same parameters."""
from __future__ import annotations

import pytest

from batchmax.engine import LLM, SamplingParams
from tests.helpers import random_prompts
from tests.server.test_http import assert_error, post

VOCAB = 49152
PROMPT = random_prompts([8] * 16, seed=7)[10]  # the tiny model's greedy continuation repeats a token


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(str(tiny_llama), device="cpu", num_tokens=4096)


def _chat(**kw):
    return {"messages": [{"role": "user", "content": "x"}], **kw}


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": -2.01}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": -1.5}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": "high"}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
        ("/v1/completions", {"prompt": "x", "min_p": -0.5}, "min_p"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 100.5}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": [5, 1]}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {str(VOCAB): 1}}, "logit_bias"),  # the engine's vocabulary check
        ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
        ("/v1/completions", {"prompt": "x", "allowed_token_ids": [5, VOCAB]}, "allowed_token_ids"),
        ("/v1/completions", {"prompt": "x", "allowed_token_ids": ["5"]}, "allowed_token_ids"),
        ("/v1/completions", {"prompt": "x", "bad_words": "hello"}, "bad_words"),
        ("/v1/completions", {"prompt": "x", "bad_words": ["w"] * 129}, "bad_words"),
        ("/v1/completions", {"prompt": "x", "bad_words": ["w" * 257]}, "bad_words"),
        ("/v1/completions", {"prompt": "x", "bad_words": ["a b c d e f g h i j"] * 100}, "bad_words"),  # too many tokens
        # ids beyond int64 would not even reach the engine's check (its wire is MessagePack)
        ("/v1/completions", {"prompt": "x", "logit_bias": {str(10**30): 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**30]}, "allowed_token_ids"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [-(10**30)]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": [1, 10**30]}, "prompt"),
        ("/v1/completions", {"prompt": [[1], [2, 10**30]]}, "prompt"),
        ("/v1/chat/completions", _chat(presence_penalty=-3), "presence_penalty"),
        ("/v1/chat/completions", _chat(logit_bias={"1.5": 2}), "logit_bias"),
        ("/v1/chat/completions", _chat(allowed_token_ids=[10**9]), "allowed_token_ids"),
    ],
)
def test_bad_sampling_parameters_are_400(server, path, body, param):
    err = assert_error(post(server, path, body), 400, param=param)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"


def test_infinite_penalty_is_400(server):
    raw = b'{"prompt": "x", "repetition_penalty": 1e999}'  # JSON has no infinity; a huge number reads as one
    assert_error(post(server, "/v1/completions", content=raw, headers={"content-type": "application/json"}), 400,
                 param="repetition_penalty")


def test_every_parameter_through_the_openai_client(client, model_id, offline):
    """Each parameter changes the greedy output, and the server's text is the offline engine's."""
    base = dict(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = offline.generate([PROMPT], SamplingParams(**base))[0]
    cases = [  # (the client's own fields, extra_body, SamplingParams)
        (dict(presence_penalty=-2.0), {}, dict(presence_penalty=-2.0)),
        (dict(frequency_penalty=-1.5, presence_penalty=0.5), {}, dict(frequency_penalty=-1.5, presence_penalty=0.5)),
        (dict(logit_bias={"300": 8, "301": 7.5}), {}, dict(logit_bias={300: 8, 301: 7.5})),
        ({}, {"repetition_penalty": 1.8}, dict(repetition_penalty=1.8)),
        ({}, {"allowed_token_ids": [2769, 1836, 8047]}, dict(allowed_token_ids=[2769, 1836, 8047])),
        ({}, {"bad_words": [plain.text.split()[1]]}, dict(bad_words=[plain.text.split()[1]])),
        (dict(temperature=1.0, seed=5), {"min_p": 0.2, "top_k": 20}, dict(temperature=1.0, seed=5, min_p=0.2, top_k=20)),
    ]
    for own, extra, sp in cases:
        want = offline.generate([PROMPT], SamplingParams(**{**base, **sp}))[0]
        assert want.token_ids != plain.token_ids, sp  # the parameter matters here
        kw = dict(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0.0)
        kw.update(own)
        r = client.completions.create(**kw, extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].text == want.text, sp


def test_min_p_one_is_greedy_through_http(client, model_id):
    kw = dict(model=model_id, prompt=PROMPT, max_tokens=16)
    greedy = client.completions.create(**kw, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    sampled = client.completions.create(**kw, temperature=1, seed=3, extra_body={"ignore_eos": True}).choices[0].text
    min_p = client.completions.create(**kw, temperature=1, seed=3, extra_body={"ignore_eos": True, "min_p": 1.0}).choices[0].text
    assert min_p == greedy != sampled


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logit_bias_makes_every_token_that_token(client, model_id, offline, stream):
    tok = offline.engine.tokenizer
    kw = dict(model=model_id, messages=[{"role": "user", "content": "Say anything"}], max_tokens=6, temperature=0.7, seed=1,
              logit_bias={"2769": 100}, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        r = client.chat.completions.create(**kw)
        text, entries = r.choices[0].message.content, r.choices[0].logprobs.content
    assert text == tok.decode([2769] * 6)
    # logprobs come from the biased logits: the forced token is (nearly) certain
    assert len(entries) == 6 and all(e.token == " farm" and e.logprob > -1e-3 for e in entries)


def test_allowed_token_ids_and_bad_words_in_chat(client, model_id, offline):
    tok = offline.engine.tokenizer
    allowed = [2769, 1836, 8047]  # " farm", " given", " compassion"
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Words"}], max_tokens=30, temperature=1.0, seed=4,
        extra_body={"ignore_eos": True, "allowed_token_ids": allowed, "bad_words": ["given farm"]},
    )
    words = r.choices[0].message.content.split()
    assert len(words) == 30 and set(words) <= {"farm", "given", "compassion"}
    assert not any(a == "given" and b == "farm" for a, b in zip(words, words[1:]))
    assert tok.encode(" given farm", add_special_tokens=False) == [1836, 2769]

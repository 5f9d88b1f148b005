"""The server driven by the official ``openai`` client. The tiny model's weights are random,
so the checks are about counts, ids, seeds and framing, never about meaningful text."""
from __future__ import annotations

import httpx
import openai
import pytest


def tokenize(server, **body) -> list[int]:
    return httpx.post(server.url + "/tokenize", json=body).json()["tokens"]


def test_models(client, model_id):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].owned_by == "batchmax"


def test_completion_usage_and_determinism(client, server, model_id):
    prompt = "The quick brown fox jumps over"
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == model_id
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenize(server, prompt=prompt))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    again = client.completions.create(model=model_id, prompt=prompt, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_default_max_tokens_is_16(client, model_id):
    r = client.completions.create(model=model_id, prompt="hello", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_token_prompts_and_multiple_prompts(client, server, model_id):
    ids = tokenize(server, prompt="one two three")
    ids2 = tokenize(server, prompt="four five")
    kw = dict(model=model_id, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=[ids, ids2], n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
    assert r.usage.prompt_tokens == len(ids) + len(ids2)  # each prompt once, not per n
    assert r.usage.completion_tokens == 12
    # a token-id prompt gives the same greedy text as its string; a list of strings too
    s = client.completions.create(prompt=["one two three", "four five"], **kw)
    assert r.choices[0].text == r.choices[1].text == s.choices[0].text
    assert r.choices[2].text == s.choices[1].text
    assert client.completions.create(prompt=ids, **kw).choices[0].text == s.choices[0].text


def test_chat(client, server, model_id):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenize(server, messages=messages))
    assert r.usage.completion_tokens == 5
    # max_completion_tokens is the newer name
    r2 = client.chat.completions.create(model=model_id, messages=messages, max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 3
    assert r.choices[0].message.content.startswith(r2.choices[0].message.content)


def test_chat_default_max_tokens_fills_the_context(client, server, model_id):
    """OpenAI's chat default: generate until EOS or the end of the context."""
    ctx = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    messages = [{"role": "user", "content": "x" + " x" * (ctx - 100)}]
    plen = len(tokenize(server, messages=messages))
    assert ctx - 100 < plen < ctx
    r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == ctx - plen
    assert r.choices[0].finish_reason == "length"


def test_streaming_completion_matches_non_streaming(client, model_id):
    kw = dict(model=model_id, prompt="Streaming test", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat(client, model_id):
    kw = dict(model=model_id, messages=[{"role": "user", "content": "stream please"}], max_tokens=9, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].choices == []
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_n2_seeded_and_reproducible(client, model_id):
    kw = dict(model=model_id, messages=[{"role": "user", "content": "pick"}], max_tokens=8, temperature=1.0, n=2, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # seeds 1234 and 1235
    assert a.usage.completion_tokens == 16
    # choice j is seeded seed + j: choice 1 of seed 1234 is choice 0 of seed 1235
    single = client.chat.completions.create(**{**kw, "n": 1, "seed": 1235})
    assert single.choices[0].message.content == a.choices[1].message.content
    other = client.chat.completions.create(**{**kw, "n": 1, "seed": 99})
    assert other.choices[0].message.content != a.choices[0].message.content


def test_n2_streaming(client, model_id):
    kw = dict(model=model_id, prompt="n two", max_tokens=6, temperature=1.0, n=2, seed=7, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    finish = {}
    for c in client.completions.create(stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {0: "length", 1: "length"}


def _boundary_stop(client, model_id, prompt):
    """A greedy completion and a stop string that spans two of its tokens."""
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert "".join(lp.tokens) == text
    for k in range(3, 9):
        off = lp.text_offset[k]
        if len(lp.tokens[k - 1]) >= 2 and len(lp.tokens[k]) >= 2:
            stop = text[off - 2 : off + 2]
            if text.find(stop) == off - 2:
                return text, stop, text[: off - 2]
    pytest.skip("no suitable token boundary in this random output")


def test_stop_string_spanning_tokens(client, model_id):
    prompt = "Stop strings are matched on text"
    text, stop, expected = _boundary_stop(client, model_id, prompt)
    kw = dict(model=model_id, prompt=prompt, max_tokens=10, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    # streaming: the stop string's first half was held back, never sent
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    # chat honours stop too
    c = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=10,
                                       temperature=0, extra_body={"ignore_eos": True})
    full = c.choices[0].message.content
    if len(full) > 6:
        s = full[3:6]
        c2 = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=10,
                                            temperature=0, stop=s, extra_body={"ignore_eos": True})
        assert c2.choices[0].message.content == full[: full.find(s)]
        assert c2.choices[0].finish_reason == "stop"


def test_completion_logprobs(client, model_id):
    r = client.completions.create(model=model_id, prompt="log probs", max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert top[tok] == pytest.approx(chosen) and chosen == pytest.approx(max(top.values()))  # greedy takes the argmax
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo(client, server, model_id):
    prompt = "Echo me back"
    plen = len(tokenize(server, prompt=prompt))
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                  extra_body={"ignore_eos": True})
    ch = r.choices[0]
    assert ch.text.startswith(prompt)
    assert len(ch.logprobs.tokens) == plen + 3
    assert ch.logprobs.token_logprobs[0] is None and all(v <= 0 for v in ch.logprobs.token_logprobs[1:])
    # max_tokens 0 with echo scores the prompt only
    s = client.completions.create(model=model_id, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert s.choices[0].text == prompt and s.usage.completion_tokens == 0
    assert len(s.choices[0].logprobs.tokens) == plen
    # streaming echo: the prompt comes first
    chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == ch.text


def test_chat_logprobs(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "lp"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2 and isinstance(e.bytes, list)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    # the tokens' raw bytes make up the text (a character may be split between tokens)
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    # streaming carries the same logprobs
    chunks = list(client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "lp"}], max_tokens=4,
                                                 temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_kv_policy_extension(client, model_id):
    base = dict(model=model_id, prompt="policy " * 40, max_tokens=4, temperature=0)
    r = client.completions.create(**base, extra_body={"kv_policy": "full", "ignore_eos": True})
    assert r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**base, extra_body={"kv_policy": "no-such-policy"})
    assert "no-such-policy" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**base, extra_body={"kv_budget": -5})
    s = client.completions.create(**base, extra_body={"kv_policy": "snapkv", "kv_budget": 48, "ignore_eos": True})
    assert s.usage.completion_tokens == 4
    # recall, per request
    rc = client.completions.create(**base, extra_body={"kv_policy": "snapkv", "kv_budget": 24, "kv_recall": True, "ignore_eos": True})
    assert rc.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**base, extra_body={"kv_policy": "snapkv", "kv_budget": 24, "kv_recall": "maybe"})
    assert "kv_recall" in str(e.value)


def test_stop_token_ids_and_min_tokens(client, server, model_id):
    kw = dict(model=model_id, prompt="ids", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    toks = client.completions.create(**kw, logprobs=0).choices[0].logprobs.tokens
    # generated token ids, recovered from their strings (kept only where that is unambiguous)
    ids = [tokenize(server, prompt=t, add_special_tokens=False) for t in toks]
    k = next((k for k in range(1, 8) if len(ids[k]) == 1), None)
    if k is None:
        pytest.skip("no single-token string in this random output")
    tid = ids[k][0]
    first = next(j for j in range(8) if ids[j] == [tid])
    r = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "stop_token_ids": [tid]}})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == first + 1
    # min_tokens suppresses the stop token until enough tokens exist
    m = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "stop_token_ids": [tid], "min_tokens": 6}})
    assert m.usage.completion_tokens >= 6


def test_unknown_fields_are_ignored(client, model_id):
    """Logged as a warning (tests/server/test_fields.py checks the line) and ignored, as vLLM does."""
    r = client.completions.create(model=model_id, prompt="x", max_tokens=2, user="someone",
                                  extra_body={"some_future_field": {"a": 1}, "another": [1, 2]})
    assert len(r.choices) == 1

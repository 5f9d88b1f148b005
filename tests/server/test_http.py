"""Raw HTTP: SSE framing byte for byte, OpenAI error bodies and status codes, auth, misc routes."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

ERROR_KEYS = {"message", "type", "param", "code"}


def events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its events, checking the framing on the way."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    parts = raw[:-2].split(b"\n\n")
    for p in parts:
        assert p.startswith(b"data: ") and b"\n" not in p, p
    return [p[len(b"data: "):] for p in parts]


def post(server, path, body=None, content=None, **kw):
    return httpx.post(server.url + path, json=body, content=content, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = "unset", code: str | None = "unset") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if status == 400:  # every 400 says what kind of problem it is
        assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
    if param != "unset":
        assert body["error"]["param"] == param, body
    if code != "unset":
        assert body["error"]["code"] == code, body
    return body["error"]


# ----------------------------------------------------------------------------- SSE
def test_sse_framing_completions(server, model_id):
    body = {"model": model_id, "prompt": "Frame me", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    evs = events(raw)
    assert evs[-1] == b"[DONE]"
    chunks = [json.loads(e.decode("utf-8")) for e in evs[:-1]]  # strict UTF-8 per event
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("cmpl-")
    *deltas, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": usage["usage"]["prompt_tokens"], "completion_tokens": 12,
                                                          "total_tokens": usage["usage"]["prompt_tokens"] + 12}
    for c in deltas:
        assert c["object"] == "text_completion" and c["model"] == model_id and "usage" in c and c["usage"] is None
        assert len(c["choices"]) == 1 and set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    finished = [c["choices"][0]["index"] for c in deltas if c["choices"][0]["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1]


def test_sse_framing_chat_without_usage(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True}
    r = post(server, "/v1/chat/completions", body)
    evs = events(r.content)
    assert evs[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    assert all("usage" not in c for c in chunks)  # only when stream_options.include_usage
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_streamed_text_is_always_complete_utf8(server, model_id):
    """Sampled text from a random model hits multi-byte characters split over tokens; no
    event may carry half a character (U+FFFD) and the concatenation must equal the
    non-streamed text."""
    fulls = []
    for seed in range(4):
        body = {"model": model_id, "prompt": "ünïcödé 漢字 🙂", "max_tokens": 40, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        full = post(server, "/v1/completions", body).json()["choices"][0]["text"]
        raw = post(server, "/v1/completions", {**body, "stream": True}).content
        deltas = [json.loads(e.decode("utf-8"))["choices"][0]["text"] for e in events(raw)[:-1]]
        assert "".join(deltas) == full
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in deltas)
        fulls.append(full)
    assert any(ord(c) > 127 for full in fulls for c in full)  # multi-byte characters were exercised


# ----------------------------------------------------------------------------- errors
def test_malformed_json(server):
    for content in (b'{"prompt": "x", ', b"", b"not json", b"\xff\xfe"):
        assert_error(post(server, "/v1/completions", content=content, headers={"content-type": "application/json"}), 400, code="invalid_json")
    assert_error(post(server, "/v1/completions", content=b"[1, 2]"), 400)  # JSON, but not an object


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "x", "n": 1.5}, "n"),
        ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "kv_budget": 0}, "kv_budget"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 9}, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
        # past 64 bits: refused before the engine core's messages (int64) could overflow
        ("/v1/completions", {"prompt": [-(2**63) - 1]}, "prompt"),
        ("/v1/completions", {"prompt": [[5, 2**64]]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [2**63]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "x", "top_k": 2**70}, "top_k"),
        ("/v1/completions", {"prompt": "x", "kv_budget": 2**64}, "kv_budget"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "function", "content": "y"}]}, "messages.1.role"),
        ("/v1/chat/completions", {"messages": [{"role": "User", "content": "x"}]}, "messages.0.role"),
        ("/tokenize", {"messages": [{"role": "system", "content": "x"}, {"role": "", "content": "y"}]}, "messages.1.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
        # a client's own Jinja template would run on the server's event loop
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "chat_template_kwargs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"return_dict": True}}, "chat_template_kwargs"),
    ],
)
def test_bad_parameters_are_400(server, path, body, param):
    err = assert_error(post(server, path, body), 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_prompt_over_the_context(server, model_id):
    ctx = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    err = assert_error(post(server, "/v1/completions", {"prompt": [5] * (ctx - 10), "max_tokens": 100}), 400,
                       param="prompt", code="context_length_exceeded")
    for n in (ctx, ctx - 10, 100, ctx + 90):
        assert str(n) in err["message"]
    err = assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" + " x" * ctx}]}), 400,
                       param="messages", code="context_length_exceeded")
    assert str(ctx) in err["message"]


def test_unknown_model_is_404(server):
    err = assert_error(post(server, "/v1/completions", {"model": "gpt-17", "prompt": "x"}), 404, param="model", code="model_not_found")
    assert "gpt-17" in err["message"]
    assert_error(post(server, "/v1/chat/completions", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert_error(httpx.get(server.url + "/v1/models/gpt-17"), 404)


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)


def test_errors_do_not_harm_a_stream_in_flight(server, model_id):
    body = {"model": model_id, "prompt": "steady", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    expected = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    got = {}

    def stream():
        got["raw"] = post(server, "/v1/completions", {**body, "stream": True}).content

    t = threading.Thread(target=stream)
    t.start()
    for _ in range(5):
        assert_error(post(server, "/v1/completions", content=b"{oops"), 400)
        assert_error(post(server, "/v1/completions", {"prompt": "x", "kv_policy": "bogus"}), 400, param="kv_policy")
        assert_error(post(server, "/v1/completions", {"prompt": [99999999]}), 400)
        assert_error(post(server, "/v1/completions", {"prompt": "x", "model": "nope"}), 404)
    t.join(60)
    evs = events(got["raw"])
    assert evs[-1] == b"[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in evs[:-1]) == expected
    assert httpx.get(server.url + "/health").status_code == 200


# ----------------------------------------------------------------------------- auth
def test_api_key(small_server):
    url = small_server.url
    body = {"prompt": "x", "max_tokens": 2}
    err = assert_error(httpx.post(url + "/v1/completions", json=body), 401, code="invalid_api_key")
    assert "key" in err["message"].lower()
    assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekri"}), 401)
    assert_error(httpx.post(url + "/tokenize", json={"prompt": "x"}), 401)
    assert httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}, timeout=60).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"x-api-key": "sekrit"}).status_code == 200
    for open_path in ("/health", "/metrics", "/version"):
        assert httpx.get(url + open_path).status_code == 200
    # the schema describes the protected API: it needs the key too
    assert_error(httpx.get(url + "/openapi.json"), 401, code="invalid_api_key")
    assert_error(httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    schema = httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer sekrit"})
    assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    assert "/openapi.json" not in schema.json()["paths"]


def test_api_key_with_openai_client(small_server):
    import openai

    bad = openai.OpenAI(base_url=small_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=small_server.url + "/v1", api_key="sekrit", max_retries=0)
    assert len(good.models.list().data) == 1


# ----------------------------------------------------------------------------- misc routes
def test_openapi_is_open_without_an_api_key(server):
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= set(r.json()["paths"])


def test_chat_roles(server, model_id):
    """OpenAI's roles are accepted (the template renders them), 'tool' too (with the call id it
    answers; tests/server/test_tool_calls_http.py); any other is a 400 naming it."""
    msgs = [{"role": r, "content": f"as {r}"} for r in ("developer", "system", "user", "assistant", "user")]
    r = post(server, "/tokenize", {"messages": msgs})
    assert r.status_code == 200 and r.json()["count"] > 0
    r = post(server, "/v1/chat/completions", {"model": model_id, "messages": msgs, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    err = assert_error(post(server, "/v1/chat/completions", {"messages": [*msgs, {"role": "robot", "content": "x"}]}), 400,
                       param="messages.5.role", code="invalid_value")
    assert err["message"] == "Invalid value: 'robot'. Supported values are: 'system', 'user', 'assistant', 'developer', 'tool'."
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    answer = {"role": "tool", "content": "42", "tool_call_id": "c1"}
    for path in ("/v1/chat/completions", "/tokenize"):
        r = post(server, path, {"messages": [*msgs, call, answer], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert_error(post(server, path, {"messages": [*msgs, {"role": "tool", "content": "42"}]}), 400,
                     param="messages.5.tool_call_id", code="missing_required_parameter")


def test_health_version_models(server, model_id):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert isinstance(httpx.get(server.url + "/version").json()["version"], str)
    card = httpx.get(server.url + f"/v1/models/{model_id}").json()
    assert card["id"] == model_id and card["object"] == "model" and card["max_model_len"] > 0


def test_tokenize_detokenize(server):
    r = post(server, "/tokenize", {"prompt": "Hello tokenizer"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] > 0
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "Hello tokenizer"
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > r["count"]  # the template adds its markup
    assert_error(post(server, "/detokenize", {"tokens": [-1]}), 400, param="tokens")
    assert_error(post(server, "/tokenize", {}), 400)


# ----------------------------------------------------------------------------- vLLM's extensions
def _chunks(raw: bytes) -> list[dict]:
    evs = events(raw)
    assert evs[-1] == b"[DONE]"
    return [json.loads(e) for e in evs[:-1]]


def test_prompt_logprobs_in_vllms_shape(server, model_id):
    """choices[i].prompt_logprobs: None, then per prompt position {token id: {logprob, rank,
    decoded_token}}, the prompt's own token first, then its top alternatives (ranks 1..k);
    the logprobs agree with echo's."""
    prompt = [1000 + 7 * i for i in range(9)]
    body = {"model": model_id, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "prompt_logprobs": 2}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    plp = choice["prompt_logprobs"]
    assert choice["logprobs"] is None and len(plp) == len(prompt) and plp[0] is None
    tok = httpx.post(server.url + "/detokenize", json={"tokens": [prompt[1]]}).json()["prompt"]
    echo = post(server, "/v1/completions", {**body, "prompt_logprobs": None, "echo": True, "logprobs": 0}).json()["choices"][0]["logprobs"]
    for pos in range(1, len(prompt)):
        entries = plp[pos]
        keys = list(entries)
        assert keys[0] == str(prompt[pos]) and len(keys) in (2, 3)
        own = entries[keys[0]]
        assert set(own) == {"logprob", "rank", "decoded_token"} and own["logprob"] <= 0 and own["rank"] >= 1
        assert own["logprob"] == pytest.approx(echo["token_logprobs"][pos], abs=1e-5)
        # the top 2 are listed (the prompt's token among them, or beside them)
        by_rank = sorted(entries.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in by_rank[:2]] == [1, 2] and all(e["rank"] <= 2 for e in entries.values() if e is not own)
        assert by_rank[0]["logprob"] >= by_rank[1]["logprob"] >= own["logprob"] - 1e-6 or own["rank"] == 1
    assert plp[1][str(prompt[1])]["decoded_token"] == tok
    # not asked for: not in the body
    assert "prompt_logprobs" not in post(server, "/v1/completions", {**body, "prompt_logprobs": None}).json()["choices"][0]
    # streaming: on each choice's first chunk, the same
    raw = post(server, "/v1/completions", {**body, "stream": True, "n": 2}).content
    firsts = {}
    for c in _chunks(raw):
        ch = c["choices"][0]
        if ch["index"] not in firsts:
            firsts[ch["index"]] = ch
        elif "prompt_logprobs" in ch:
            raise AssertionError("prompt_logprobs sent twice")
    assert sorted(firsts) == [0, 1]

    for ch in firsts.values():  # another batch, other float sums: equal but for rounding
        got = ch["prompt_logprobs"]
        assert [None if d is None else list(d) for d in got] == [None if d is None else list(d) for d in plp]
        for a, b in zip(got[1:], plp[1:]):
            for k in b:
                assert a[k]["logprob"] == pytest.approx(b[k]["logprob"], abs=1e-4)
                assert (a[k]["rank"], a[k]["decoded_token"]) == (b[k]["rank"], b[k]["decoded_token"])
    # chat: on the response (vLLM's place for it)
    chat = post(server, "/v1/chat/completions", {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                 "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    assert all(len(d) == 1 for d in chat["prompt_logprobs"][1:])  # 0 alternatives: the token alone


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats(server, model_id, path):
    """stream_options.continuous_usage_stats: every chunk carries its choice's usage so far."""
    body = {"model": model_id, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True, "n": 2,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"prompt": "count me"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "count me"}]})
    *chunks, last = _chunks(post(server, path, body).content)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    prompt_tokens = last["usage"]["prompt_tokens"]
    seen = {0: 0, 1: 0}
    for c in chunks:
        u, i = c["usage"], c["choices"][0]["index"]
        assert u["prompt_tokens"] == prompt_tokens and u["total_tokens"] == prompt_tokens + u["completion_tokens"]
        assert u["completion_tokens"] >= seen[i]
        seen[i] = u["completion_tokens"]
    assert seen == {0: 5, 1: 5}
    # without include_usage: usage in every chunk, no usage chunk at the end
    body["stream_options"] = {"continuous_usage_stats": True}
    chunks = _chunks(post(server, path, body).content)
    assert all(c["choices"] and c["usage"]["prompt_tokens"] == prompt_tokens for c in chunks)


def test_include_stop_str_in_output(server, model_id):
    body = {"model": model_id, "prompt": "the stop", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    free = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    needle = free[len(free) // 3 : len(free) // 3 + 3]
    if not needle.strip():
        pytest.skip("no usable stop string in this random output")
    cut = post(server, "/v1/completions", {**body, "stop": [needle]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free[: free.find(needle)]
    kept = post(server, "/v1/completions", {**body, "stop": [needle], "include_stop_str_in_output": True}).json()["choices"][0]
    assert kept["finish_reason"] == "stop" and kept["text"] == free[: free.find(needle) + len(needle)]
    raw = post(server, "/v1/completions", {**body, "stop": [needle], "include_stop_str_in_output": True, "stream": True}).content
    assert "".join(c["choices"][0]["text"] for c in _chunks(raw)) == kept["text"]


def test_stop_token_text_with_include_stop_str_in_output(server, model_id):
    """The front end (which decodes the core's tokens) leaves a stop token's text out unless
    include_stop_str_in_output, like the in-process engine."""
    body = {"model": model_id, "prompt": [2000, 2001, 2002], "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    free = post(server, "/v1/completions", body).json()["choices"][0]
    toks = free["logprobs"]["tokens"]
    k = 4
    tid = httpx.post(server.url + "/tokenize", json={"prompt": toks[k], "add_special_tokens": False}).json()["tokens"]
    if len(tid) != 1 or toks.index(toks[k]) != k:
        pytest.skip("the 5th token's text is not one token here")
    for include in (False, True):
        r = post(server, "/v1/completions", {**body, "stop_token_ids": tid, "include_stop_str_in_output": include}).json()["choices"][0]
        assert r["finish_reason"] == "stop" and len(r["logprobs"]["tokens"]) == k + 1
        assert r["text"] == "".join(toks[: k + 1] if include else toks[:k])

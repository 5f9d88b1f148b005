"""No silent ignores: every field of the completion and chat request models changes what the
engine is asked (its ``SamplingParams`` or prompt), changes the response, or is refused with
a 400 naming it; unknown fields are named in a warning (or, with ``strict_request_fields``,
refused as OpenAI does). A new field without a case here fails
``test_every_field_has_a_case``."""
from __future__ import annotations

import json
import logging

import httpx
import pytest

from batchmax.server.app import build_app
from batchmax.server.protocol import ChatCompletionRequest, CompletionRequest
from batchmax.server.settings import ServerSettings
from tests.server.conftest import ThreadServer, wait_access
from tests.server.fake_engine import FakeEngine

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BASE = {
    COMPLETIONS: {"prompt": "hello there", "max_tokens": 3},
    CHAT: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
HI_SURE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure,"}]

# How a field shows: what the engine is asked ("params": its SamplingParams, "prompt": its
# prompt ids), "response": the answer's body, "refused": a 400 (404 for model) naming it,
# "access_log": the call's access-log line.
# Each case: (kind, fields that change, fields of the baseline beyond BASE).
SHARED = {
    "model": [("refused", {"model": "not-this-model"}, {})],
    "temperature": [("params", {"temperature": 0.5}, {})],
    "top_p": [("params", {"top_p": 0.5}, {})],
    "top_k": [("params", {"top_k": 5}, {})],
    "n": [("response", {"n": 2}, {})],
    "stream": [("response", {"stream": True}, {})],
    "stream_options": [
        ("response", {"stream_options": {"include_usage": True}}, {"stream": True}),
        ("response", {"stream_options": {"continuous_usage_stats": True}}, {"stream": True}),
    ],
    "stop": [("params", {"stop": ["zz"]}, {})],
    "stop_token_ids": [("params", {"stop_token_ids": [5]}, {})],
    "seed": [("params", {"seed": 3}, {})],
    "ignore_eos": [("params", {"ignore_eos": True}, {})],
    "min_tokens": [("params", {"min_tokens": 1}, {})],
    "user": [("access_log", {"user": "alice"}, {})],
    "presence_penalty": [("params", {"presence_penalty": 0.5}, {})],
    "frequency_penalty": [("params", {"frequency_penalty": 0.5}, {})],
    "logit_bias": [("params", {"logit_bias": {"5": 1.0}}, {})],
    "repetition_penalty": [("params", {"repetition_penalty": 1.2}, {})],
    "min_p": [("params", {"min_p": 0.1}, {})],
    "allowed_token_ids": [("params", {"allowed_token_ids": [5, 6, 7]}, {})],
    "bad_words": [("params", {"bad_words": ["hello"]}, {})],
    "prompt_logprobs": [("params", {"prompt_logprobs": 1}, {})],
    "include_stop_str_in_output": [("params", {"include_stop_str_in_output": True}, {})],
    "skip_special_tokens": [("params", {"skip_special_tokens": False}, {})],
    "spaces_between_special_tokens": [("params", {"spaces_between_special_tokens": False}, {})],
    "response_format": [
        ("params", {"response_format": {"type": "json_object"}}, {}),
        ("params", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, {}),
    ],
    "structured_outputs": [
        ("params", {"structured_outputs": {"json": {"type": "object"}}}, {}),
        ("params", {"structured_outputs": {"regex": "a+"}}, {}),
        ("params", {"structured_outputs": {"choice": ["yes", "no"]}}, {}),
        ("params", {"structured_outputs": {"grammar": 'root ::= "x"'}}, {}),
        ("params", {"structured_outputs": {"json_object": True}}, {}),
    ],
    "guided_json": [("refused", {"guided_json": {"type": "object"}}, {})],
    "guided_regex": [("refused", {"guided_regex": "a+"}, {})],
    "guided_choice": [("refused", {"guided_choice": ["yes", "no"]}, {})],
    "guided_grammar": [("refused", {"guided_grammar": "root ::= 'x'"}, {})],
    "guided_decoding_backend": [("refused", {"guided_decoding_backend": "xgrammar"}, {})],
    "guided_whitespace_pattern": [("refused", {"guided_whitespace_pattern": " "}, {})],
    "structural_tag": [("refused", {"structural_tag": "{}"}, {})],
    "priority": [("refused", {"priority": 1}, {})],
    "kv_policy": [("params", {"kv_policy": "snapkv"}, {})],
    "kv_budget": [("params", {"kv_budget": 8}, {})],
    "kv_recall": [("params", {"kv_recall": True}, {})],
}
CASES = {
    COMPLETIONS: {
        **SHARED,
        "prompt": [("prompt", {"prompt": "something else"}, {})],
        "max_tokens": [("params", {"max_tokens": 5}, {})],
        "logprobs": [("params", {"logprobs": 1}, {})],
        "echo": [("response", {"echo": True}, {})],
        "suffix": [("refused", {"suffix": "x"}, {})],
        "best_of": [("refused", {"best_of": 2}, {})],
        # the fixture's tokenizer adds a special token (SmolLM2's adds none)
        "add_special_tokens": [("prompt", {"add_special_tokens": False}, {})],
    },
    CHAT: {
        **SHARED,
        "messages": [("prompt", {"messages": [{"role": "user", "content": "bye"}]}, {})],
        "max_tokens": [("params", {"max_tokens": 5}, {})],
        "max_completion_tokens": [("params", {"max_completion_tokens": 4}, {})],
        "logprobs": [("params", {"logprobs": True}, {})],
        "top_logprobs": [("params", {"top_logprobs": 2}, {"logprobs": True})],
        # the fixture's chat template renders tools and reads reasoning_effort; it has no call
        # markers, so there is no parser for auto (tool_choice none keeps the baseline a 200)
        "tools": [("prompt", {"tools": TOOLS}, {"tool_choice": "none"})],
        "tool_choice": [("params", {"tool_choice": "required"}, {"tools": TOOLS, "tool_choice": "none"}),
                        ("params", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, {"tools": TOOLS, "tool_choice": "none"})],
        "parallel_tool_calls": [("params", {"parallel_tool_calls": False}, {"tools": TOOLS, "tool_choice": "required"})],
        "reasoning_effort": [("prompt", {"reasoning_effort": "low"}, {})],
        "echo": [("response", {"echo": True}, {"messages": HI_SURE})],
        "add_generation_prompt": [("prompt", {"add_generation_prompt": False}, {})],
        "continue_final_message": [("prompt", {"continue_final_message": True}, {"messages": HI_SURE})],
        # the fixture's chat template reads a variable ``greeting``
        "chat_template_kwargs": [("prompt", {"chat_template_kwargs": {"greeting": "hey"}}, {})],
    },
}
MODELS = {COMPLETIONS: CompletionRequest, CHAT: ChatCompletionRequest}


class RecordingEngine(FakeEngine):
    """FakeEngine that keeps what each request was added with."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.added: list[tuple[list[int], object]] = []

    def add_request(self, request_id, prompt, params) -> None:
        super().add_request(request_id, prompt, params)
        self.added.append((list(prompt), params))


def _tokenizer(tiny_llama):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.chat_template = tok.chat_template + ("{% if greeting %}{{ greeting }}{% endif %}{% if tools %}{{ tools | tojson }}{% endif %}"
                                             "{% if reasoning_effort %}{{ reasoning_effort }}{% endif %}")
    return tok


@pytest.fixture(scope="module")
def fake(tiny_llama):
    engine = RecordingEngine(_tokenizer(tiny_llama))
    with ThreadServer(build_app(engine, ServerSettings(log_stats_interval=0))) as srv:
        yield srv, engine


def _call(srv, engine, path, body):
    n = len(engine.added)
    r = httpx.post(srv.url + path, json=body, timeout=30)
    return r, engine.added[n:]


def _normalized(r: httpx.Response):
    """The body without what differs between any two calls (ids, timestamps)."""
    def strip(obj):
        return {k: v for k, v in obj.items() if k not in ("id", "created")} if isinstance(obj, dict) else obj

    if r.headers["content-type"].startswith("text/event-stream"):
        return [e if e == "[DONE]" else strip(json.loads(e)) for e in (x[6:] for x in r.text.split("\n\n") if x)]
    return strip(r.json())


def test_every_field_has_a_case():
    for path, model in MODELS.items():
        missing, stale = set(model.model_fields) - set(CASES[path]), set(CASES[path]) - set(model.model_fields)
        assert not missing, f"{path}: fields with no case here: show their effect in CASES or refuse them: {sorted(missing)}"
        assert not stale, f"{path}: cases for fields that are gone: {sorted(stale)}"


@pytest.mark.parametrize("path, field", [(p, f) for p in CASES for f in CASES[p]])
def test_every_field_has_an_effect_or_is_refused(fake, caplog, path, field):
    srv, engine = fake
    for kind, change, extra in CASES[path][field]:
        base_body = {**BASE[path], **extra}
        body = {**base_body, **change}
        assert body != base_body
        base, base_added = _call(srv, engine, path, base_body)
        assert base.status_code == 200, base.text
        if kind in ("access_log",):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="batchmax.access"):
                r, _ = _call(srv, engine, path, body)
                assert r.status_code == 200
                rec = wait_access(caplog, r.headers["x-request-id"]).get(r.headers["x-request-id"])
            assert rec is not None and rec.user == change["user"] and f'user="{change["user"]}"' in rec.getMessage()
            continue
        r, added = _call(srv, engine, path, body)
        if kind == "refused":
            assert r.status_code in (400, 404), (field, r.status_code, r.text)
            err = r.json()["error"]
            assert err["param"] == field, err
            assert err["code"] == ("model_not_found" if field == "model" else "unsupported_parameter"), err
            assert not added
            continue
        assert r.status_code == 200, (field, r.text)
        if kind == "params":
            assert [p for _, p in added] != [p for _, p in base_added], field
        elif kind == "prompt":
            assert [ids for ids, _ in added] != [ids for ids, _ in base_added], field
        elif kind == "response":
            assert _normalized(r) != _normalized(base), field
        else:
            raise AssertionError(kind)


def test_accepted_values_that_change_nothing(fake):
    """Values that ask for what every request gets are accepted: response_format text,
    priority 0, tool_choice 'none', an empty tools list."""
    srv, engine = fake
    for path, extra in [(COMPLETIONS, {"response_format": {"type": "text"}, "priority": 0}),
                        (CHAT, {"response_format": {"type": "text"}, "priority": 0, "tool_choice": "none", "tools": []})]:
        base, base_added = _call(srv, engine, path, BASE[path])
        r, added = _call(srv, engine, path, {**BASE[path], **extra})
        assert r.status_code == 200 and _normalized(r) == _normalized(base) and added == base_added


def test_chat_echo_and_prompt_logprobs_in_the_response(fake):
    srv, engine = fake
    r = httpx.post(srv.url + CHAT, json={**BASE[CHAT], "messages": HI_SURE, "echo": True}).json()
    assert r["choices"][0]["message"]["content"].startswith("Sure,")
    assert "prompt_logprobs" not in r  # only when asked for
    r = httpx.post(srv.url + CHAT, json={**BASE[CHAT], "prompt_logprobs": 1}).json()
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == r["usage"]["prompt_tokens"]
    raw = httpx.post(srv.url + CHAT, json={**BASE[CHAT], "messages": HI_SURE, "echo": True, "stream": True}).text
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).startswith("Sure,")


def test_stream_options_need_stream(fake):
    srv, _ = fake
    for path in CASES:
        r = httpx.post(srv.url + path, json={**BASE[path], "stream_options": {"include_usage": True}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text


def test_an_earlier_reply_echoed_with_its_fields_unset_is_accepted(fake):
    """The openai client's own dump of a reply it got (fields unset: null or empty)."""
    srv, engine = fake
    reply = {"role": "assistant", "content": "Sure,", "refusal": None, "annotations": [], "audio": None, "function_call": None,
             "tool_calls": None}
    r, added = _call(srv, engine, CHAT, {**BASE[CHAT], "messages": [{"role": "user", "content": "hi"}, reply]})
    base, base_added = _call(srv, engine, CHAT, {**BASE[CHAT], "messages": HI_SURE})
    assert r.status_code == 200 and [ids for ids, _ in added] == [ids for ids, _ in base_added]


def test_what_a_message_cannot_carry_is_refused(fake):
    """(Calls and tool answers in the history are rendered: tests/server/test_tool_calls_http.py.)"""
    srv, engine = fake
    for msg, param in [
        ({"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}}, "messages.1.function_call"),
        ({"role": "assistant", "content": None, "refusal": "I cannot."}, "messages.1.refusal"),
        ({"role": "assistant", "content": "x", "audio": {"id": "a1"}}, "messages.1.audio"),
        ({"role": "assistant", "content": "x", "annotations": [{"type": "url_citation"}]}, "messages.1.annotations"),
    ]:
        r, added = _call(srv, engine, CHAT, {**BASE[CHAT], "messages": [{"role": "user", "content": "hi"}, msg]})
        assert r.status_code == 400 and r.json()["error"]["param"] == param and not added, r.text
        assert r.json()["error"]["code"] == "unsupported_parameter"


# ----------------------------------------------------------------------------- unknown fields
def test_unknown_fields_are_named_in_a_warning_and_ignored(fake, caplog):
    srv, engine = fake
    cases = [
        (COMPLETIONS, {**BASE[COMPLETIONS], "foo": 1, "stream": True, "stream_options": {"include_usage": True, "bar": 2}},
         "foo, stream_options.bar"),
        (CHAT, {**BASE[CHAT], "messages": [{"role": "user", "content": "hi", "weird": True}], "frobnicate": 1.2},
         "frobnicate, messages.0.weird"),  # the body's own first, then nested ones
        ("/tokenize", {"prompt": "hi", "return_token_strs": True}, "return_token_strs"),
        ("/detokenize", {"tokens": [5, 6], "extra": "x"}, "extra"),
    ]
    for path, body, names in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="batchmax.server"):
            r = httpx.post(srv.url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        msgs = [rec.getMessage() for rec in caplog.records if rec.name == "batchmax.server"]
        assert len(msgs) == 1, msgs
        rid = r.headers["x-request-id"]
        assert msgs[0] == f"The following fields were present in the request but ignored: {names} (POST {path}, request_id={rid})"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batchmax.server"):
        assert httpx.post(srv.url + COMPLETIONS, json=BASE[COMPLETIONS]).status_code == 200
    assert not [rec for rec in caplog.records if rec.name == "batchmax.server"]


def test_strict_request_fields_refuse_unknown_fields(tiny_llama):
    engine = RecordingEngine(_tokenizer(tiny_llama))
    with ThreadServer(build_app(engine, ServerSettings(strict_request_fields=True, log_stats_interval=0))) as srv:
        for path, body, msg, param in [
            (COMPLETIONS, {**BASE[COMPLETIONS], "foo": 1}, "Unrecognized request argument supplied: foo", "foo"),
            (CHAT, {**BASE[CHAT], "messages": [{"role": "user", "content": "hi", "weird": 1}], "zz": 0},
             "Unrecognized request arguments supplied: zz, messages.0.weird", "zz"),
            ("/tokenize", {"prompt": "hi", "x": 1}, "Unrecognized request argument supplied: x", "x"),
            ("/detokenize", {"tokens": [5], "y": 1}, "Unrecognized request argument supplied: y", "y"),
        ]:
            r = httpx.post(srv.url + path, json=body, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json() == {"error": {"message": msg, "type": "invalid_request_error", "param": param, "code": "unknown_parameter"}}
        assert not engine.added
        assert httpx.post(srv.url + COMPLETIONS, json=BASE[COMPLETIONS], timeout=30).status_code == 200

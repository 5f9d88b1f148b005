"""Structured outputs over HTTP (``server/structured.py``): the ``openai`` client's
``parse(response_format=<pydantic model>)``, response_format on completions, vLLM's
``structured_outputs``, streaming, and the 400s (bad schema, unknown keys, two constraints,
the removed guided_* fields). The server runs the tiny random-weight model: output is valid
only because decoding is constrained."""
from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "rank": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["city", "rank"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
MSG = [{"role": "user", "content": "Pick a city."}]


class Pet(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]
    vaccinated: bool
    toys: list[Literal["ball", "rope"]] = Field(max_length=2)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def test_openai_parse_with_a_pydantic_model(client, model_id):
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        r = client.beta.chat.completions.parse(model=model_id, messages=MSG, response_format=Pet, max_tokens=200, **kw)
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        pet = choice.message.parsed
        assert isinstance(pet, Pet), choice.message.content
        assert Pet.model_validate_json(choice.message.content) == pet


def test_response_format_on_chat_and_completions(server, model_id):
    bodies = [
        ("/v1/chat/completions", {"messages": MSG, "response_format": RF, "max_tokens": 100, "temperature": 0}),
        ("/v1/completions", {"prompt": "A city:", "response_format": RF, "max_tokens": 100, "temperature": 0}),
        ("/v1/completions", {"prompt": "A city:", "response_format": RF, "max_tokens": 100, "temperature": 1.0, "seed": 7, "n": 3}),
    ]
    for path, body in bodies:
        r = _post(server, path, {"model": model_id, **body})
        assert r.status_code == 200, r.text
        for ch in r.json()["choices"]:
            text = ch["message"]["content"] if "message" in ch else ch["text"]
            assert ch["finish_reason"] == "stop", text
            jsonschema.validate(json.loads(text), SCHEMA)


def test_structured_outputs_object(server, model_id):
    cases = [
        ({"regex": r"[a-z]{3}-[0-9]{2}"}, lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
        ({"choice": ["red", "green"]}, lambda t: t in ("red", "green")),
        ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"grammar": 'root ::= ("ab" | "cd") ("ab" | "cd")? "!"', "json": None}, lambda t: re.fullmatch(r"(ab|cd){1,2}!", t)),
    ]
    for so, ok in cases:
        r = _post(server, "/v1/chat/completions", {"model": model_id, "messages": MSG, "structured_outputs": so, "max_tokens": 60, "temperature": 0})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        assert ok(ch["message"]["content"]), (so, ch["message"]["content"])


def test_streaming_gives_the_same_text(server, model_id):
    body = {"model": model_id, "messages": MSG, "response_format": RF, "max_tokens": 100, "temperature": 1.0, "seed": 11}
    full = _post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == full
    jsonschema.validate(json.loads(text), SCHEMA)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == ["stop"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "bogus": 1}}}, "response_format.json_schema.bogus"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
    ({"structured_outputs": "a+"}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": " ?"}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "min_tokens": 2}, "min_tokens"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"structural_tag": "{}"}, "structural_tag"),
])
def test_bad_constraints_are_400_naming_the_param(server, model_id, path, extra, param):
    base = {"messages": MSG} if "chat" in path else {"prompt": "x"}
    r = _post(server, path, {"model": model_id, **base, "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert ".cc:" not in err["message"]


def test_openai_client_sees_a_bad_schema_as_bad_request(client, model_id):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=MSG, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"

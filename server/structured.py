"""A request's output constraint, from OpenAI's ``response_format`` or vLLM's
``structured_outputs``, as the engine's ``StructuredOutputsParams`` (or a 400 naming the
field).

- ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}`` (any JSON
  object) and ``{"type": "json_schema", "json_schema": {"name", "description", "schema",
  "strict"}}`` on chat and completions. ``strict`` may be either: the output is always
  constrained to the schema (what OpenAI's strict mode promises; non-strict only allows less).
- ``structured_outputs`` (vLLM's object): ``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``, ``whitespace_pattern``; exactly one constraint. vLLM's other keys
  (``structural_tag``, ``disable_fallback``, ``disable_any_whitespace``,
  ``disable_additional_properties``) are refused by name, as is any unknown key.
- The legacy ``guided_*`` fields were removed in vLLM 0.12 (vllm-project/vllm#29326), and
  vLLM 0.26 ignores them as unknown fields: a constraint that silently does nothing. batchmax
  refuses them with a 400 saying what to send instead (``protocol.py``, ``unsupported``).

One source per request: ``response_format`` (other than text) and ``structured_outputs``
together are a 400. Whether the schema, regex or grammar compiles is the engine's check (its
ValueError, "structured_outputs.<kind>: ...", becomes a 400 with ``param`` this module names).
"""
from __future__ import annotations

from typing import Any

from batchmax.engine.sampling import StructuredOutputsParams
from batchmax.server.protocol import APIError, ResponseFormat, bad_request

STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "whitespace_pattern")
"""Keys of ``structured_outputs`` batchmax implements."""
_VLLM_UNSUPPORTED = ("structural_tag", "disable_fallback", "disable_any_whitespace", "disable_additional_properties")
_JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")


def _type_error(param: str, want: str) -> APIError:
    return bad_request(f"'{param}' must be {want}.", param=param, code="invalid_type")


def from_response_format(rf: ResponseFormat) -> StructuredOutputsParams | None:
    if rf.type == "text":
        if rf.json_schema is not None:
            raise bad_request("'response_format.json_schema' is only allowed with type 'json_schema'.", param="response_format.json_schema")
        return None
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if rf.type == "json_schema":
        js = rf.json_schema
        if js is None:
            raise bad_request("response_format of type 'json_schema' needs 'json_schema' ({\"name\": ..., \"schema\": {...}}).",
                              param="response_format.json_schema")
        extra = sorted(set(js) - set(_JSON_SCHEMA_KEYS))
        if extra:
            raise bad_request(f"Unknown field 'response_format.json_schema.{extra[0]}' (known: {', '.join(_JSON_SCHEMA_KEYS)}).",
                              param=f"response_format.json_schema.{extra[0]}", code="unknown_parameter")
        if "name" in js and not isinstance(js["name"], str):
            raise _type_error("response_format.json_schema.name", "a string")
        if "strict" in js and js["strict"] is not None and not isinstance(js["strict"], bool):
            raise _type_error("response_format.json_schema.strict", "a boolean")
        schema = js.get("schema")
        if not isinstance(schema, dict):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema (an object).",
                              param="response_format.json_schema.schema", code="invalid_type" if "schema" in js else "invalid_value")
        return StructuredOutputsParams(json=schema)
    raise bad_request(f"response_format type {rf.type!r} is not supported (text, json_object, json_schema).",
                      param="response_format.type", code="unsupported_value")


def from_structured_outputs(so: Any) -> StructuredOutputsParams:
    if not isinstance(so, dict):
        raise _type_error("structured_outputs", "an object")
    for key in so:
        if key in _VLLM_UNSUPPORTED:
            raise bad_request(f"'structured_outputs.{key}' is not supported by this server.", param=f"structured_outputs.{key}",
                              code="unsupported_parameter")
        if key not in STRUCTURED_KEYS:
            raise bad_request(f"Unknown field 'structured_outputs.{key}' (known: {', '.join(STRUCTURED_KEYS)}).",
                              param=f"structured_outputs.{key}", code="unknown_parameter")
    kw = {k: v for k, v in so.items() if v is not None}
    checks = {
        "json": (lambda v: isinstance(v, (dict, str)), "a JSON schema (an object, or its JSON text)"),
        "regex": (lambda v: isinstance(v, str), "a string"),
        "choice": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v), "a non-empty list of strings"),
        "grammar": (lambda v: isinstance(v, str), "a string"),
        "json_object": (lambda v: isinstance(v, bool), "a boolean"),
        "whitespace_pattern": (lambda v: isinstance(v, str), "a string"),
    }
    for key, value in kw.items():
        ok, want = checks[key]
        if not ok(value):
            raise _type_error(f"structured_outputs.{key}", want)
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as exc:  # none or several constraints
        raise bad_request(str(exc), param="structured_outputs") from None


def request_constraint(body) -> tuple[str, StructuredOutputsParams] | None:
    """(the field it came from, the constraint) of a completion or chat body, or None."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if body.response_format is not None:
        so = from_response_format(body.response_format)
        if so is not None:
            param = "response_format.json_schema.schema" if so.json is not None else "response_format"
            found.append((param, so))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", from_structured_outputs(body.structured_outputs)))
    if len(found) > 1:
        raise bad_request("Send one output constraint: 'response_format' (json_object or json_schema) or 'structured_outputs', not both.",
                          param="structured_outputs")
    return found[0] if found else None

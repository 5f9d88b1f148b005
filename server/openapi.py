"""The server's OpenAPI schema (``/openapi.json``), complete enough to generate clients and
fuzz the API from it.

The routes read and validate their bodies by hand (so every error is an OpenAI-shaped 400,
never FastAPI's 422), which leaves FastAPI's generated schema without request bodies and
with 422 answers the server never sends. This adds the real request and response models,
the OpenAI error body for every error status a route can answer, and the streaming
(``text/event-stream``) answers of the generation routes.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from batchmax.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"

# (path, method) -> request body model
REQUEST_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/tokenize", "post"): TokenizeRequest,
    ("/detokenize", "post"): DetokenizeRequest,
}
# (path, method) -> model of the 200 JSON answer
RESPONSES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/completions", "post"): CompletionResponse,
    ("/v1/chat/completions", "post"): ChatCompletionResponse,
    ("/v1/models", "get"): ModelList,
    ("/v1/models/{model_id}", "get"): ModelCard,
}
STREAMING = {("/v1/completions", "post"), ("/v1/chat/completions", "post")}
OPEN_ROUTES = {"/health", "/version", "/metrics"}  # no API key, no model needed

# One server-sent event (OpenAPI 3.1 reads the schema of an event-stream as one event's):
# ``data`` is a JSON chunk, an error object, or the final ``[DONE]``.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A JSON chunk (or error object), or `[DONE]` last."}},
}

_ERRORS = {
    "400": "Invalid request (malformed body, bad parameter, prompt over the context).",
    "401": "Missing or wrong API key (when the server has one).",
    "404": "Unknown model.",
    "408": "The request body did not arrive in time (the connection closes).",
    "413": "The request body is larger than the server accepts.",
    "500": "The engine failed while running the request.",
    "503": "Loading, shutting down, the queue is full, or too many connections are open (with Retry-After).",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [(m, "validation") for m in REQUEST_BODIES.values()] + [(m, "serialization") for m in (*RESPONSES.values(), ErrorResponse)]
    _, defs = models_json_schema(models, ref_template=REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components.update(defs.get("$defs", {}))
    error = _ref(ErrorResponse)
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            key = (path, method)
            responses = op["responses"]
            responses.pop("422", None)
            if key in REQUEST_BODIES:
                op["requestBody"] = {"required": True, "content": _json(_ref(REQUEST_BODIES[key]))}
            ok = responses.setdefault("200", {"description": "Successful Response"})
            if key in RESPONSES:
                ok["content"] = _json(_ref(RESPONSES[key]))
            if key in STREAMING:
                ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
                ok["description"] = "The answer, or with stream=true server-sent events ending in `data: [DONE]`."
            if path == "/metrics":
                ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path == "/health":
                responses["503"] = {"description": "Loading, draining, stopped, or the last engine steps failed.", "content": _json({"type": "object"})}
            if path in OPEN_ROUTES:
                continue
            statuses = {"401", "404", "503"}
            if key in REQUEST_BODIES:
                statuses |= {"400", "408", "413"}
            if key in STREAMING:  # generation routes: the engine may fail
                statuses.add("500")
            for status in sorted(statuses):
                responses[status] = {"description": _ERRORS[status], "content": _json(error)}
    return schema


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` return ``build_openapi(app)`` (built once, on first request);
    ``routes.py`` serves it at ``/openapi.json``, behind the API key when one is set."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's documented way to customise the schema

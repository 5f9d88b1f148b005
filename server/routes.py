"""HTTP routes. Bodies are read and validated by hand (``serving.parse_body``) so every
error is OpenAI-shaped with status 400, where FastAPI's automatic validation would say 422."""
from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from batchmax.server.context import ServerContext
from batchmax.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    bad_request,
    unknown_fields,
)
from batchmax.server.request_body import read_body
from batchmax.server.serving import ClientGone, OpenAIServing, SSEResponse, parse_body
from batchmax.server.version import version

logger = logging.getLogger("batchmax.server")


def _ctx(request: Request) -> ServerContext:
    return request.app.state.bm


async def require_api_key(request: Request) -> None:
    """``Authorization: Bearer KEY`` (what the openai client sends) or ``x-api-key: KEY``."""
    key = _ctx(request).settings.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not given or not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")


def _ready(ctx: ServerContext) -> OpenAIServing:
    if not ctx.ready:
        raise APIError(503, "The model is still loading.", "server_error", code="model_loading",
                       headers={"Retry-After": str(ctx.settings.retry_after_s)})
    return ctx.serving


async def _read(request: Request, ctx: ServerContext) -> bytes:
    s = ctx.settings
    return await read_body(request, s.max_body_bytes, s.timeout_body, s.timeout_body_chunk)


def _check_model(ctx: ServerContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", param="model", code="model_not_found")


async def _body(request: Request, ctx: ServerContext, model_cls) -> Any:
    """The request's body parsed into ``model_cls``. Fields the model does not declare are
    named in a warning and ignored (vLLM), or with ``--strict-request-fields`` a 400 (OpenAI)."""
    body = parse_body(await _read(request, ctx), model_cls)
    names = unknown_fields(body)
    if names:
        if ctx.settings.strict_request_fields:
            s = "s" if len(names) > 1 else ""
            raise bad_request(f"Unrecognized request argument{s} supplied: {', '.join(names)}", param=names[0],
                              code="unknown_parameter")
        logger.warning("The following fields were present in the request but ignored: %s (%s %s, request_id=%s)",
                       ", ".join(names), request.method, request.url.path, getattr(request.state, "request_id", "-"))
    return body


router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/health")
async def health(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if ctx.load_error is not None:
        return JSONResponse({"status": "failed", "error": str(ctx.load_error)}, status_code=503)
    if not ctx.ready or ctx.engine is None or not ctx.engine.is_running:
        return JSONResponse({"status": "loading" if not ctx.ready else "engine stopped"}, status_code=503)
    failures = ctx.engine.consecutive_step_failures
    if failures >= ctx.settings.unhealthy_after_step_failures:
        return JSONResponse({"status": "unhealthy", "error": f"the last {failures} engine steps failed"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def get_version() -> Response:
    return JSONResponse({"version": version()})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_ctx(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@protected.get("/v1/models")
async def models(request: Request) -> Response:
    ctx = _ctx(request)
    _ready(ctx)
    card = ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=ctx.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())


@protected.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> Response:
    ctx = _ctx(request)
    _ready(ctx)
    _check_model(ctx, model_id)
    return JSONResponse(ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=ctx.max_model_len).model_dump())


async def _generate(request: Request, model_cls, handler: Callable[[OpenAIServing, Any, Request], Awaitable[Response]]) -> Response:
    ctx = _ctx(request)
    body = await _body(request, ctx, model_cls)
    # admission counts the engine requests the call makes, known from the parsed body
    ticket = ctx.admit(body.num_prompts, body.n, body.prompt_param)
    request.state.ticket = ticket  # the handler marks it submitted once the engine has the requests
    try:
        _check_model(ctx, body.model)
        resp = await handler(ctx.serving, body, request)
    except ClientGone:
        ticket.release()
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    except BaseException:
        ticket.release()
        raise
    if isinstance(resp, SSEResponse):
        resp.on_close.append(ticket.release)  # the call ends when its stream does
    else:
        ticket.release()
    return resp


@protected.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest, OpenAIServing.create_completion)


@protected.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest, OpenAIServing.create_chat_completion)


@protected.post("/tokenize")
async def tokenize(request: Request) -> Response:
    ctx = _ctx(request)
    body = await _body(request, ctx, TokenizeRequest)
    serving = _ready(ctx)
    _check_model(ctx, body.model)
    # no size check here: /tokenize counts what a client may then trim (large jobs still
    # leave a tokenizer thread to small ones)
    if body.messages is not None:
        messages = serving.chat_messages(body)
        serving.tokenizer("messages")
        tokens = await serving.off_loop(serving.chat_prompt, messages, body, chars=sum(len(m["content"]) for m in messages))
    else:
        serving.tokenizer("prompt")
        tokens = await serving.off_loop(lambda tok: tok.encode(body.prompt, add_special_tokens=body.add_special_tokens),
                                        chars=len(body.prompt))
    return JSONResponse({"count": len(tokens), "max_model_len": ctx.max_model_len, "tokens": tokens})


@protected.post("/detokenize")
async def detokenize(request: Request) -> Response:
    ctx = _ctx(request)
    body = await _body(request, ctx, DetokenizeRequest)
    serving = _ready(ctx)
    tok = serving.tokenizer("tokens")
    _check_model(ctx, body.model)
    vocab = len(tok)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens", code="invalid_value")
    return JSONResponse({"prompt": await serving.off_loop(lambda t: t.decode(body.tokens), chars=len(body.tokens))})


@protected.get("/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request) -> Response:
    """The schema (``openapi.py``); with an API key set it needs the key, like the API it describes."""
    return JSONResponse(request.app.openapi())


router.include_router(protected)

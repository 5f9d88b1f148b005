"""The FastAPI app: ``build_app(engine, settings)``, its lifespan, error handlers and drain.

``engine`` may be an ``EngineCoreClient`` (the engine core in its own process, what
``batchmax serve`` runs), an ``AsyncEngine``, a synchronous ``LLMEngine`` (driven from a thread
here), or a zero-argument factory returning one of them. A factory runs in a worker thread after startup,
so the port answers at once and ``/health`` says 503 until the model is loaded.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from batchmax.server import routes
from batchmax.server.context import ServerContext
from batchmax.server.middleware import RequestContext
from batchmax.server.openapi import install_openapi
from batchmax.server.protocol import APIError
from batchmax.server.serving import OpenAIServing
from batchmax.server.settings import ServerSettings
from batchmax.server.stats_log import log_stats

logger = logging.getLogger("batchmax.server")


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def build_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    ctx = ServerContext(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if hasattr(engine, "add") or hasattr(engine, "step"):  # an engine, not a factory
            ctx.attach(engine, OpenAIServing)
        else:  # a factory: load in a thread while the port already answers (503)
            loader = asyncio.create_task(_load(ctx, engine))
        stats_task = None
        if settings.log_stats_interval > 0:
            stats_task = asyncio.create_task(log_stats(ctx.stats_sample, settings.log_stats_interval))
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            if loader is not None and not loader.done():
                loader.cancel()
            if ctx.engine is not None:
                await asyncio.to_thread(ctx.engine.shutdown)
            if ctx.serving is not None:
                ctx.serving.close()

    # /openapi.json is served by routes.py, behind the API key like every other route
    app = FastAPI(title="batchmax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bm = ctx

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return _error(APIError(400, f"Invalid value for '{'.'.join(loc)}': {first.get('msg', 'invalid')}.", param=loc[0] if loc else None, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"Unknown route: {request.method} {request.url.path}"
        code = "invalid_request" if exc.status_code == 400 else None  # every 400 carries a code
        return _error(APIError(exc.status_code, msg, kind, code=code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        # the client went away before its body was read whole (an abandoned upload): nothing
        # is wrong here, and nobody reads the answer
        logger.debug("client %s disconnected before sending the whole body of %s %s",
                     request.client.host if request.client else "?", request.method, request.url.path)
        return Response(status_code=499)  # nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, f"Internal server error ({type(exc).__name__}).", "server_error"))

    app.include_router(routes.router)
    install_openapi(app)
    # the last added runs first: every response, CORS preflights included, gets its
    # X-Request-Id and an access-log line
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers, expose_headers=["X-Request-Id"],
        )
    app.add_middleware(RequestContext, access_log=settings.access_log)
    return app


async def _load(ctx: ServerContext, factory: Callable[[], Any]) -> None:
    try:
        engine = await asyncio.to_thread(factory)
        ctx.attach(engine, OpenAIServing)
        logger.info("model %s loaded; ready", ctx.model_name)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - report any load failure, then stop the server
        ctx.load_error = exc
        logger.exception("loading the model failed")
        if ctx.on_fatal is not None:
            ctx.on_fatal()


async def drain(app: FastAPI, timeout: float) -> bool:
    """Stop admitting (``/health`` and new calls answer 503), let in-flight calls finish for
    up to ``timeout`` seconds, then abort the rest. True if everything finished in time."""
    ctx: ServerContext = app.state.bm
    ctx.draining = True
    loop = asyncio.get_running_loop()

    def busy() -> bool:
        return ctx.inflight > 0 or (ctx.engine is not None and ctx.engine.num_unfinished > 0)

    deadline = loop.time() + timeout
    logger.info("draining: %d call(s) in flight, up to %.1f s", ctx.inflight, timeout)
    while busy() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not busy():
        logger.info("drained")
        return True
    logger.warning("shutdown timeout: aborting %d call(s)", ctx.inflight)
    if ctx.engine is not None:
        ctx.engine.abort_all()
    grace = loop.time() + 5.0  # let the aborted calls send their error answers
    while busy() and loop.time() < grace:
        await asyncio.sleep(0.05)
    return False

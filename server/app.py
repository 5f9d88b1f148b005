"""The FastAPI app: ``build_app(engine, settings)``, its lifespan, error handlers and drain.

``engine`` may be an ``AsyncEngine``, a synchronous ``LLMEngine`` (wrapped here), or a
zero-argument factory returning either. A factory runs in a worker thread after startup,
so the port answers at once and ``/health`` says 503 until the model is loaded.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import AsyncEngine
from server.metrics import ServerMetrics
from server.openapi import install_openapi
from server.protocol import APIError
from server.settings import ServerSettings

logger = logging.getLogger("batchmax.server")


class ServerContext:
    """Everything the routes share: the engine, settings, metrics and lifecycle state."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.tokenizer = None  # the server's own copy: HF fast tokenizers are not safe to share across threads
        self.serving = None  # OpenAIServing, once loaded
        self.metrics = ServerMetrics(self._stats, lambda: self.model_name)
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.inflight = 0
        """Generation calls admitted and not yet answered (streams count until they end)."""
        self.on_fatal: Callable[[], None] | None = None
        """Called when the model fails to load (the CLI stops the server with it)."""

    def _stats(self):
        return self.engine.stats() if self.engine is not None else None

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.engine.model_name if self.engine is not None else "unknown"

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def attach(self, engine: Any) -> None:
        """Take a loaded engine (sync or async) and become ready."""
        from server.serving import OpenAIServing

        if not isinstance(engine, AsyncEngine):
            engine = AsyncEngine(engine)
        if engine.on_step is None:
            engine.on_step = self.metrics.on_step
        self.engine = engine
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)  # None: a tokenizer-less engine
        except Exception:  # some tokenizers cannot be copied; share it then
            self.tokenizer = engine.tokenizer
        self.serving = OpenAIServing(self)
        self.metrics.init_labels()
        self.ready = True

    # ---------------------------------------------------------------- admission
    def admit(self, n: int = 1) -> "Ticket":
        """Let a generation call in, or refuse it with 503 (loading, draining, queue full)."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.draining:
            self.metrics.rejected("draining")
            raise APIError(503, "The server is shutting down.", "server_error", code="server_shutting_down", headers=retry)
        if not self.ready:
            self.metrics.rejected("loading")
            raise APIError(503, "The model is still loading.", "server_error", code="model_loading", headers=retry)
        if self.engine.num_waiting >= self.settings.max_queued:
            self.metrics.rejected("queue_full")
            raise APIError(
                503, f"The server is overloaded: {self.engine.num_waiting} requests are already queued. Retry later.",
                "server_error", code="queue_full", headers=retry,
            )
        self.inflight += 1
        return Ticket(self)


class Ticket:
    """One admitted generation call; ``release()`` (idempotent) when its response has ended."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.ctx.inflight -= 1


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def build_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    from server import routes

    settings = settings or ServerSettings()
    ctx = ServerContext(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if isinstance(engine, AsyncEngine) or hasattr(engine, "step"):
            ctx.attach(engine)
        else:  # a factory: load in a thread while the port already answers (503)
            loader = asyncio.create_task(_load(ctx, engine))
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            if ctx.engine is not None:
                await asyncio.to_thread(ctx.engine.shutdown)
            if ctx.serving is not None:
                ctx.serving.close()

    app = FastAPI(title="batchmax", lifespan=lifespan, docs_url=None, redoc_url=None)
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
        return _error(APIError(exc.status_code, msg, kind, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, f"Internal server error ({type(exc).__name__}).", "server_error"))

    app.include_router(routes.router)
    install_openapi(app)
    return app


async def _load(ctx: ServerContext, factory: Callable[[], Any]) -> None:
    try:
        engine = await asyncio.to_thread(factory)
        ctx.attach(engine)
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


def version() -> str:
    with contextlib.suppress(Exception):
        from importlib.metadata import version as v

        return v("batchmax")
    return "0.1.0"


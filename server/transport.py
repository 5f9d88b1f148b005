"""Connection bounds: what uvicorn is told (``uvicorn_config``) and what its HTTP protocol is
given on top (``BoundedH11Protocol``).

Without bounds a socket costs the server a file descriptor for as long as the client
likes: uvicorn closes idle connections only after a response (``timeout_keep_alive``) and
has no deadline for a request's headers or body. What bounds each stage of a connection:

- before the request's headers are complete: ``timeout_header``, here (``BoundedH11Protocol``:
  uvicorn has not called the app yet), measured from the connection's opening or, on a
  kept-alive connection, from the first byte of the next request; their size:
  ``max_header_bytes`` (h11's ``max_incomplete_event_size``, 400 beyond);
- the request body: ``timeout_body`` (whole body) and ``timeout_body_chunk`` (between two of
  its pieces), in ``request_body.read_body`` (408); a body still arriving after the response
  (the app answered without reading it, a 401 or a 413 say) is discarded for what is left of
  ``timeout_body``, then the connection is closed;
- between requests: uvicorn's ``timeout_keep_alive``;
- how many connections are served at once: ``limit_concurrency``; a request on a connection
  beyond it is answered 503 in OpenAI's error format and the connection closed (uvicorn's
  own 503 is plain text, so the count is checked here: the same test, on the same sets).
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from batchmax.server.protocol import APIError
from batchmax.server.settings import ServerSettings

logger = logging.getLogger("batchmax.server")

FD_HEADROOM = 128
"""File descriptors the front end needs besides its connections (engine-core sockets, logs,
the model's files while loading)."""


def error_bytes(status: int, reason: str, err: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying ``err`` in OpenAI's format, closing the connection:
    for answers written before or outside the app (no request cycle to write through)."""
    body = json.dumps(err.body(), separators=(",", ":")).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in err.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a deadline for each request's headers, a bounded discard
    of a body nobody reads, and the concurrency limit answered in OpenAI's format.
    ``bounded_protocol(settings)`` makes the class uvicorn is given (``http=``)."""

    timeout_header: float = 10.0
    timeout_body: float = 60.0
    retry_after_s: int = 1
    _warned_at = 0.0  # rate limit of the over-the-limit warning (class-wide: one per server)

    def __init__(self, config: uvicorn.Config, server_state, app_state: dict[str, Any], _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None
        self._discard_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the next request seen while its head is incomplete
        self._cycle_seen = None  # the request cycle whose head was seen last
        self._body_deadline = 0.0
        # uvicorn would answer over the limit itself, in plain text: check it in _limited instead
        self._limit = self.limit_concurrency
        self.limit_concurrency = None
        if self._limit is not None:
            self._app = self.app
            self.app = self._limited

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # waiting for a request's head
            self._head_bytes += len(data)
            self._arm_header_timer()  # on a kept-alive connection: the next request's first bytes
        super().data_received(data)
        self._after_events()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may parse a pipelined request
        self._after_events()
        cycle = self.cycle
        if (cycle is not None and cycle.response_complete and self.conn.their_state is h11.SEND_BODY
                and not self.transport.is_closing() and self._discard_timer is None):
            # answered before the body was read whole: uvicorn discards the rest as it comes,
            # here only until the body's deadline
            delay = max(0.0, self._body_deadline - self.loop.time())
            self._discard_timer = self.loop.call_later(delay, self._discard_timeout)

    # ---------------------------------------------------------------- the header deadline
    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.timeout_header > 0:
            self._header_timer = self.loop.call_later(self.timeout_header, self._header_timeout)

    def _after_events(self) -> None:
        """After h11 has parsed what arrived: a new request cycle means a complete head, which
        stops the header clock and starts the body's."""
        if self.cycle is self._cycle_seen:
            return
        self._cycle_seen = self.cycle
        self._head_bytes = 0
        self._body_deadline = self.loop.time() + self.timeout_body
        self._cancel_timers()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes:  # part of a request came: say why it ends (an idle one just closes)
            logger.debug("closing %s: request headers incomplete after %.1f s", _peer(self.client), self.timeout_header)
            err = APIError(408, f"The request headers did not arrive within {self.timeout_header:g} s.",
                           "invalid_request_error", code="request_timeout")
            self.transport.write(error_bytes(408, "Request Timeout", err))
        self.transport.close()

    def _discard_timeout(self) -> None:
        self._discard_timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            logger.debug("closing %s: request body still arriving after its response", _peer(self.client))
            self.transport.close()

    def _cancel_timers(self) -> None:
        for name in ("_header_timer", "_discard_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

    # ---------------------------------------------------------------- the concurrency limit
    async def _limited(self, scope, receive, send) -> None:
        # uvicorn's test (a request is refused when its connection or its task would pass the
        # limit), made when the task starts: both sets already hold this request's own
        limit = self._limit
        if scope["type"] != "http" or (len(self.connections) <= limit and len(self.tasks) <= limit):
            await self._app(scope, receive, send)
            return
        now = time.monotonic()
        if now - BoundedH11Protocol._warned_at > 10:
            BoundedH11Protocol._warned_at = now
            logger.warning("over the concurrency limit (%d connections open, limit %d): answering 503",
                           len(self.connections), limit)
        err = APIError(503, f"The server has too many connections open (at most {limit}); retry later.",
                       "server_error", code="too_many_connections", headers={"retry-after": str(self.retry_after_s)})
        body = json.dumps(err.body(), separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), (b"retry-after", str(self.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # ---------------------------------------------------------------- malformed requests
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (or whose head passes
        ``max_header_bytes``), in OpenAI's format."""
        self._cancel_timers()
        if self.cycle is not None and self.cycle.response_started:  # too late for an answer
            self.transport.close()
            return
        err = APIError(400, msg, "invalid_request_error", code="invalid_http_request")
        self.transport.write(error_bytes(400, "Bad Request", err))
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "a client"


def bounded_protocol(settings: ServerSettings) -> type[BoundedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with ``settings``' deadlines."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {
        "timeout_header": settings.timeout_header,
        "timeout_body": settings.timeout_body,
        "retry_after_s": settings.retry_after_s,
    })


def uvicorn_config(app, settings: ServerSettings, **kwargs: Any) -> uvicorn.Config:
    """``uvicorn.Config`` for ``app`` with every connection bound of ``settings``."""
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        http=bounded_protocol(settings),
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        **kwargs,
    )


def ensure_open_files(connections: int) -> int:
    """Raise this process' soft open-file limit, if it must and may, so that ``connections``
    sockets fit besides what the server needs; otherwise warn: past the limit the kernel
    refuses new connections (EMFILE) before ``limit_concurrency`` can answer them. Returns the
    soft limit."""
    need = connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        if soft < need:
            logger.warning("the open-file limit (%d) is below --limit-concurrency (%d) + %d: beyond about %d connections "
                           "new ones are refused by the kernel; raise `ulimit -n` or lower --limit-concurrency",
                           soft, connections, FD_HEADROOM, max(0, soft - FD_HEADROOM))
    return soft

"""``RequestContext``: the outermost ASGI layer of the app (inside Starlette's own error
middleware). Per HTTP request it

- takes the client's ``X-Request-Id`` (printable ASCII, at most 128 characters) or makes one,
  keeps it in ``request.state.request_id`` (completion ids end in it) and returns it on every
  response, errors included;
- answers an exception that escaped the app with a 500 in OpenAI's error format (and the id);
- writes one access-log line when the response has ended (a stream: when it ends), on the
  ``batchmax.access`` logger at info level::

      POST /v1/completions 200 41.3ms request_id=3f2a... client=127.0.0.1:51234 prompt_tokens=5 completion_tokens=16

  ``prompt_tokens`` / ``completion_tokens`` (and ``user`` when the body named one) only for
  generation calls, from what the handler put in ``request.state.usage``. The same values are
  on the log record as attributes (``record.status``, ``record.duration_ms``, ...).

A pure ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which would wrap
``receive`` and hide a client's disconnect from the streaming responses.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from batchmax.server.protocol import APIError

access_logger = logging.getLogger("batchmax.access")
logger = logging.getLogger("batchmax.server")

_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def _clean(s: str) -> str:
    """Text from a client, fit for one log line (control characters and quotes escaped)."""
    return repr(s)[1:-1]


class RequestContext:
    def __init__(self, app, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        rid = given if given is not None and _VALID_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status: int | None = None

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status is not None:  # the response had begun: nothing more can be said
                raise
            logger.exception("unhandled error on %s", scope.get("path"))
            err = APIError(500, f"Internal server error ({type(exc).__name__}).", "server_error")
            from fastapi.responses import JSONResponse

            await JSONResponse(err.body(), status_code=500)(scope, receive, send_with_id)
        finally:
            if self.access_log:
                self._log(scope, state, rid, status, (time.perf_counter() - start) * 1000)

    @staticmethod
    def _log(scope, state: dict, rid: str, status: int | None, ms: float) -> None:
        client = scope.get("client")
        fields = {
            "method": scope.get("method", ""),
            "path": _clean(scope.get("path", "")),
            "status": status if status is not None else 0,  # 0: nothing was sent
            "duration_ms": round(ms, 1),
            "request_id": rid,
            "client": f"{client[0]}:{client[1]}" if client else "-",
        }
        line = f"{fields['method']} {fields['path']} {fields['status']} {fields['duration_ms']:.1f}ms request_id={rid} client={fields['client']}"
        usage = state.get("usage")
        if usage is not None:
            fields["prompt_tokens"], fields["completion_tokens"] = usage
            line += f" prompt_tokens={usage[0]} completion_tokens={usage[1]}"
        user = state.get("user")
        if user is not None:
            fields["user"] = user
            line += f' user="{_clean(user)}"'
        access_logger.info(line, extra=fields)

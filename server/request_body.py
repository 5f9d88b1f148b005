"""Reading a request body with a size limit and deadlines.

Without a size limit a client can make the server buffer any amount (a multi-gigabyte body
would exhaust its memory before validation ever runs). The limit is checked against
``Content-Length`` first and again while reading (chunked bodies carry no length), so an
oversized body is refused with an OpenAI-style 413 and never held whole.

Without deadlines a client that stops sending mid-body holds its connection (and this
coroutine) forever: the whole body must arrive within ``timeout_body`` seconds and no gap
between two of its pieces may pass ``timeout_body_chunk`` (408, and the connection closes).
A client that disconnects mid-body raises starlette's ``ClientDisconnect``, which the app
answers quietly (``app.py``: a debug line, no traceback).
"""
from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.requests import ClientDisconnect

from batchmax.server.protocol import APIError


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the server accepts ({limit} bytes).",
                    "invalid_request_error", code="request_too_large")


def timed_out(message: str) -> APIError:
    # the connection closes: the rest of a body that stalled is not waited for
    return APIError(408, message, "invalid_request_error", code="request_timeout", headers={"Connection": "close"})


async def read_body(request: Request, limit: int, timeout: float | None = None, chunk_timeout: float | None = None) -> bytes:
    """The whole body, at most ``limit`` bytes (413), within ``timeout`` seconds in all and
    ``chunk_timeout`` seconds between pieces (408); ``None``: no deadline."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    chunks: list[bytes] = []
    size = 0
    while True:
        wait = chunk_timeout
        if deadline is not None:
            left = deadline - loop.time()
            wait = left if wait is None else min(wait, left)
        try:
            async with asyncio.timeout(wait):
                message = await request.receive()
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                raise timed_out(f"The request body did not arrive within {timeout:g} s ({size} bytes came).") from None
            raise timed_out(f"The request body stalled: nothing came for {chunk_timeout:g} s ({size} bytes came).") from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)

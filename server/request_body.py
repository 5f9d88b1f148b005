"""Reading a request body with a size limit.

Without one, a client can make the server buffer any amount (a multi-gigabyte body would
exhaust its memory before validation ever runs). The limit is checked against
``Content-Length`` first and again while reading (chunked bodies carry no length), so an
oversized body is refused with an OpenAI-style 413 and never held whole.
"""
from __future__ import annotations

from fastapi import Request

from batchmax.server.protocol import APIError


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the server accepts ({limit} bytes).",
                    "invalid_request_error", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)

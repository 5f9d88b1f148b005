"""Hermes-style calls (Qwen2.5, Qwen3, Hermes 2/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
any number of them, with text around them.

A block is a call when its body is one JSON object with a string ``name`` and an object
``arguments``; any other body (malformed JSON, a missing name) leaves the whole block,
tags included, as content. A block the output ends inside (no ``</tool_call>``) is judged
the same way at the end, as vLLM's parser does.
"""
from __future__ import annotations

import json

from batchmax.server.tool_parsers.base import Content, Event, ToolParser, call_from_json, until_tag

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = (OPEN,)

    def __init__(self) -> None:
        self.buf = ""
        self.in_call = False

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while True:
            if not self.in_call:
                text, self.buf, found = until_tag(self.buf, OPEN)
                if text:
                    out.append(Content(text))
                if not found:
                    return out
                self.in_call = True
            else:
                j = self.buf.find(CLOSE)
                if j < 0:
                    return out
                out.append(self._block(self.buf[:j], closed=True))
                self.buf = self.buf[j + len(CLOSE):]
                self.in_call = False

    def finish(self) -> list[Event]:
        if self.in_call:
            ev = self._block(self.buf, closed=False)
        else:
            ev = Content(self.buf) if self.buf else None
        self.buf, self.in_call = "", False
        return [ev] if ev is not None else []

    @staticmethod
    def _block(body: str, closed: bool) -> Event:
        try:
            call = call_from_json(json.loads(body))
        except ValueError:
            call = None
        if call is not None:
            return call
        return Content(OPEN + body + (CLOSE if closed else ""))

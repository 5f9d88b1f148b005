"""Llama 3.1 / 3.2 JSON calls: the output is ``{"name": ..., "parameters": {...}}`` (vLLM's
``llama3_json``), optionally after ``<|python_tag|>``, several separated by ``;``.

The output is a call only if it starts (after whitespace) with ``<|python_tag|>`` or ``{``;
text that starts otherwise is plain content, as in vLLM. Each object becomes a call as soon
as it is complete; if the first one is not a call (malformed, no name), the whole output is
content. Text after the last call that is not another call is content.
"""
from __future__ import annotations

import json

from batchmax.server.tool_parsers.base import Call, Content, Event, ToolParser, call_from_json
from batchmax.server.tool_parsers.json_scan import JsonEnd

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def __init__(self) -> None:
        self.buf = ""
        self.mode = "start"  # start -> calls | text
        self.head = ""
        """What was consumed before the first object (whitespace, the python tag): given
        back as content if the output turns out not to be calls."""
        self.scan: JsonEnd | None = None
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while True:
            if self.mode == "text":
                if self.buf:
                    out.append(Content(self.buf))
                    self.buf = ""
                return out
            if self.mode == "start":
                s = self.buf.lstrip()
                if not s or (PYTHON_TAG.startswith(s) and s != PYTHON_TAG):
                    return out  # not decided yet
                if s.startswith(PYTHON_TAG):
                    cut = len(self.buf) - len(s) + len(PYTHON_TAG)
                    self.head, self.buf = self.buf[:cut], self.buf[cut:]
                    self.mode = "calls"
                elif s.startswith("{"):
                    self.mode = "calls"
                else:
                    self.mode = "text"
                continue
            if self.scan is None:
                # before an object: whitespace, and ';' between calls; anything else ends them
                s = self.buf.lstrip()
                if self.calls:
                    while s.startswith(";"):
                        s = s[1:].lstrip()
                if not s:
                    return out
                if not s.startswith("{"):
                    self._to_text()
                    continue
                self.head += self.buf[: len(self.buf) - len(s)] if not self.calls else ""
                self.buf = s
                self.scan = JsonEnd()
            n = self.scan.over(self.buf)
            if n is None:
                return out
            call = self._call(self.buf[:n])
            if call is None:
                self._to_text()
                continue
            self.buf = self.buf[n:]
            self.scan = None
            self.calls += 1
            self.head = ""
            out.append(call)

    def _to_text(self) -> None:
        """The rest is content: all of it (with what was consumed) if no call came first."""
        self.buf = self.head + self.buf if not self.calls else self.buf
        self.head, self.scan, self.mode = "", None, "text"

    def finish(self) -> list[Event]:
        if self.mode != "text":
            self._to_text()
        rest, self.buf = self.buf, ""
        # after calls, only whitespace or separators left: nothing to say
        if not rest or (self.calls and not rest.strip().strip(";").strip()):
            return []
        return [Content(rest)]

    @staticmethod
    def _call(obj_text: str) -> Call | None:
        try:
            return call_from_json(json.loads(obj_text), keys=("parameters", "arguments"))
        except ValueError:
            return None

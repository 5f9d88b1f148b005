"""Calls the engine's structured output guarantees (``tool_choice`` ``required`` or naming a
function), parsed with the same event interface as the model families' parsers.

* named: the constraint is the function's parameters schema, so the whole output is the
  arguments; they stream as they are generated (``CallStart`` then ``ArgsDelta``s), since
  constrained output cannot turn out malformed (only cut short: ``finish_reason`` says so).
* required: the output is a JSON array of ``{"name": ..., "parameters": {...}}``; each
  element becomes a call once it is complete. Whatever does not parse (output cut short by
  ``max_tokens``) is content.
"""
from __future__ import annotations

import json

from batchmax.server.tool_parsers.base import ArgsDelta, CallStart, Content, Event, ToolParser, call_from_json
from batchmax.server.tool_parsers.json_scan import JsonEnd


class NamedCallParser(ToolParser):
    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function
        self.started = False

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        if not self.started:
            out.append(CallStart(self.function))
            self.started = True
        if text:
            out.append(ArgsDelta(text))
        return out

    def finish(self) -> list[Event]:
        return [] if self.started else [CallStart(self.function)]


class RequiredCallsParser(ToolParser):
    name = "required"

    def __init__(self) -> None:
        self.buf = ""
        self.opened = False
        self.closed = False
        self.scan: JsonEnd | None = None

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while not self.closed:
            if self.scan is None:
                s = self.buf.lstrip()
                if not self.opened:
                    if not s:
                        return out
                    if s[0] != "[":
                        self.closed = True  # not an array: content
                        break
                    self.opened, s = True, s[1:]
                s = s.lstrip()
                if s.startswith(","):
                    s = s[1:].lstrip()
                self.buf = s
                if not s:
                    return out
                if s[0] == "]":
                    self.buf, self.closed = s[1:], True
                    break
                if s[0] != "{":
                    self.closed = True
                    break
                self.scan = JsonEnd()
            n = self.scan.over(self.buf)
            if n is None:
                return out
            try:
                call = call_from_json(json.loads(self.buf[:n]), keys=("parameters", "arguments"))
            except ValueError:
                call = None
            if call is None:
                self.closed = True
                break
            self.buf, self.scan = self.buf[n:], None
            out.append(call)
        return out

    def finish(self) -> list[Event]:
        rest, self.buf = self.buf, ""
        return [Content(rest)] if rest.strip() else []

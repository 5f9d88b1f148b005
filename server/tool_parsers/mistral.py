"""Mistral calls, both syntaxes vLLM's ``mistral`` parser reads:

* tokenizers before v11: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, one JSON
  array of calls;
* v11 and later: ``[TOOL_CALLS]name[ARGS]{...}``, repeated for each call.

Text before the first ``[TOOL_CALLS]`` is content. ``[TOOL_CALLS]`` is a special token, so
requests parsed by this family keep special tokens in the text (vLLM does the same). Call ids
are 9 alphanumeric characters: Mistral's chat templates refuse any other id when the call
comes back in the history.
"""
from __future__ import annotations

import json
import re

from batchmax.server.tool_parsers.base import Call, Content, Event, ToolParser, call_from_json, random_alnum, until_tag
from batchmax.server.tool_parsers.json_scan import JsonEnd

MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = (MARK,)
    keep_special_tokens = True

    def __init__(self) -> None:
        self.buf = ""
        self.state = "text"  # text | after_mark | array | name | args
        self.scan: JsonEnd | None = None
        self.fn = ""

    @staticmethod
    def call_id() -> str:
        return random_alnum(9)

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[Event]) -> bool:
        """One transition; False when it needs more text."""
        if self.state == "text":
            text, self.buf, found = until_tag(self.buf, MARK)
            if text:
                out.append(Content(text))
            if not found:
                return False
            self.state = "after_mark"
            return True
        if self.state == "after_mark":
            s = self.buf.lstrip()
            if not s:
                return False
            self.buf = s
            self.state = "array" if s[0] == "[" else "name"
            self.scan = JsonEnd() if s[0] == "[" else None
            return True
        if self.state == "array":
            n = self.scan.over(self.buf)
            if n is None:
                return False
            raw, self.buf = self.buf[:n], self.buf[n:]
            calls = self._array(raw)
            out.extend(calls if calls is not None else [Content(MARK + raw)])
            self.state, self.scan = "text", None
            return True
        if self.state == "name":
            head, rest, found = until_tag(self.buf, ARGS)
            if not found:  # a name so far (and perhaps the start of [ARGS]): wait
                if head == "" or _NAME.fullmatch(head):
                    return False
            elif _NAME.fullmatch(head.strip()):
                self.fn, self.buf = head.strip(), rest
                self.state, self.scan = "args", None
                return True
            out.append(Content(MARK + self.buf))  # not a function name: what came is text
            self.buf, self.state = "", "text"
            return False
        # args: the JSON object after [ARGS]
        if self.scan is None:
            s = self.buf.lstrip()
            if not s:
                return False
            if s[0] != "{":
                out.append(Content(MARK + self.fn + ARGS + self.buf))
                self.buf, self.state = "", "text"
                return False
            self.buf = s
            self.scan = JsonEnd()
        n = self.scan.over(self.buf)
        if n is None:
            return False
        raw, self.buf = self.buf[:n], self.buf[n:]
        try:
            call = call_from_json({"name": self.fn, "arguments": json.loads(raw)})
        except ValueError:
            call = None
        out.append(call if call is not None else Content(MARK + self.fn + ARGS + raw))
        self.state, self.scan = "text", None
        return True

    @staticmethod
    def _array(raw: str) -> list[Call] | None:
        try:
            items = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(items, list) or not items:
            return None
        calls = [call_from_json(x) for x in items]
        return None if any(c is None for c in calls) else calls

    def finish(self) -> list[Event]:
        rest, state = self.buf, self.state
        self.buf, self.state, self.scan = "", "text", None
        if state == "text":
            return [Content(rest)] if rest else []
        prefix = MARK + (self.fn + ARGS if state == "args" else "")
        return [Content(prefix + rest)]

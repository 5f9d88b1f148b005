"""One chat choice's output as OpenAI's message: reasoning taken out first
(``reasoning_parsers``), then tool calls (``tool_parsers``), the rest content.

``feed(text)`` returns the stream deltas this text decides (OpenAI's ``delta`` objects);
``finish()`` those the end decides; ``message()`` the whole message's fields. A non-streaming
response feeds the whole text once; both therefore say the same.

* reasoning goes out as ``reasoning`` and ``reasoning_content`` (vLLM's new name and the one
  it deprecated but still sends; clients read either);
* a call's first delta carries ``index``, ``id``, ``type`` and ``function.name`` (with empty
  ``arguments``), later ones ``function.arguments`` pieces;
* with a tool parser, content around calls is trimmed (leading and trailing whitespace: the
  newlines templates put between calls would otherwise be content), and beyond ``max_calls``
  (``parallel_tool_calls: false``) calls are dropped, as vLLM does.
"""
from __future__ import annotations

from typing import Any, Callable

from batchmax.server.reasoning_parsers import ReasoningParser
from batchmax.server.tool_parsers import Call, CallStart, Content, Event, ToolParser


class ChatOutputParser:
    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None,
                 max_calls: int | None = None, call_id: Callable[[], str] | None = None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.max_calls = max_calls
        self.call_id = call_id or (tools.call_id if tools is not None else ToolParser.call_id)
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self._dropping = False  # inside a streamed call beyond max_calls
        self._ws = ""  # trailing whitespace of the content, held (tool parsing trims it)
        self._started = False  # some content has gone out

    # ---------------------------------------------------------------- pieces
    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._route(*(self.reasoning.feed(text) if self.reasoning else ("", text)), final=False)

    def finish(self) -> list[dict[str, Any]]:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        return self._route(reasoning, content, final=True)

    def _route(self, reasoning: str, content: str, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if reasoning:
            self.thinking.append(reasoning)
            deltas.append({"reasoning": reasoning, "reasoning_content": reasoning})
        if self.tools is None:
            if content:
                self.content.append(content)
                deltas.append({"content": content})
            return deltas
        events = self.tools.feed(content) if content else []
        if final:
            events += self.tools.finish()
        for ev in events:
            self._event(ev, deltas)
        if final:
            self._ws = ""  # trailing whitespace is dropped
        return _merged(deltas)

    def _event(self, ev: Event, deltas: list[dict[str, Any]]) -> None:
        if isinstance(ev, Content):
            text = self._ws + ev.text
            body = text.rstrip()
            self._ws = text[len(body):]
            if not self._started:
                body = body.lstrip()
            if body:
                self._started = True
                self.content.append(body)
                deltas.append({"content": body})
            return
        if isinstance(ev, (Call, CallStart)):
            self._dropping = self.max_calls is not None and len(self.calls) >= self.max_calls
            if self._dropping:
                return
            call = {"id": self.call_id(), "type": "function", "function": {"name": ev.name, "arguments": ""}}
            self.calls.append(call)
            index = len(self.calls) - 1
            deltas.append({"tool_calls": [{"index": index, **call, "function": dict(call["function"])}]})
            args = ev.arguments if isinstance(ev, Call) else ""
        else:
            if self._dropping or not self.calls:
                return
            args = ev.text
        if args:
            self.calls[-1]["function"]["arguments"] += args
            deltas.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": args}}]})

    # ---------------------------------------------------------------- whole
    def message(self) -> dict[str, Any]:
        """``content``, ``reasoning``, ``reasoning_content``, ``tool_calls`` of the message."""
        content = "".join(self.content)
        reasoning = "".join(self.thinking) or None
        return {
            "content": None if content == "" and (self.calls or reasoning) else content,
            "reasoning": reasoning,
            "reasoning_content": reasoning,
            "tool_calls": [dict(c, function=dict(c["function"])) for c in self.calls] or None,
        }


def _merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent deltas of the same kind as one (fewer, larger stream chunks); a call's first
    delta (id, name) stays apart from its arguments."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is not None and "content" in d and set(prev) == {"content"}:
            prev["content"] += d["content"]
        elif (prev is not None and "tool_calls" in d and "tool_calls" in prev
              and set(d["tool_calls"][0]) == set(prev["tool_calls"][0]) == {"index", "function"}
              and prev["tool_calls"][0]["index"] == d["tool_calls"][0]["index"]):
            prev["tool_calls"][0]["function"]["arguments"] += d["tool_calls"][0]["function"]["arguments"]
        else:
            out.append(d)
    return out

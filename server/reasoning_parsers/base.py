"""Reasoning parsers: split a model's output into its thinking (``<think>...</think>``) and
the answer, piece by piece.

``feed(text)`` returns ``(reasoning, content)`` text decided so far; ``finish()`` what the end
decides. As with tool parsers (``server/tool_parsers/base.py``) one state machine serves
streamed and whole outputs, so a stream reassembles exactly to the non-streamed message.
A tag split across pieces is held back until the next piece says what it is.
"""
from __future__ import annotations

from typing import ClassVar

from batchmax.server.tool_parsers.base import until_tag

THINK, END_THINK = "<think>", "</think>"


class ReasoningParser:
    name: ClassVar[str]
    starts_in_reasoning: ClassVar[bool]
    """The output begins inside the thinking (its ``<think>`` may be in the prompt)."""
    honours_enable_thinking: ClassVar[bool] = False
    """``chat_template_kwargs.enable_thinking: false`` turns parsing off (the template then
    writes an empty thinking block into the prompt and the output is all answer)."""

    def __init__(self) -> None:
        self.buf = ""
        self.state = "start"  # start | reasoning | content

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            s = self.buf
            if THINK.startswith(s) and s != THINK:
                return "", ""  # might still become <think>
            if s.startswith(THINK):
                self.buf, self.state = s[len(THINK):], "reasoning"
            else:
                self.state = "reasoning" if self.starts_in_reasoning else "content"
        if self.state == "reasoning":
            reasoning, self.buf, found = until_tag(self.buf, END_THINK)
            if not found:
                return reasoning, ""
            self.state = "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, state = self.buf, self.state
        self.buf = ""
        if state == "reasoning":
            return rest, ""
        if state == "start":  # output shorter than "<think>"
            return ("", rest) if not self.starts_in_reasoning else (rest, "")
        return "", rest

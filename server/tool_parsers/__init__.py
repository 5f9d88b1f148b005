"""Tool-call parsers, one file per model family, and their registry.

``TOOL_PARSERS`` maps the names ``--tool-call-parser`` takes (vLLM's names) to parser classes;
``detect_tool_parser`` picks one from a chat template's text when none is given. To add a
family: a ``ToolParser`` subclass in a file of its own (``name``, ``markers``, ``feed``,
``finish``), listed here.
"""
from __future__ import annotations

from batchmax.server.tool_parsers.base import ArgsDelta, Call, CallStart, Content, Event, ToolParser
from batchmax.server.tool_parsers.hermes import HermesToolParser
from batchmax.server.tool_parsers.llama3_json import Llama3JsonToolParser
from batchmax.server.tool_parsers.mistral import MistralToolParser

# detection order matters: a template may mention another family's marker in passing, so the
# most specific markers come first
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, MistralToolParser, Llama3JsonToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; available: {', '.join(sorted(TOOL_PARSERS))}") from None


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The family whose call markers the chat template holds, else None."""
    if not chat_template:
        return None
    for name, cls in TOOL_PARSERS.items():
        if any(m in chat_template for m in cls.markers):
            return name
    return None


__all__ = ["TOOL_PARSERS", "ArgsDelta", "Call", "CallStart", "Content", "Event", "ToolParser", "detect_tool_parser",
           "get_tool_parser"]

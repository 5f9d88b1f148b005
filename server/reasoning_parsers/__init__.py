"""Reasoning parsers (``--reasoning-parser``), one file per family, and their registry. To add
one: a ``ReasoningParser`` subclass in a file of its own, listed in ``REASONING_PARSERS``."""
from __future__ import annotations

from batchmax.server.reasoning_parsers.base import ReasoningParser
from batchmax.server.reasoning_parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from batchmax.server.reasoning_parsers.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; available: {', '.join(sorted(REASONING_PARSERS))}") from None


__all__ = ["REASONING_PARSERS", "ReasoningParser", "get_reasoning_parser"]

"""Qwen3: the thinking is ``<think>...</think>`` at the start of the output. An output that
does not start with ``<think>`` has no reasoning (Qwen3 with thinking switched off, or a
model that skipped it); an unclosed ``<think>`` (cut short by ``max_tokens``) is all
reasoning. ``enable_thinking: false`` in ``chat_template_kwargs`` turns parsing off, as in vLLM.
"""
from __future__ import annotations

from batchmax.server.reasoning_parsers.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    starts_in_reasoning = False
    honours_enable_thinking = True

"""DeepSeek-R1 (and QwQ, Qwen3 thinking-2507): the chat template may end the prompt with
``<think>``, so the output starts inside the thinking, with or without its own ``<think>``;
everything up to ``</think>`` is reasoning, and an output without ``</think>`` is all
reasoning, as in vLLM.
"""
from __future__ import annotations

from batchmax.server.reasoning_parsers.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True

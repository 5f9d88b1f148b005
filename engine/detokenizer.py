"""Incremental detokenization with stop strings.

Decoding only the new token is wrong for byte-level and SentencePiece tokenizers (a
character can span tokens, a leading space depends on the previous token), so each step
decodes a short window of recent tokens and keeps what it adds (the prefix/read offsets of
TGI and vLLM). Text that ends in U+FFFD is an incomplete UTF-8 character and is held back.
"""
from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context, so the first generated token decodes with its space.
_CONTEXT = 5


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.stopped_on: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a generated token; returns the stop string it completed, if any (the text is
        then cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # nothing new yet, or an incomplete character
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        if not (check_stop and self.stop):
            return None
        # the earliest stop string that now appears, searching only where it could be new
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.stopped_on = s
            return s
        return None

    def flush(self) -> None:
        """At the end: keep whatever is still held back (an incomplete character decodes to
        U+FFFD, as it would in any client)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)

    def safe_text(self, finished: bool) -> str:
        """The text to show now: while running, without a tail that could begin a stop string."""
        if finished or not self.stop:
            return self.text
        for k in range(min(len(self.text), self.max_stop - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return self.text[:-k]
        return self.text

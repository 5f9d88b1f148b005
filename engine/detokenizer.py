"""Incremental detokenization with stop strings.

Decoding only the new token is wrong for byte-level and SentencePiece tokenizers (a
character can span tokens, a leading space depends on the previous token), so each step
decodes a short window of recent tokens and keeps what it adds (the prefix/read offsets of
TGI and vLLM). Text that ends in U+FFFD is an incomplete UTF-8 character and is held back.

Stop strings cost, per token, time proportional to the new text plus the longest stop string,
times the number of strings, never to the whole text: a new match is looked for only where
it could end in the new text, and the tail held back while running (the longest end of the
text that could begin a stop string) comes from one KMP matcher per string, advanced over the
new text only.
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
        # per stop string: its KMP failure function (made when first needed) and how much of
        # it the text ends with
        self._borders: list[list[int] | None] = [None] * len(self.stop)
        self._matched = [0] * len(self.stop)
        self._held = 0  # chars at the end of the text that could begin a stop string

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
        if not self.stop:
            return None
        self._advance(delta)
        if not check_stop:
            return None
        # the earliest stop string that now appears, searching only where it could be new
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.stopped_on = s
            self._held = 0
            return s
        return None

    def _advance(self, new: str) -> None:
        """Advance every stop string's matcher over ``new`` (just appended to the text) and
        set the held-back length: the longest k <= ``max_stop - 1`` such that the text ends
        with the first k characters of some stop string."""
        cap = self.max_stop - 1
        held = 0
        for j, s in enumerate(self.stop):
            n, m = len(s), self._matched[j]
            if not n:  # an empty string begins nothing
                continue
            i = 0
            if m == 0:  # the common case: skip to the first place the string could begin
                i = new.find(s[0])
                if i < 0:
                    continue
            border = self._borders[j]
            if border is None:
                border = self._borders[j] = _borders(s)
            for ch in new[i:] if i else new:
                if m == n:
                    m = border[n]
                while m and s[m] != ch:
                    m = border[m]
                if s[m] == ch:
                    m += 1
            self._matched[j] = m
            while m > cap:  # the longest string, complete: its longest proper border
                m = border[m]
            held = max(held, m)
        self._held = held

    def flush(self) -> None:
        """At the end: keep whatever is still held back (an incomplete character decodes to
        U+FFFD, as it would in any client)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            delta = full[len(prefix) :]
            self.text += delta
            if self.stop:
                self._advance(delta)
        self.prefix_offset = self.read_offset = len(self.ids)

    def safe_text(self, finished: bool) -> str:
        """The text to show now: while running, without a tail that could begin a stop string
        (computed when text was added, so this costs no search)."""
        if finished or not self._held:
            return self.text
        return self.text[: -self._held]


def _borders(s: str) -> list[int]:
    """KMP failure function: ``b[k]`` is the length of the longest proper prefix of
    ``s[:k]`` that is also its suffix (``b[0] = b[1] = 0``)."""
    b = [0] * (len(s) + 1)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = b[k]
        if s[i] == s[k]:
            k += 1
        b[i + 1] = k
    return b

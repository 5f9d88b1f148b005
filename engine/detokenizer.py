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

Options (``SamplingParams``, as in vLLM): ``skip_special_tokens`` (default) leaves special
tokens out of the text; without it, ``spaces_between_special_tokens`` (default) puts a space
between each special token and the text around it (what vLLM and transformers' slow
tokenizers do; fast tokenizers alone would not). ``include_stop_str_in_output`` keeps the
matched stop string in the text, and then nothing is held back while running (what is shown
is never retracted). The text of a stop token (EOS, ``stop_token_ids``) is left out unless
``include_stop_str_in_output``: the engine does not ``add`` it.
"""
from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context, so the first generated token decodes with its space.
_CONTEXT = 5

# tokenizer id -> (the tokenizer, kept alive so its id is not reused; ids of its special tokens)
_SPECIAL_IDS: dict[int, tuple[Any, frozenset[int]]] = {}


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` leaves out: added tokens marked
    special, and the named special tokens (cached per tokenizer)."""
    hit = _SPECIAL_IDS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    out = frozenset(ids)
    _SPECIAL_IDS[id(tokenizer)] = (tokenizer, out)
    return out


class Detokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop_str_in_output
        # special tokens are shown and spaced: decode around them (slower; only then)
        self._special = special_token_ids(tokenizer) if not skip_special_tokens and spaces_between_special_tokens else None
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

    @classmethod
    def for_params(cls, tokenizer: Any, prompt_ids: list[int], params: Any) -> "Detokenizer":
        """The detokenizer of a request with these ``SamplingParams``."""
        return cls(tokenizer, prompt_ids, params.stop, params.skip_special_tokens,
                   params.spaces_between_special_tokens, params.include_stop_str_in_output)

    def _decode(self, ids: list[int]) -> str:
        if self._special is None:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        # runs of ordinary tokens decoded together, each special token on its own, joined by
        # spaces (vLLM's ``spaces_between_special_tokens``)
        parts: list[str] = []
        run: list[int] = []
        for t in ids:
            if t in self._special:
                if run:
                    parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(self.tokenizer.decode([t], skip_special_tokens=False))
            else:
                run.append(t)
        if run:
            parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
        return " ".join(parts)

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
        if not self.include_stop:  # with the stop string kept, nothing is ever held back
            self._advance(delta)
        if not check_stop:
            return None
        # the earliest stop string that now appears, searching only where it could be new
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
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
            if self.stop and not self.include_stop:
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

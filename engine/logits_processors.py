"""What a request's own parameters do to its logits before sampling, batched on the device:
``logit_bias``, ``allowed_token_ids``, ``bad_words`` and the presence, frequency and repetition
penalties.

State lives in device tables with one row ("slot") per request that uses any of them, taken
at the request's first sampling step and given back when it ends (a preempted request keeps
its slot: its output, and so its counts, survive the recompute):

- ``bias`` (C, V) float32: ``logit_bias`` added, -inf outside ``allowed_token_ids`` and on
  single-token bad words; built once per request.
- ``counts`` (C, V) int32: occurrences of each token in the output; ``seen_prompt`` (C, V)
  bool: the prompt's tokens (repetition_penalty); ``penalties`` (C, 3) float32: repetition,
  frequency, presence.
- ``tails`` (C, K) int64: the output's last K tokens (right-aligned, -1 before the first);
  ``words`` (C, W, K), ``word_last`` (C, W), ``word_valid`` (C, W): each multi-token bad
  word's prefix (right-aligned, ``PAD`` on the left matches anything) and last token.

A step applies them to its sampled rows in one pass (``apply``: the batch's rows and slots
go to the device in one copy, the rest is gathers, elementwise ops and one scatter back),
and after sampling ``update`` adds the sampled ids to ``counts`` and ``tails`` on the device.
So with async scheduling, step n+1 samples from counts that already hold step n's tokens,
which the host has not read yet; and decode CUDA graphs are untouched (this runs on their
logits, after the graph). A table is allocated when the first request needing it arrives;
slots of requests that do not use a table keep its neutral row (bias 0, penalties 1/0/0,
no valid words), so one slot list serves every table. When no sampled request of a step
uses any of this, ``apply`` returns at once: one pass over the batch on the host, no kernel.

Order (vLLM's): allowed_token_ids, bad words and logit_bias first, then the penalties (on the
biased logits); the sampler then suppresses EOS before min_tokens and applies temperature,
min_p, top-k and top-p. Logprobs are read from the processed logits (``Sampler.logprobs``):
what the min_tokens suppression already did, extended to these parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from batchmax.engine.request import Request

PAD = -2
"""A bad word's prefix position that matches any token (words shorter than the table)."""
NO_TOKEN = -1
"""A tail position before the output's first token (never matches a prefix token)."""
MAX_BAD_WORDS = 128
"""Most token sequences ``bad_words`` may become in one request (vLLM's GPU runner's bound)."""
MAX_BAD_WORD_TOKENS = 1024
"""Most tokens all of a request's bad-word sequences may hold together (vLLM's bound)."""
_MIN_SLOTS = 8


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """The token sequences of ``bad_words``, as vLLM makes them: each word (leading spaces
    stripped) tokenized without and with a leading space, so it is caught both at the start of
    the text and after a space. Unlike vLLM, the spaced form is kept whenever it differs, even
    with another number of tokens: vLLM drops it then, and "cares" (two tokens, "c" "ares")
    would not block " cares" (one). Words that are only whitespace are ignored."""
    out: list[list[int]] = []
    for word in words:
        word = word.lstrip()
        if not word:
            continue
        plain = tokenizer.encode(word, add_special_tokens=False)
        if not plain:
            continue
        out.append(plain)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if spaced and spaced != plain:
            out.append(spaced)
    return out


@dataclass
class LogitsSpec:
    """What one request does to its logits, with every token id already checked."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    bad_words: list[list[int]] = field(default_factory=list)
    """Token sequences never to generate."""
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        self.single_words = sorted({w[0] for w in self.bad_words if len(w) == 1})
        self.multi_words = [w for w in self.bad_words if len(w) > 1]
        self.has_bias = bool(self.logit_bias or self.allowed_token_ids is not None or self.single_words)
        self.has_repetition = self.repetition_penalty != 1.0
        self.has_penalties = self.has_repetition or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def word_dims(self) -> tuple[int, int]:
        """(words, longest prefix) of the multi-token bad words."""
        return len(self.multi_words), max((len(w) - 1 for w in self.multi_words), default=0)


@dataclass
class ProcessedBatch:
    """The rows of one step that hold a slot, for ``LogitsProcessors.update``."""

    rows: torch.Tensor
    """(A,) int64: rows of the step's sampled logits."""
    slots: torch.Tensor
    """(A,) int64: their slots."""
    penalties: bool
    words: bool


class LogitsProcessors:
    def __init__(self, vocab_size: int, device: torch.device, to_device) -> None:
        """``to_device(list, dtype)``: the engine's non-stalling host-to-device copy."""
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.to_device = to_device
        self.capacity = 0
        self.free: list[int] = []
        self.bias: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.seen_prompt: torch.Tensor | None = None
        self.penalties: torch.Tensor | None = None
        self.tails: torch.Tensor | None = None
        self.words: torch.Tensor | None = None
        self.word_last: torch.Tensor | None = None
        self.word_valid: torch.Tensor | None = None

    @staticmethod
    def table_bytes(num_slots: int, vocab_size: int) -> int:
        """Device bytes of the per-slot tables at ``num_slots`` slots when every table is in use
        (bias float32, counts int32, seen-in-prompt bool, three penalties float32), not counting
        the bad-words tables, whose size follows the words sent. For sizing the KV pool."""
        return num_slots * (vocab_size * (4 + 4 + 1) + 3 * 4)

    @property
    def num_slots_used(self) -> int:
        return self.capacity - len(self.free)

    # ---- tables -------------------------------------------------------------------------------

    def _full(self, shape: tuple[int, ...], fill, dtype: torch.dtype) -> torch.Tensor:
        return torch.full(shape, fill, dtype=dtype, device=self.device)

    def _grow(self, capacity: int) -> None:
        """Room for ``capacity`` slots: every allocated table grows, keeping its rows."""
        old = self.capacity
        for name, fill in self._fills().items():
            t = getattr(self, name)
            if t is not None:
                new = self._full((capacity, *t.shape[1:]), fill, t.dtype)
                new[:old] = t
                if name == "penalties":
                    new[old:, 0] = 1.0  # repetition 1
                setattr(self, name, new)
        self.free.extend(range(capacity - 1, old - 1, -1))  # lowest slot first
        self.capacity = capacity

    @staticmethod
    def _fills() -> dict[str, float | int | bool]:
        """Each table's neutral value (what a slot not using it holds)."""
        return {"bias": 0.0, "counts": 0, "seen_prompt": False, "penalties": 0.0, "tails": NO_TOKEN,
                "words": PAD, "word_last": 0, "word_valid": False}

    def _ensure_bias(self) -> None:
        if self.bias is None:
            self.bias = self._full((self.capacity, self.vocab_size), 0.0, torch.float32)

    def _ensure_penalties(self) -> None:
        if self.counts is None:
            c, v = self.capacity, self.vocab_size
            self.counts = self._full((c, v), 0, torch.int32)
            self.seen_prompt = self._full((c, v), False, torch.bool)
            self.penalties = self._full((c, 3), 0.0, torch.float32)
            self.penalties[:, 0] = 1.0  # repetition 1, frequency 0, presence 0: no change

    def _ensure_words(self, num_words: int, prefix: int) -> None:
        """Word tables of at least ``num_words`` x ``prefix``; existing rows are kept,
        right-aligned (a longer table pads prefixes with PAD and tails with NO_TOKEN on the left)."""
        c = self.capacity
        w0, k0 = (0, 0) if self.words is None else self.words.shape[1:]
        w, k = max(w0, num_words), max(k0, prefix)
        if (w, k) == (w0, k0):
            return
        words = self._full((c, w, k), PAD, torch.int64)
        last = self._full((c, w), 0, torch.int64)
        valid = self._full((c, w), False, torch.bool)
        tails = self._full((c, k), NO_TOKEN, torch.int64)
        if self.words is not None:
            words[:, :w0, k - k0 :] = self.words
            last[:, :w0] = self.word_last
            valid[:, :w0] = self.word_valid
            tails[:, k - k0 :] = self.tails
        self.words, self.word_last, self.word_valid, self.tails = words, last, valid, tails

    # ---- requests -----------------------------------------------------------------------------

    def _admit(self, req: Request) -> None:
        """Give ``req`` a slot and write its rows (before its first sampling step)."""
        spec: LogitsSpec = req.logits_spec
        if spec.has_bias:
            self._ensure_bias()
        if spec.has_penalties:
            self._ensure_penalties()
        if spec.multi_words:
            self._ensure_words(*spec.word_dims)
        if not self.free:
            self._grow(max(_MIN_SLOTS, 2 * self.capacity))
        slot = self.free.pop()
        req.logits_slot = slot
        if self.bias is not None:
            row = self.bias[slot]
            if spec.allowed_token_ids is not None:
                row.fill_(float("-inf"))
                row.index_fill_(0, self.to_device(spec.allowed_token_ids, torch.int64), 0.0)
            else:
                row.zero_()
            if spec.logit_bias:
                ids = self.to_device(list(spec.logit_bias), torch.int64)
                row.index_put_((ids,), self.to_device(list(spec.logit_bias.values()), torch.float32), accumulate=True)
            if spec.single_words:
                row.index_fill_(0, self.to_device(spec.single_words, torch.int64), float("-inf"))
        if self.counts is not None:
            self.counts[slot].zero_()
            seen = self.seen_prompt[slot]
            seen.zero_()
            if spec.has_repetition:
                seen.index_fill_(0, self.to_device(req.prompt_token_ids, torch.int64), True)
            vals = [spec.repetition_penalty, spec.frequency_penalty, spec.presence_penalty]
            self.penalties[slot] = self.to_device(vals, torch.float32)
            if req.output_token_ids:  # not expected (slots are taken before the first token); kept exact anyway
                out = self.to_device(req.output_token_ids, torch.int64)
                self.counts[slot].index_put_((out,), torch.ones_like(out, dtype=torch.int32), accumulate=True)
        if self.words is not None:
            _, w, k = self.words.shape
            self.word_valid[slot].fill_(False)
            self.tails[slot].fill_(NO_TOKEN)
            if req.output_token_ids:
                tail = req.output_token_ids[-k:]
                self.tails[slot, k - len(tail) :] = self.to_device(tail, torch.int64)
            if spec.multi_words:
                n = len(spec.multi_words)
                prefixes = [[PAD] * (k - len(wd) + 1) + wd[:-1] for wd in spec.multi_words]
                self.words[slot, :n] = self.to_device(prefixes, torch.int64)
                self.word_last[slot, :n] = self.to_device([wd[-1] for wd in spec.multi_words], torch.int64)
                self.word_valid[slot, :n] = True

    def release(self, req: Request) -> None:
        """``req`` has ended: its slot is free (rewritten by the next request that takes it,
        after the device work already queued on it)."""
        if req.logits_slot is not None:
            self.free.append(req.logits_slot)
            req.logits_slot = None

    # ---- one step -----------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, sampled: list[Request]) -> tuple[torch.Tensor, ProcessedBatch | None]:
        """The step's sampled logits (S, V) with every request's processing applied: a float32
        tensor (the logits themselves when already float32, edited in place), rows without
        processing unchanged. ``(logits, None)`` when no request of the step has any."""
        act = [i for i, r in enumerate(sampled) if r.logits_spec is not None]
        if not act:
            return logits, None
        reqs = [sampled[i] for i in act]
        for r in reqs:
            if r.logits_slot is None:
                self._admit(r)
        specs = [r.logits_spec for r in reqs]
        n = len(act)
        idx = self.to_device(act + [r.logits_slot for r in reqs], torch.int64)
        rows, slots = idx[:n], idx[n:]
        lg = logits.float()  # exact; the greedy picks of untouched rows stay the same
        sub = lg.index_select(0, rows)  # (A, V)
        if any(s.has_bias for s in specs):
            sub += self.bias.index_select(0, slots)
        words = any(s.multi_words for s in specs)
        if words:
            prefix = self.words.index_select(0, slots)  # (A, W, K)
            tail = self.tails.index_select(0, slots).unsqueeze(1)  # (A, 1, K)
            match = ((prefix == tail) | (prefix == PAD)).all(-1) & self.word_valid.index_select(0, slots)  # (A, W)
            mask = torch.zeros(match.shape, dtype=sub.dtype, device=sub.device).masked_fill_(match, float("-inf"))
            local = torch.arange(n, device=sub.device).unsqueeze(1).expand_as(match)
            sub.index_put_((local, self.word_last.index_select(0, slots)), mask, accumulate=True)
        penalties = any(s.has_penalties for s in specs)
        if penalties:
            counts = self.counts.index_select(0, slots)  # (A, V)
            pen = self.penalties.index_select(0, slots)  # (A, 3)
            if any(s.has_repetition for s in specs):
                seen = (counts > 0) | self.seen_prompt.index_select(0, slots)
                scale = torch.where(seen, pen[:, 0:1], 1.0)
                sub = torch.where(sub > 0, sub / scale, sub * scale)
            if any(s.frequency_penalty != 0.0 for s in specs):
                sub -= pen[:, 1:2] * counts
            if any(s.presence_penalty != 0.0 for s in specs):
                sub -= pen[:, 2:3] * (counts > 0)
        lg.index_copy_(0, rows, sub)
        return lg, ProcessedBatch(rows, slots, penalties, words)

    def update(self, batch: ProcessedBatch | None, tokens: torch.Tensor) -> None:
        """Add the step's sampled ids (S,) on the device to the counts and tails of the rows
        ``apply`` processed, so the next step sees them before the host does."""
        if batch is None or not (batch.penalties or batch.words):
            return
        tok = tokens.index_select(0, batch.rows)
        if batch.penalties:
            self.counts.index_put_((batch.slots, tok), torch.ones_like(tok, dtype=torch.int32), accumulate=True)
        if batch.words:
            tail = self.tails.index_select(0, batch.slots)
            self.tails.index_copy_(0, batch.slots, torch.cat([tail[:, 1:], tok.unsqueeze(1)], dim=1))

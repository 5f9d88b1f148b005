"""The detokenizer's stop strings: held-back text and stop detection are exactly those of the
former implementation (which searched every tail length against every string on each
output, quadratic in the stop strings' length), on hand-made cases and on random text."""
from __future__ import annotations

import random

import pytest

from batchmax.engine.detokenizer import _CONTEXT, Detokenizer, _borders


class ReferenceDetokenizer:
    """The former ``Detokenizer`` verbatim (quadratic ``safe_text``): the behaviour to keep."""

    def __init__(self, tokenizer, prompt_ids, stop):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.stopped_on = None

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id, check_stop=True):
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        if not (check_stop and self.stop):
            return None
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.stopped_on = s
            return s
        return None

    def flush(self):
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)

    def safe_text(self, finished):
        if finished or not self.stop:
            return self.text
        for k in range(min(len(self.text), self.max_stop - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return self.text[:-k]
        return self.text


class PieceTokenizer:
    """Token id i decodes to ``pieces[i]``; a piece "\\x00" stands for the first half of a
    multi-byte character (U+FFFD until the next token completes it as "é")."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        out = []
        for i in ids:
            p = self.pieces[i]
            if out and out[-1] == "\ufffd" and p == "\x01":
                out[-1] = "é"
            else:
                out.append("\ufffd" if p == "\x00" else p)
        return "".join(out)


def run(det_cls, tok, token_ids, stop, min_tokens=0, prompt=(0,)):
    """What the engine sees per token: add()'s result, the text shown while running, and
    at the end the final text (flushed unless a stop string ended it)."""
    det = det_cls(tok, list(prompt), stop)
    trace = []
    for n, t in enumerate(token_ids, 1):
        hit = det.add(t, check_stop=n >= min_tokens)
        if hit is not None:  # finished: the engine shows the whole (cut) text from here on
            trace.append((hit, det.text))
            return trace, det.safe_text(True), det.stopped_on
        trace.append((hit, det.safe_text(False), det.text))
    det.flush()
    return trace, det.safe_text(True), det.stopped_on


def pieces_of(tok: PieceTokenizer, text_pieces: list[str]) -> list[int]:
    return [tok.pieces.index(p) for p in text_pieces]


PIECES = ["", "He", "llo", " wo", "rld", "a", "b", "ab", "ba", "c", " ", "aab", "x", "\x00", "\x01", "</", "s>", "<", "/s", ">", "END"]
CASES = [
    # (pieces generated, stop strings, min_tokens)
    (["He", "llo", " wo", "rld"], ["lo w"], 0),  # spans three tokens
    (["He", "llo", " wo", "rld"], ["llo wo", "o"], 0),  # two hits: the earliest wins
    (["He", "llo", " wo", "rld"], ["world!", "rld!"], 0),  # held back, never completed
    (["He", "llo", " wo", "rld"], ["world", "rld!"], 0),  # the longest string completed
    (["a", "b", "a", "b", "a", "b", "c"], ["abac", "ababc", "bab c"], 0),  # overlapping prefixes
    (["ab", "ab", "ab", "ab"], ["ababa", "abababab"], 0),  # a self-overlapping string
    (["aab", "aab", "a", "a", "b", "c"], ["aabaab", "aabc"], 0),  # KMP fallback
    (["ab", "a", "b"], ["ab"], 0),  # a stop string at the very start
    (["He", "llo"], ["He"], 0),
    (["END", "a"], ["END"], 0),
    (["</", "s>", "a"], ["</s>"], 0),
    (["<", "/s", ">", "x"], ["</s>", "<", "/"], 0),
    (["x", "\x00", "\x01", "x"], ["é", "xé"], 0),  # an incomplete character is held back first
    (["x", "\x00", "\x01", "a"], ["éa", "éb"], 0),
    (["ab", "ab", "c", "ab"], ["abab", "c"], 3),  # min_tokens: nothing matches before the 3rd token
    (["a", "b", "a", "b", "x"], ["ab", "bab"], 4),  # completed while unchecked, held back at the end
    (["ba", "ba", "ba"], ["abab"], 2),
    (["a", "a", "a", "a"], ["aaaa", "aa"], 2),
    (["He", "llo"], [], 0),  # no stop strings
    (["a", "b", "c"], ["c"], 0),  # single characters: nothing to hold back
    (["a", "", "b", "", "ab"], ["bab", "abx"], 0),  # tokens that add no text
]


@pytest.mark.parametrize("pieces, stop, min_tokens", CASES)
def test_held_back_text_and_stops_match_the_former_implementation(pieces, stop, min_tokens):
    tok = PieceTokenizer(PIECES)
    ids = pieces_of(tok, pieces)
    assert run(Detokenizer, tok, ids, stop, min_tokens) == run(ReferenceDetokenizer, tok, ids, stop, min_tokens)


def test_spot_checks():
    tok = PieceTokenizer(PIECES)
    trace, final, on = run(Detokenizer, tok, pieces_of(tok, ["He", "llo", " wo", "rld"]), ["lo w"])
    assert trace == [(None, "He", "He"), (None, "Hel", "Hello"), ("lo w", "Hel")] and final == "Hel" and on == "lo w"
    trace, final, on = run(Detokenizer, tok, pieces_of(tok, ["ab", "a", "b"]), ["ab"])
    assert trace == [("ab", "")] and final == "" and on == "ab"
    trace, final, on = run(Detokenizer, tok, pieces_of(tok, ["He", "llo", " wo", "rld"]), ["world!", "rld!"])
    assert [t[1] for t in trace] == ["He", "Hello", "Hello ", "Hello "] and final == "Hello world" and on is None


def test_random_text_matches_the_former_implementation():
    rng = random.Random(22)
    alphabet = "ab c"
    pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(40)]
    tok = PieceTokenizer(pieces)
    for trial in range(600):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randint(1, 30))]
        text = "".join(pieces[i] for i in ids)
        stop = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.6 and len(text) > 1:  # a piece of the text: it may match
                a = rng.randrange(len(text))
                stop.append(text[a : a + rng.randint(1, 8)])
            else:
                stop.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
        min_tokens = rng.choice([0, 0, 2, 5])
        got, want = run(Detokenizer, tok, ids, stop, min_tokens), run(ReferenceDetokenizer, tok, ids, stop, min_tokens)
        assert got == want, (trial, [pieces[i] for i in ids], stop, min_tokens)


def test_real_tokenizer_matches_the_former_implementation(tiny_llama):
    """Byte-level BPE: multi-byte characters split over tokens, leading spaces."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rng = random.Random(5)
    words = "ünï cödé 漢字 🙂 the end stop STOP <|im_end|> héllo wörld".split()
    for trial in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        ids = tok.encode(text, add_special_tokens=False)
        if rng.random() < 0.3:  # bytes of a character split across tokens, at random
            ids = ids + [rng.randrange(100, 49152) for _ in range(4)]
        stop = [text[a : a + rng.randint(1, 6)] for a in (rng.randrange(len(text)) for _ in range(rng.randint(1, 3)))]
        prompt = tok.encode("Say:", add_special_tokens=False)
        for min_tokens in (0, 3):
            got = run(Detokenizer, tok, ids, stop, min_tokens, prompt)
            assert got == run(ReferenceDetokenizer, tok, ids, stop, min_tokens, prompt), (trial, text, stop, min_tokens)


def test_borders():
    assert _borders("") == [0]
    assert _borders("abab") == [0, 0, 0, 1, 2]
    assert _borders("aabaaab") == [0, 0, 1, 0, 1, 2, 2, 3]


# ----------------------------------------------------------------------------- options
def _decoded(tok, ids, prompt=(), **kw):
    d = Detokenizer(tok, list(prompt), kw.pop("stop", []), **kw)
    for t in ids:
        d.add(t)
    d.flush()
    return d.text


def test_special_tokens_skipped_shown_and_spaced(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok.encode("<|im_start|>user\nhi there<|im_end|>\nok", add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    assert _decoded(tok, ids, prompt) == "user\nhi there\nok"
    # shown, each separated from the text around it by a space (vLLM's default), the prompt's
    # end included, as in vLLM
    assert _decoded(tok, ids, prompt, skip_special_tokens=False) == " <|im_start|> user\nhi there <|im_end|> \nok"
    assert _decoded(tok, ids, prompt, skip_special_tokens=False, spaces_between_special_tokens=False) == (
        "<|im_start|>user\nhi there<|im_end|>\nok")
    # spaces change nothing while special tokens are skipped
    assert _decoded(tok, ids, prompt, spaces_between_special_tokens=False) == "user\nhi there\nok"


def test_include_stop_str_in_output_keeps_the_match_and_holds_nothing_back():
    tok = PieceTokenizer(PIECES)
    ids = pieces_of(tok, ["He", "llo", " wo", "rld"])
    d = Detokenizer(tok, [], ["lo w"], include_stop_str_in_output=True)
    seen = []
    for t in ids:
        hit = d.add(t)
        seen.append(d.safe_text(False))
        if hit:
            break
    # without the option "Hel" would be held back as "Hel" + the start of "lo w"
    assert seen == ["He", "Hello", "Hello w"] and hit == "lo w" and d.text == "Hello w"
    d = Detokenizer(tok, [], ["lo w"])
    assert [d.add(t) or d.safe_text(False) for t in ids[:3]] == ["He", "Hel", "lo w"] and d.text == "Hel"

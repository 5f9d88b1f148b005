"""Tokenizing off the event loop, without one prompt holding up the others.

``TokenizerPool``: a few threads, each job run with a tokenizer copy of its own (HF fast
tokenizers are not safe to share across threads: ``encode`` itself sets options on the Rust
tokenizer). The Rust tokenizer releases the GIL while it encodes, so a large prompt and a
small one are encoded at the same time; large jobs may take every thread but one, so a small
prompt never waits behind large ones, however many.

``bytes_per_token_bound``: the most bytes of text one token can stand for, for refusing a
prompt that cannot fit the context from its byte length alone, before tokenizing it (a 30 MB
prompt used to hold the tokenizer for ~25 s, only to be refused then).
"""
from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import math
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger("batchmax.server")

LARGE_CHARS = 64 * 1024
"""A job over this many characters of text is large (tens of milliseconds to tokenize and
up): large jobs may not take the pool's last thread."""


def default_pool_size() -> int:
    """Threads (and tokenizer copies): one per CPU, 2 to 4 (two so that one is always left
    for small prompts; past 4, the CPUs are the engine's and the event loop's)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(4, max(2, cpus))


class TokenizerPool:
    """``await pool.run(fn, *args, chars=n)`` runs ``fn(tokenizer, *args)`` in a pool thread,
    with a tokenizer copy no other thread uses meanwhile (``None`` when there is no
    tokenizer). ``chars`` says how much text the job holds: over ``large_chars`` it waits
    for one of the ``size - 1`` threads large jobs may use."""

    def __init__(self, tokenizer: Any, size: int | None = None, large_chars: int = LARGE_CHARS) -> None:
        size = size or default_pool_size()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._has_tokenizer = tokenizer is not None
        if tokenizer is not None:
            copies = 0
            for _ in range(size):
                try:
                    self._free.put(copy.deepcopy(tokenizer))
                    copies += 1
                except Exception:  # noqa: BLE001 - some tokenizers cannot be copied
                    break
            if copies == 0:  # one thread, then, using the tokenizer it was given
                self._free.put(tokenizer)
                copies = 1
            if copies < size:
                logger.warning("the tokenizer cannot be copied: tokenizing in %d thread(s)", copies)
            size = copies
        self.size = size
        self.large_chars = large_chars
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="batchmax-tokenize")
        self._large = asyncio.Semaphore(max(1, size - 1))

    async def run(self, fn: Callable, *args: Any, chars: int = 0, **kwargs: Any) -> Any:
        call = functools.partial(self._call, fn, args, kwargs)
        loop = asyncio.get_running_loop()
        if chars <= self.large_chars:
            return await loop.run_in_executor(self._executor, call)
        async with self._large:
            return await loop.run_in_executor(self._executor, call)

    def _call(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        if not self._has_tokenizer:
            return fn(None, *args, **kwargs)
        tok = self._free.get()  # never waits: as many copies as threads
        try:
            return fn(tok, *args, **kwargs)
        finally:
            self._free.put(tok)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- the byte bound
def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# Normalizers by the most they shrink text (bytes in per byte out); any other (Strip,
# StripAccents, BertNormalizer, Nmt, Precompiled, a regex Replace) may delete text, and
# then no bound holds. The Unicode forms map a 4-byte character to one ASCII byte at worst
# (NFKC: mathematical letters), Lowercase a 3-byte one (the Kelvin sign).
_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 4, "Prepend": 1, "ByteLevel": 1}
# pre-tokenizers that keep every character (Whitespace, WhitespaceSplit, BertPreTokenizer,
# CharDelimiterSplit drop some)
_KEEP_ALL = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation", "FixedLength"}


def _shrink(spec: dict | None) -> int | None:
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for sub in spec.get("normalizers", []):
            f = _shrink(sub)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}), spec.get("content", "")
        if "String" not in pattern or not content:
            return None
        return max(1, math.ceil(utf8_len(pattern["String"]) / utf8_len(content)))
    return _SHRINK.get(kind)


def _keeps_all(spec: dict | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_all(sub) for sub in spec.get("pretokenizers", []))
    return kind in _KEEP_ALL and spec.get("behavior") != "Removed"


def _byte_level(spec: dict) -> bool:
    def has(node: dict | None, key: str) -> bool:
        if node is None:
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(sub, key) for sub in node.get(key, []))

    return has(spec.get("pre_tokenizer"), "pretokenizers") or has(spec.get("normalizer"), "normalizers")


def bytes_per_token_bound(tokenizer: Any) -> int | None:
    """The most bytes of prompt text one token can cover, so that a prompt of ``B`` bytes
    needs at least ``B / bound`` tokens; ``None`` when this tokenizer gives no such bound
    (it may delete text: a normalizer that strips, a pre-tokenizer that drops whitespace,
    a WordPiece ``[UNK]`` for a whole word...), and then no prompt is refused by its size.

    The bound is the longest token, in the bytes of text it matches (a byte-level BPE token
    decoded to its bytes; otherwise its text, which is never shorter than what it matches:
    ``▁`` for a space, ``<0x41>`` for one byte), times what the normalizer can shrink text by."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an unknown tokenizer: no bound
        return None
    model = spec.get("model") or {}
    byte_level = _byte_level(spec)
    if model.get("type") == "BPE":
        # characters it has no token for: bytes (byte-level, byte fallback), one unknown
        # token each (unk, not fused), or else dropped
        unk_each = model.get("unk_token") is not None and not model.get("fuse_unk", False)
        if not (byte_level or model.get("byte_fallback") or unk_each):
            return None
    elif not (model.get("type") == "Unigram" and model.get("byte_fallback")):
        return None  # WordPiece, WordLevel: one unknown token per word; Unigram fuses unknowns
    shrink = _shrink(spec.get("normalizer"))
    if shrink is None or not _keeps_all(spec.get("pre_tokenizer")):
        return None
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()} if byte_level else {}
    added = {t.get("content") for t in spec.get("added_tokens", [])}
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001
        return None
    longest = 4  # an unknown token stands for one character: at most 4 bytes
    for piece in vocab:
        if byte_decoder and piece not in added and all(c in byte_decoder for c in piece):
            n = len(piece)  # one byte per character of the byte-level alphabet
        else:
            n = utf8_len(piece)
        longest = max(longest, n)
    return longest * shrink


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

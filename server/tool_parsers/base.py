"""What every tool-call parser shares: the events it emits and the incremental interface.

A parser reads the model's text (after any reasoning was taken out) piece by piece, in any
cut: ``feed(text)`` returns what is now decided, ``finish()`` what the end of the output
decides. Non-streaming responses feed the whole text at once, streams feed each delta; the
same state machine runs either way, so a stream reassembles exactly to the non-streamed
message whatever the chunking (tests/server/test_tool_parsers.py feeds character by
character to check it).

A call is emitted only once its JSON is complete and valid (``Call``): the model's output is
not constrained in ``auto`` mode, and a call streamed before its end could turn out malformed
and could not be taken back. Malformed calls become content, never an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Call:
    """A complete call: ``arguments`` is JSON text (what OpenAI's ``function.arguments`` holds)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class CallStart:
    """A call whose arguments follow as ``ArgsDelta``s (only for output the engine constrains,
    which cannot turn out malformed: ``tool_choice`` naming a function)."""

    name: str


@dataclass(frozen=True)
class ArgsDelta:
    text: str


Event = Content | Call | CallStart | ArgsDelta


def call_from_json(obj: Any, keys: tuple[str, ...] = ("arguments", "parameters")) -> Call | None:
    """``{"name": str, "arguments" | "parameters": object}`` as a Call, else None. Arguments
    are re-serialised compactly (``ensure_ascii=False``, as vLLM does); a string holding JSON
    (some models quote them) is accepted when it parses to an object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = None
    for k in keys:
        if k in obj:
            args = obj[k]
            break
    else:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``tag`` (held back
    until the next piece says whether the tag follows)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def until_tag(buf: str, tag: str) -> tuple[str, str, bool]:
    """Split text still arriving at the first ``tag``: (the text before it, what follows it,
    True); without the tag, (the text that cannot be part of one, the held-back end that
    might begin it, False)."""
    i = buf.find(tag)
    if i < 0:
        keep = held_prefix(buf, tag)
        return buf[: len(buf) - keep], buf[len(buf) - keep :], False
    return buf[:i], buf[i + len(tag) :], True


class ToolParser:
    """One model family's tool-call syntax. Subclasses set ``name`` and ``markers`` (strings
    whose presence in a chat template identifies the family) and implement ``feed`` and
    ``finish``."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]] = ()
    keep_special_tokens: ClassVar[bool] = False
    """The call marker is a special token that ``skip_special_tokens`` would remove from the
    text (Mistral's ``[TOOL_CALLS]``): requests parsed by this family keep special tokens."""

    def feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        raise NotImplementedError

    @staticmethod
    def call_id() -> str:
        """A new call's id, OpenAI's shape (``call_`` + 24 characters)."""
        return "call_" + random_alnum(24)


def random_alnum(n: int) -> str:
    import secrets
    import string

    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))

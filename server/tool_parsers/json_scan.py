"""Finding where a JSON value ends in text that is still arriving.

Parsers need to know when a call's JSON object (or array) is complete without parsing it on
every piece: ``JsonEnd`` scans each character once, tracking nesting and strings, and says
where the value that began at the scan's start closes. It does not validate; the complete
text is then given to ``json.loads``.
"""
from __future__ import annotations


class JsonEnd:
    """Incremental end-of-value finder for one JSON object or array (its first character is
    the first one fed, ``{`` or ``[``)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.seen = 0
        self.end: int | None = None
        """Characters of the value (its closing bracket included), once it is complete."""

    def feed(self, text: str) -> int | None:
        """Scan ``text`` (what follows what was fed before); returns the value's length once
        it is complete (characters after it are not consumed), else None."""
        if self.end is not None:
            return self.end
        for i, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.end = self.seen + i + 1
                    return self.end
        self.seen += len(text)
        return None

    def over(self, buf: str) -> int | None:
        """``feed`` for parsers that keep the whole text of the value so far in one buffer:
        only what this scan has not seen of ``buf`` is scanned."""
        return self.feed(buf[self.seen :])

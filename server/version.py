"""The installed package's version (``/version``)."""
from __future__ import annotations

import contextlib


def version() -> str:
    with contextlib.suppress(Exception):
        from importlib.metadata import version as v

        return v("batchmax")
    return "0.1.0"


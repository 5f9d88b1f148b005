"""Benchmarks (README, "Measured so far"); what several of them share lives here."""
from __future__ import annotations

import json


def append_jsonl(path: str | None, *rows: dict) -> None:
    """Append ``rows`` to the JSON-lines file ``path`` (nothing when it is None): each run
    adds its lines, so one file collects the runs a results page or plot is made from."""
    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

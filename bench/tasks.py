"""Synthetic long-context tasks generated here with a fixed seed (RULER-style).

Each task is a ``Task(prompt_messages, answer)``; ``score`` checks a model's completion.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class Task:
    kind: str
    messages: list[dict[str, str]]
    answer: str

    def correct(self, completion: str) -> bool:
        return self.answer in completion


def passkey(rng: random.Random, n_filler: int, depth: float) -> Task:
    """A 5-digit pass key hidden at ``depth`` (0..1) of ``n_filler`` filler sentences."""
    key = str(rng.randint(10000, 99999))
    before = int(n_filler * depth)
    text = (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + FILLER * before
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + FILLER * (n_filler - before)
        + "\nWhat is the pass key?"
    )
    return Task("passkey", [{"role": "user", "content": text}], key)


def passkey_set(n: int, min_filler: int, max_filler: int, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    return [passkey(rng, rng.randint(min_filler, max_filler), rng.random()) for _ in range(n)]

"""Synthetic long-context tasks generated here with a fixed seed (RULER-style).

Each task is a ``Task(prompt_messages, answer)``; ``score`` checks a model's completion.
"""
from __future__ import annotations

import random
import re
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


# ---------------------------------------------------------------------------------------
# RULER-style task families for the fidelity suite (bench/fidelity.py). Each generator is
# ``gen(rng, n) -> Task`` where ``n`` is the amount of filler (sentences, or list entries for
# common words); ``fit`` grows ``n`` until the chat-templated prompt reaches a token target.
# Insert points are drawn as fractions of the filler, so every ``n`` gives the same layout.

SENTENCES = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
WORDS = ["apple", "river", "stone", "cloud", "garden", "mirror", "candle", "forest", "window", "bridge", "pencil", "silver", "rabbit", "engine", "island", "ladder", "market", "needle", "orange", "pillow", "planet", "rocket", "saddle", "tiger", "violin", "wagon", "anchor", "basket", "butter", "camera", "castle", "cotton", "desert", "dragon", "feather", "finger", "flower", "glass", "hammer", "helmet", "honey", "jacket", "kettle", "kitten", "lemon", "magnet", "meadow", "monkey", "mountain", "napkin", "ocean", "palace", "parrot", "peanut", "pepper", "piano", "pocket", "potato", "puzzle", "rainbow", "ribbon", "saddle", "school", "shadow", "shovel", "spider", "spoon", "square", "summer", "sunset", "table", "teapot", "thunder", "ticket", "tomato", "tower", "travel", "turtle", "valley", "velvet", "village", "wallet", "winter", "wizard", "yellow", "zebra", "acorn", "bottle", "breeze", "cactus", "canyon", "carpet", "cherry", "circle", "coffee", "comet", "copper", "crayon", "dolphin", "donkey", "eagle", "falcon", "fountain", "galaxy", "ginger", "glove", "harbor", "jungle", "lantern", "lizard", "marble", "melon", "muffin", "nickel", "noodle", "oyster", "paddle", "panda", "pebble", "pirate", "pumpkin", "quilt", "radish", "robot", "rocket", "salmon", "scarf", "sponge", "statue", "sugar", "tunnel", "umbrella", "walnut", "whistle"]
WORDS = list(dict.fromkeys(WORDS))  # unique, order kept (deterministic)


@dataclass
class ScoredTask(Task):
    """A task with a graded score. ``targets`` empty: 1.0 iff ``answer`` is in the completion.
    Else the Jaccard overlap of ``targets`` with the ``candidates`` the completion names, so
    listing every candidate (or a wrong one) scores below naming exactly the targets."""

    targets: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()
    max_tokens: int = 16
    n_tokens: int = 0  # the chat-templated prompt's length, set by ``fit``
    target: int = 0  # the length ``fit`` aimed at

    def score(self, completion: str) -> float:
        if not self.targets:
            return float(self.answer in completion)
        named = {c for c in self.candidates if re.search(rf"\b{re.escape(c)}\b", completion, re.IGNORECASE)}
        want = set(self.targets)
        return len(named & want) / len(named | want)


def _filler(n: int, inserts: list[tuple[float, str]]) -> str:
    """``n`` filler sentences with each ``(fraction, text)`` inserted at that depth, in order."""
    at = sorted((int(f * n), i, t) for i, (f, t) in enumerate(inserts))
    out, k = [], 0
    for j in range(n + 1):
        while k < len(at) and at[k][0] == j:
            out.append(at[k][2])
            k += 1
        if j < n:
            out.append(SENTENCES[j % len(SENTENCES)])
    return " ".join(out)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def needle(rng: random.Random, n: int, depth: float) -> ScoredTask:
    """A 5-digit pass key at ``depth`` (0..1) of the filler (the passkey / single needle)."""
    key = str(rng.randint(10000, 99999))
    text = (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + _filler(n, [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")])
        + "\nWhat is the pass key?"
    )
    return ScoredTask(f"needle@{depth:g}", _user(text), key, max_tokens=12)


def kv_retrieval(rng: random.Random, n: int, pairs: int = 4) -> ScoredTask:
    """``pairs`` "key: value" lines among the filler; ask one key's value."""
    keys = rng.sample(WORDS, pairs)
    values = [str(rng.randint(10000, 99999)) for _ in keys]
    q = rng.randrange(pairs)
    inserts = [(rng.random(), f"The value of the key {k} is {v}.") for k, v in zip(keys, values)]
    text = (
        "Some keys and their values are hidden inside a lot of irrelevant text. Memorize them.\n"
        + _filler(n, inserts)
        + f"\nWhat is the value of the key {keys[q]}?"
    )
    return ScoredTask("kv", _user(text), values[q], max_tokens=24)  # room for "The value of the key ... is ..."


def variable_tracking(rng: random.Random, n: int, hops: int = 3) -> ScoredTask:
    """A chain ``VAR A = 12345. VAR B = VAR A. ...`` and a distractor chain with another
    value, interleaved in the filler; ask which variables hold the first value."""
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(2 * (hops + 1))]
    chains = [names[: hops + 1], names[hops + 1 :]]
    value, other = rng.sample(range(10000, 100000), 2)
    inserts = []
    for chain, v in zip(chains, (value, other)):
        depths = sorted(rng.random() for _ in chain)  # a chain reads in order
        inserts += [(depths[0], f"VAR {chain[0]} = {v}.")]
        inserts += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
    text = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        + _filler(n, inserts)
        + f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    )
    return ScoredTask("vt", _user(text), ", ".join(chains[0]), targets=tuple(chains[0]), candidates=tuple(names), max_tokens=64)


def common_words(rng: random.Random, n: int, top: int = 3) -> ScoredTask:
    """A numbered list of ``n`` words where ``top`` words repeat most often; ask for them."""
    common = rng.sample(WORDS, top)
    rest = [w for w in WORDS if w not in common]
    rng.shuffle(rest)
    # the common words repeat more often than any other word can at this list length
    each = max(3, n // 25)
    others = max(0, n - top * each)
    items = common * each + [rest[i % len(rest)] for i in range(others)]
    rng.shuffle(items)
    text = (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
        + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        + f"\nQuestion: What are the {top} most common words in the above list? Answer with the words only."
    )
    return ScoredTask("cwe", _user(text), ", ".join(common), targets=tuple(common), candidates=tuple(WORDS), max_tokens=32)


GENERATORS = {
    "needle@0.1": lambda rng, n: needle(rng, n, 0.1),
    "needle@0.5": lambda rng, n: needle(rng, n, 0.5),
    "needle@0.9": lambda rng, n: needle(rng, n, 0.9),
    "kv": kv_retrieval,
    "vt": variable_tracking,
    "cwe": common_words,
}


def fit(gen, seed: str, target: int, count) -> ScoredTask:
    """The task of the smallest ``n`` whose prompt has at least ``target`` tokens
    (``count(messages)``); the same ``seed`` gives the same content at every ``n``."""
    make = lambda n: gen(random.Random(seed), n)
    lo, hi = 0, 16
    while count(make(hi).messages) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: make(hi) reaches the target, make(lo) may not
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(make(mid).messages) >= target else (mid, hi)
    task = make(hi)
    task.n_tokens, task.target = count(task.messages), target
    return task


def task_suite(kinds, lengths, n_per_task: int, seed: int, count) -> list[ScoredTask]:
    """``n_per_task`` prompts of every kind at every target length, deterministic in ``seed``."""
    return [fit(GENERATORS[k], f"{seed}/{k}/{L}/{i}", L, count) for L in lengths for k in kinds for i in range(n_per_task)]

"""A serving workload: N requests with prompt and output lengths drawn from distributions.

The same ``Workload`` drives the HTTP load generator and the offline engine, so both run
exactly the same prompts and lengths. Prompts are token ids (exact lengths; batchmax, vLLM
and OpenAI's completions API accept them) or text made of common words (any server and the
chat endpoint; lengths are then approximate and the server's ``usage`` says the real count).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# Common English words, most of them one token in BPE vocabularies.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part"
).split()


@dataclass(frozen=True)
class LenDist:
    """A length distribution: ``N`` (fixed) or ``LO:HI`` (uniform over LO..HI inclusive)."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, spec: str | int) -> "LenDist":
        text = str(spec)
        lo, _, hi = text.partition(":")
        try:
            dist = cls(int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"a length is N or LO:HI, got {spec!r}") from None
        if not 1 <= dist.lo <= dist.hi:
            raise ValueError(f"a length range needs 1 <= LO <= HI, got {spec!r}")
        return dist

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True)
class LoadRequest:
    prompt: str | list[int]
    prompt_len: int
    """Exact for token-id prompts; the number of words for text prompts."""
    max_tokens: int


def make_workload(num_requests: int, prompt_len: LenDist, output_len: LenDist, seed: int = 0,
                  prompt_format: str = "ids", vocab_size: int = 32000) -> list[LoadRequest]:
    """``prompt_format``: ``ids`` (random token ids in [100, vocab_size - 100), clear of the
    special tokens at both ends of most vocabularies) or ``text``."""
    if prompt_format not in ("ids", "text"):
        raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        n, m = prompt_len.sample(rng), output_len.sample(rng)
        if prompt_format == "ids":
            prompt: str | list[int] = [rng.randrange(100, max(101, vocab_size - 100)) for _ in range(n)]
        else:
            prompt = " ".join(rng.choice(_WORDS) for _ in range(n))
        out.append(LoadRequest(prompt, n, m))
    return out

"""Sampling parameters of a request, and the ``Sampler`` that turns logits into tokens.

Sampling is per request with the request's own ``torch.Generator`` (seeded by ``seed``, or
by the engine's seed and the request's arrival order), so a seeded request draws the same
tokens whatever else is in the batch. Greedy rows are batched through one ``argmax``.

What changes the logits before sampling (``logit_bias``, ``allowed_token_ids``,
``bad_words``, the penalties) is applied by ``LogitsProcessors`` (``logits_processors.py``);
the ``Sampler`` then does the min_tokens suppression, temperature, ``min_p``, top-k and top-p.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily, as in vLLM (``_SAMPLING_EPS``): dividing the
logits by 1e-38 overflows float32 to inf, and the softmax of infinities is NaN."""


@dataclass
class StructuredOutputsParams:
    """What a request's output must match (vLLM's ``StructuredOutputsParams``); exactly one
    of the constraint fields is set. The grammar state lives in the request, not in the KV
    cache, so eviction never touches it."""

    json: dict | str | None = None
    """A JSON schema (a dict, or its JSON text) the output must validate against."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar (EBNF/GBNF or Lark, as the grammar engine accepts)."""
    json_object: bool = False
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    whitespace_pattern: str | None = None
    """A regex for the whitespace allowed between JSON tokens; ``None``: the engine's default."""

    def __post_init__(self) -> None:
        set_ = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        set_ += ["json_object"] if self.json_object else []
        if len(set_) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, regex, choice, grammar, json_object; "
                f"got {set_ or 'none'}"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured outputs: choice must not be empty")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate (also bounded by the context length)."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens are generated."""
    temperature: float = 1.0
    """Below ``GREEDY_TEMPERATURE`` (0 included) is greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: no top-k cut."""
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    """Stop strings, matched on the detokenized output (they may span tokens); excluded from
    the returned text."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many top alternatives (0: only the
    chosen one). ``None``: none."""
    prompt_logprobs: int | None = None
    """The same for the prompt tokens (the first has none)."""
    skip_special_tokens: bool = True
    """Leave special tokens (EOS, chat-template markers) out of the text."""
    spaces_between_special_tokens: bool = True
    """When special tokens are shown (``skip_special_tokens=False``), separate each from the
    text around it by a space, as vLLM and transformers' slow tokenizers do."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended the request at the end of the text (and the text of a
    stop token: EOS or one of ``stop_token_ids``); while running nothing is held back then."""
    kv_policy: str | None = None
    """Eviction policy of this request; ``None``: the engine's default."""
    kv_budget: int | None = None
    """Tokens kept per layer and KV head; ``None``: the engine's default."""
    kv_recall: bool | None = None
    """Recall for this request (see ``EvictionConfig.kv_recall``); ``None``: the engine's default."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token the output already holds (-2..2)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per occurrence of the token in the output so far (-2..2)."""
    repetition_penalty: float = 1.0
    """vLLM's / transformers': the logit of a token seen in the prompt or the output is divided
    by it where positive, multiplied by it where not (> 0; 1: none)."""
    min_p: float = 0.0
    """Keep only tokens whose probability (after temperature) is at least ``min_p`` times the
    most likely one's (0..1; 0: off)."""
    logit_bias: dict[int, float] | None = None
    """OpenAI's: token id -> bias (-100..100) added to its logit."""
    allowed_token_ids: list[int] | None = None
    """vLLM's: only these tokens may be generated."""
    bad_words: list[str] = field(default_factory=list)
    """vLLM's: words never generated. Each is tokenized as is and with a leading space; a
    single-token word is always masked, a longer one's last token is masked where the output
    ends with the others."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar (grammar-guided
    decoding: a token bitmask applied to the logits on the device)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.stop_token_ids = list(self.stop_token_ids)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 20:
                raise ValueError(f"{name} must be between 0 and 20, got {v}")
        if self.kv_budget is not None and self.kv_budget <= 0:
            raise ValueError(f"kv_budget must be positive, got {self.kv_budget}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a positive number, got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be between 0 and 1, got {self.min_p}")
        if self.logit_bias is not None:
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias: keys must be token ids, got {k!r}") from None
                if not -100.0 <= float(v) <= 100.0:
                    raise ValueError(f"logit_bias: the bias of token {tid} must be between -100 and 100, got {v}")
                bias[tid] = float(v)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty (no token could be generated)")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = list(self.bad_words)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes this request's logits before sampling
        (``LogitsProcessors``); the min_tokens suppression and ``min_p`` are the sampler's."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
            or self.logit_bias or self.allowed_token_ids is not None or self.bad_words
        )


class Sampler:
    """Picks the next token of each request from its last-position logits."""

    def __init__(self, to_device: Callable[[list[int], torch.dtype], torch.Tensor]) -> None:
        """``to_device(list, dtype)`` moves small index lists to the logits' device without
        stalling it (the engine passes its ``PinnedStager.to_device``)."""
        self.to_device = to_device

    def __call__(
        self,
        logits: torch.Tensor,  # (B, V), the model's dtype
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        suppress: list[list[int]],
    ) -> torch.Tensor:  # (B,) int64 on the logits' device
        """``suppress[i]`` lists token ids row i may not produce (EOS before min_tokens); they
        are set to -inf in ``logits`` itself, so logprobs read afterwards exclude them (as they
        include what ``LogitsProcessors`` did before). Temperature, ``min_p``, top-k and top-p
        work on a float32 copy of each sampled row: logprobs never see them.
        Greedy rows take the argmax in the logits' own dtype (casting to float32 is exact and
        monotonic, so the pick is the same); sampled rows are cast to float32 first."""
        rows = [i for i, ids in enumerate(suppress) for _ in ids]
        if rows:
            cols = [t for ids in suppress for t in ids]
            # one scatter; a Python-list index would copy from pageable memory and stall the GPU
            idx = (self.to_device(rows, torch.int64), self.to_device(cols, torch.int64))
            logits.index_put_(idx, logits.new_full((), float("-inf")))
        out = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy and p.min_p == 0.0]
        for i in rows:
            out[i] = self._sample_row(logits[i].float() / params[i].temperature, params[i], generators[i])
        rows = [i for i, p in enumerate(params) if not p.greedy and p.min_p > 0.0]
        if rows:
            # min_p for these rows at once, on a temperature-scaled float32 copy (the logits
            # stay as logprobs read them); the other rows never go through this path, so
            # what they draw does not depend on whether a min_p row shares their batch
            idx = self.to_device(rows, torch.int64)
            temps = self.to_device([params[i].temperature for i in rows], torch.float32)
            min_p = self.to_device([params[i].min_p for i in rows], torch.float32)
            scaled = self.apply_min_p(logits.index_select(0, idx).float() / temps.unsqueeze(1), min_p)
            for j, i in enumerate(rows):
                out[i] = self._sample_row(scaled[j], params[i], generators[i])
        return out

    @staticmethod
    def apply_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
        """vLLM's min_p: drop the tokens whose probability is below ``min_p`` (S,) times the
        row's largest. ``scaled`` (S, V): logits after temperature. A row with min_p 0 keeps
        everything."""
        probs = torch.softmax(scaled, dim=-1)
        keep = probs >= min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        return scaled.masked_fill(~keep, float("-inf"))

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
        """``logits`` (V,): one row, float32, already divided by the temperature."""
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            # stable: among equal probabilities the lowest id comes first, as in argmax
            sorted_probs, order = probs.sort(descending=True, stable=True)
            cum = sorted_probs.cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p; the first token always stays,
            # even when top_p rounds to 0 in float32 (below ~1e-45) and every token would go
            drop = (cum - sorted_probs) >= p.top_p
            drop[0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        # Exponential race (Gumbel-max in another form): argmax(p / E), E ~ Exp(1), drawn
        # from the request's own generator so the draw is independent of the batch.
        noise = torch.empty_like(probs).exponential_(generator=gen)
        return (probs / noise).argmax()

    @staticmethod
    def logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, top: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-softmax of the raw logits (before temperature, as OpenAI reports them).
        Returns the chosen tokens' logprobs (B,), their ranks in the vocabulary (B,) (1: the
        most likely; ties share the better rank) and, if ``top`` > 0, the top ids and
        logprobs (B, top)."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(-1, token_ids.view(-1, 1)).squeeze(-1)
        ranks = (lp > chosen.unsqueeze(-1)).sum(-1) + 1
        if top <= 0:
            return chosen, ranks, None, None
        vals, ids = lp.topk(top, dim=-1)
        return chosen, ranks, ids, vals

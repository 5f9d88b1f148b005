"""Grammar-constrained decoding (structured outputs) with xgrammar.

A request with ``SamplingParams.structured_outputs`` gets, at admission, its grammar
(``compile``: JSON schema, regex, choice, EBNF or Lark grammar, any JSON object). Admission
only parses it (about a millisecond; an invalid one is the client's ValueError); the compile
proper, xgrammar's costly part (0.2-0.4 s for a typical schema on a CPU host: it precomputes
token masks), runs on a background thread (xgrammar releases the GIL) while the request's prompt
is prefilled, and its first sampling step waits for whatever is left. Compiled grammars (as
futures) are kept in a small LRU keyed by what was asked, so a repeated schema costs nothing.
The request gets its own ``GrammarState`` on the ``Request``: an xgrammar matcher (made at its
first sampling step) and how many of the output tokens it has consumed. The state is host-side and per request, never in the KV
cache: eviction, recall and preemption (a recompute from prompt + output) leave it alone.
With ``n > 1`` each sequence is its own ``Request`` with its own matcher over the shared
compiled grammar.

Each step, ``apply`` runs on the step's sampled logits (S, V) before anything else touches
them (as in vLLM, where the bitmask is applied before the sampler): the host fills one
(K, ceil(V/32)) int32 bitmask for the K constrained rows (bit j of word w: token 32 w + j is
allowed), moves it to the device with one non-blocking staged copy, and ``apply_bitmask``
unpacks it there and sets the logits of disallowed tokens to -inf in one masked_fill over the
constrained rows. V is the lm_head's vocabulary; xgrammar's tokenizer info is built with it,
so rows past the tokenizer's vocabulary (padding) are never allowed. After the step's token
is known on the host, ``accept`` advances the matcher; a rejected token (only possible when
another parameter, e.g. ``allowed_token_ids``, masked every token the grammar allows) ends
the request with an error.

Where the output ends: the grammar's stop tokens are the engine's EOS ids, allowed only where
the grammar accepts the output so far (for a closed JSON object, only then). Sampling EOS ends
the request with finish_reason "stop" as any EOS does; with ``ignore_eos`` the matcher
terminates on it and the engine ends the request then. ``max_tokens`` reached first ends it
with "length" and output that may not parse (as vLLM). ``min_tokens`` is refused with
structured outputs (it would suppress the EOS the grammar may require).

Logprobs are read from the masked logits: the log-softmax over the tokens the grammar allows
(disallowed ones are -inf, reported as OpenAI's -9999), as vLLM reports them (its bitmask is
applied to the logits before the sampler computes logprobs).

Async scheduling: step n+1's mask needs step n's token, which the host has not read when step
n+1 is launched. The mask is built when the token arrives: ``_launch`` queues step n+1's
forward first, and only then ``apply`` waits for step n's copies (``StepInFlight.wait``),
advances the matchers of the constrained rows with their pending tokens, fills the mask and
queues the masking and sampling. The GPU runs step n+1's forward meanwhile, so what is lost
is the host running one step ahead (its schedule and launch of step n+2 overlapping step
n+1's forward), and only in steps that sample a constrained row with a pending token. Output
is token-exact with async scheduling off (tests/test_structured_outputs.py).

Cost when unused: ``StructuredOutputs`` compiles nothing and allocates nothing until the
first constrained request; the engine calls ``apply`` only while ``num_active`` (constrained
requests admitted and not yet released) is non-zero, and then only the constrained rows pay.
"""
from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from batchmax.engine.config import StructuredOutputsConfig
from batchmax.engine.sampling import StructuredOutputsParams

if TYPE_CHECKING:
    from batchmax.engine.inflight import StepInFlight
    from batchmax.engine.request import Request

BACKEND = "xgrammar"
"""The grammar engine (named in client messages)."""
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] [^ ]+\.cc:\d+: (Check failed: \(.*?\) is false: )?")


# xgrammar 0.2.7 turns a string with minLength/maxLength into "<rule>_characters{min, max}"
# with ``<rule>_characters ::= (([^\"\\\r\n]))``: raw control characters other than CR and LF
# allowed (invalid JSON, json.loads refuses it: seen with a random-weight model). Such rules are
# rewritten to one character class without any control character. Escapes stay refused there,
# as in xgrammar's own rule: an escape alternative ("\\" [...]) inside the bounded repetition
# made the bitmask fill ~7x slower (the builtin W1 schema's records, 128,256-token vocabulary,
# on the CPU: 0.73 ms per request and step against 0.10; up to 8 ms inside such a string).
# Strings without a length bound keep xgrammar's full JSON string rule, escapes included.
_BAD_STRING_CHAR = r'(([^\"\\\r\n]))'
_JSON_CHAR_CLASS = r'(([^\0-\x1f\"\\]))'


def json_schema_ebnf(schema: str, any_whitespace: bool) -> str:
    """xgrammar's EBNF of a JSON schema, with its length-bounded string characters fixed."""
    import xgrammar as xgr

    lines = str(xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace)).splitlines()
    for i, line in enumerate(lines):
        name, _, rhs = line.partition(" ::= ")
        if name.endswith("_characters") and rhs == _BAD_STRING_CHAR:
            lines[i] = f"{name} ::= {_JSON_CHAR_CLASS}"
    return "\n".join(lines)


def _client_message(exc: Exception) -> str:
    """xgrammar's error without its C++ log prefix ("[12:00:00] /project/cpp/x.cc:83: ")."""
    return _XGR_PREFIX.sub("", str(exc).strip()).strip()


@dataclass
class GrammarState:
    """A request's place in its grammar (host memory, on the ``Request``)."""

    compiled: Future
    """The ``xgrammar.CompiledGrammar``, compiled in the background (shared through the LRU)."""
    _matcher: object | None = None
    accepted: int = 0
    """Output tokens the matcher has consumed (with async scheduling it may be one ahead of
    ``Request.output_token_ids``: the pending token, consumed when its mask was needed)."""
    error: str | None = None
    """Set when the matcher rejected a token (or the compile failed); the request ends with it."""
    released: bool = False

    def matcher(self):
        """The ``xgrammar.GrammarMatcher``, made at the request's first sampling step: waits
        for a compile still running then. ``None`` (and ``error`` set) if it failed."""
        if self._matcher is None and self.error is None:
            import xgrammar as xgr

            try:
                self._matcher = xgr.GrammarMatcher(self.compiled.result())
            except Exception as exc:  # validated at admission: not expected
                self.error = f"structured_outputs: the grammar failed to compile: {_client_message(exc)}"
        return self._matcher

    @property
    def terminated(self) -> bool:
        m = self.matcher()
        return m is not None and m.is_terminated()

    @property
    def live(self) -> bool:
        """Whether the next token is constrained (neither terminated nor failed)."""
        m = self.matcher()
        return m is not None and not m.is_terminated()


def grammar_key(so: StructuredOutputsParams) -> tuple[str, str]:
    """What identifies a compiled grammar: its kind and its canonical text."""
    if so.json is not None:
        schema = so.json if isinstance(so.json, str) else json.dumps(so.json)  # key order is output order
        return "json", schema
    if so.regex is not None:
        return "regex", so.regex
    if so.choice is not None:
        return "choice", json.dumps(list(so.choice))
    if so.grammar is not None:
        return "grammar", so.grammar
    return "json_object", ""


class StructuredOutputs:
    """The engine's grammar compiler, its LRU of compiled grammars, and the per-step mask."""

    def __init__(
        self, config: StructuredOutputsConfig, tokenizer, vocab_size: int, eos_token_ids: set[int], to_device,
    ) -> None:
        """``vocab_size``: the lm_head's rows (V, may exceed the tokenizer's); ``to_device``:
        the engine's non-stalling staged copy (``PinnedStager.to_device``)."""
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.to_device = to_device
        self._compiler = None  # built with the first constrained request
        self._pool: ThreadPoolExecutor | None = None  # compiles off the engine thread (xgrammar releases the GIL)
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._host_mask: torch.Tensor | None = None  # (capacity, ceil(V/32)) int32, grown as needed
        self._bits: torch.Tensor | None = None  # (32,) int32 on the device: 0..31
        self._batch = None  # xgrammar.BatchGrammarMatcher: fills many rows on its threads
        self.num_active = 0
        """Constrained requests admitted and not yet released; 0: ``apply`` is never called."""
        self.num_compiled = 0
        """Grammars compiled (LRU misses), for tests and stats."""
        self.compile_wait_s = 0.0
        """Time sampling steps spent waiting for a compile still running."""
        self.num_token_waits = 0
        """Steps whose mask waited for the previous step's tokens (async scheduling's cost)."""

    # ---- compile ------------------------------------------------------------------------------

    def _compiler_(self):
        if self._compiler is None:
            import xgrammar as xgr

            if self.tokenizer is None:
                raise ValueError("structured_outputs needs a tokenizer; this engine runs without one")
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids or None
            )
            # our own LRU holds compiled grammars; xgrammar's cache would keep a second copy
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        return self._compiler

    def compile(self, so: StructuredOutputsParams) -> Future:
        """The compiled grammar of ``so``, as a future: from the LRU when asked before, else
        parsed here (a ValueError with a client-fit message naming the constraint when it is
        invalid; parsing takes about a millisecond) and compiled on a background thread (the
        costly part, ~0.2-0.4 s for a typical schema on a CPU: xgrammar precomputes its token
        masks). The request prefills meanwhile; its first sampling step waits for the rest."""
        if so.whitespace_pattern is not None:
            raise ValueError(
                f"structured_outputs.whitespace_pattern is not supported by the {BACKEND} backend "
                "(JSON is generated compact, with the separators ', ' and ': ')"
            )
        key = grammar_key(so)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        grammar = self._parse(key)
        compiler = self._compiler_()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchmax-grammar")
        compiled = self._pool.submit(compiler.compile_grammar, grammar)
        self.num_compiled += 1
        self._cache[key] = compiled
        while len(self._cache) > self.config.grammar_cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _parse(self, key: tuple[str, str]):
        """The ``xgrammar.Grammar`` of ``key`` (parsed, not compiled), or ValueError."""
        import xgrammar as xgr

        kind, text = key
        ws = self.config.json_any_whitespace
        try:
            if kind == "json":
                if isinstance(json.loads(text), bool):  # xgrammar takes true/false schemas; clients mean objects
                    raise ValueError("a JSON schema must be an object")
                return xgr.Grammar.from_ebnf(json_schema_ebnf(text, ws))
            if kind == "json_object":
                return xgr.Grammar.from_ebnf(json_schema_ebnf('{"type": "object"}', ws))
            if kind == "regex":
                return xgr.Grammar.from_regex(text)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(s) for s in json.loads(text))  # JSON escapes are EBNF's
                return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
            # EBNF (GBNF, rules "name ::= ...") or Lark ("name: ...", the start rule "start")
            return xgr.Grammar.from_ebnf(text) if "::=" in text else xgr.Grammar.from_lark(text)
        except (RuntimeError, ValueError, json.JSONDecodeError) as exc:
            what = {"json": "invalid JSON schema", "json_object": "json_object", "regex": "invalid regex",
                    "choice": "invalid choice", "grammar": "invalid grammar"}[kind]
            raise ValueError(f"structured_outputs.{kind}: {what}: {_client_message(exc)}") from None

    # ---- requests -----------------------------------------------------------------------------

    def new_state(self, so: StructuredOutputsParams) -> GrammarState:
        return GrammarState(self.compile(so))

    def track(self, req: Request) -> None:
        """``req`` (with a ``grammar``) is admitted: steps mask while any such is active."""
        self.num_active += 1

    def release(self, req: Request) -> None:
        g = req.grammar
        if g is not None and not g.released:
            g.released = True
            self.num_active -= 1

    def accept(self, req: Request) -> None:
        """Advance ``req``'s matcher over the output tokens it has not consumed yet."""
        g: GrammarState = req.grammar
        while g.accepted < len(req.output_token_ids):
            self._advance(g, req.output_token_ids[g.accepted])

    @staticmethod
    def _advance(g: GrammarState, tok: int) -> None:
        g.accepted += 1
        if not g.live:
            return  # terminated or failed: the request ends on this step's results; later tokens are discarded
        if not g.matcher().accept_token(tok):
            g.error = f"structured_outputs: token {tok} does not continue the grammar (another parameter masked every token it allows)"

    # ---- one step -----------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, sampled: list[Request], inflight: StepInFlight | None) -> None:
        """Mask the constrained rows of the step's sampled logits (S, V) in place.
        ``inflight``: the step launched before this one (async scheduling), whose tokens the
        constrained rows' matchers need first; waited for only when one of them has a
        pending token."""
        rows = [i for i, r in enumerate(sampled) if r.grammar is not None]
        if not rows:
            return
        reqs = [sampled[i] for i in rows]
        waiting = [r.grammar.compiled for r in reqs if not r.grammar.compiled.done()]
        if waiting:  # compiles that did not finish during the prefill
            t0 = time.perf_counter()
            for f in waiting:
                f.exception()  # waits; a failure is the request's (GrammarState.matcher)
            self.compile_wait_s += time.perf_counter() - t0
        if any(r.num_pending_tokens for r in reqs):
            # the mask needs the previous step's token: wait for its copies (the forward of
            # this step is already queued behind them, so the device keeps working)
            inflight.wait()
            self.num_token_waits += 1
            host = inflight.host_tokens
            for r in reqs:
                self.accept(r)
                if r.num_pending_tokens and r.grammar.accepted == len(r.output_token_ids):
                    self._advance(r.grammar, int(host[inflight.row_of[r.request_id]]))
        k, words = len(rows), (self.vocab_size + 31) // 32
        cap = 0 if self._host_mask is None else self._host_mask.shape[0]
        if cap < k:
            self._host_mask = torch.empty((max(8, k, 2 * cap), words), dtype=torch.int32)
        mask = self._host_mask[:k]
        live = [(j, r.grammar.matcher()) for j, r in enumerate(reqs) if r.grammar.live]
        if len(live) > 1:
            # xgrammar fills the rows on its own threads (GIL released): most states take
            # microseconds, a few milliseconds (inside length-bounded or patterned strings)
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask([m for _, m in live], mask, [j for j, _ in live])
        elif live:
            live[0][1].fill_next_token_bitmask(mask, live[0][0])
        if len(live) < k:
            for j, r in enumerate(reqs):
                if not r.grammar.live:
                    mask[j].fill_(-1)  # terminated or failed: it ends on this step's results; its token is discarded
        # staged through pinned memory: the host buffer is free to be rewritten at once
        dev = self.to_device(torch.cat([mask.view(-1), torch.tensor(rows, dtype=torch.int32)]), torch.int32)
        self.apply_bitmask(logits, dev[k * words :].long(), dev[: k * words].view(k, words))

    def apply_bitmask(self, logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
        """``logits`` (S, V), any float dtype, edited in place: rows ``rows`` (K,) int64 keep
        only the tokens whose bit is set in ``bitmask`` (K, ceil(V/32)) int32."""
        if self._bits is None:
            self._bits = torch.arange(32, dtype=torch.int32, device=logits.device)
        k, v = bitmask.shape[0], logits.shape[1]
        # (K, W, 1) >> (32,) & 1 -> (K, W, 32): bit j of word w is token 32 w + j; the
        # arithmetic shift of a negative word still yields its top bit through & 1
        allowed = ((bitmask.unsqueeze(-1) >> self._bits) & 1).view(k, -1)[:, :v].bool()  # (K, V)
        sub = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
        logits.index_copy_(0, rows, sub)

"""``ServerContext``: what the routes and handlers share (engine, settings, metrics,
lifecycle state), and admission of generation calls, counted in the engine requests they make
(prompts x n). The app (``app.py``) builds one; routes and serving read it, so neither
imports the module that assembles the app."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from batchmax.engine.async_engine import AsyncEngine
from batchmax.engine.core_client import EngineCoreClient
from batchmax.server.metrics import ServerMetrics
from batchmax.server.protocol import APIError, bad_request
from batchmax.server.settings import ServerSettings


class ServerContext:
    """Everything the routes share: the engine, settings, metrics and lifecycle state."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine | EngineCoreClient | None = None
        self.tokenizer = None  # the server's own copy: HF fast tokenizers are not safe to share across threads
        self.serving = None  # OpenAIServing, once loaded
        self.metrics = ServerMetrics(self._stats, lambda: self.model_name)
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.inflight = 0
        """Generation calls admitted and not yet answered (streams count until they end)."""
        self.pending_sequences = 0
        """Sequences of admitted calls not yet handed to the engine (still tokenizing): they count
        against ``max_queued`` with the engine's waiting requests."""
        self.on_fatal: Callable[[], None] | None = None
        """Called when the model fails to load (the CLI stops the server with it)."""

    def _stats(self):
        return self.engine.stats() if self.engine is not None else None

    def stats_sample(self):
        """(engine stats, requests waiting) for the periodic stats line; None until loaded."""
        if not self.ready or self.engine is None:
            return None
        return self.engine.stats(), self.engine.num_waiting

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.engine.model_name if self.engine is not None else "unknown"

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def attach(self, engine: Any, make_serving: Callable[["ServerContext"], Any]) -> None:
        """Take a loaded engine (sync or async) and become ready; ``make_serving(ctx)`` builds
        the request handlers (``OpenAIServing``), which read this context."""
        if hasattr(engine, "step"):  # a synchronous engine: drive it from a thread here
            engine = AsyncEngine(engine)
        if engine.on_step is None:
            engine.on_step = self.metrics.on_step
        self.engine = engine
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)  # None: a tokenizer-less engine
        except Exception:  # some tokenizers cannot be copied; share it then
            self.tokenizer = engine.tokenizer
        self.serving = make_serving(self)
        self.metrics.init_labels()
        self.ready = True

    # ---------------------------------------------------------------- admission
    def admit(self, num_prompts: int = 1, n: int = 1, prompt_param: str = "prompt") -> "Ticket":
        """Let a generation call of ``num_prompts`` prompts x ``n`` choices in (that many engine
        requests), or refuse it: 400 when one call asks for more than it may, 503 when
        loading, draining, or when its requests would take the queue past ``max_queued``."""
        s = self.settings
        seqs = num_prompts * n
        limit = min(s.max_sequences_per_call, s.max_queued)
        if seqs > limit:
            raise bad_request(
                f"This call asks for {seqs} sequences ({num_prompts} prompt(s) x n={n}); the server accepts at most "
                f"{limit} per call.", param=prompt_param if num_prompts > limit else "n", code="invalid_value",
            )
        retry = {"Retry-After": str(s.retry_after_s)}
        if self.draining:
            self.metrics.rejected("draining")
            raise APIError(503, "The server is shutting down.", "server_error", code="server_shutting_down", headers=retry)
        if not self.ready:
            self.metrics.rejected("loading")
            raise APIError(503, "The model is still loading.", "server_error", code="model_loading", headers=retry)
        # calls admitted but still tokenizing count too: many arriving at once cannot all pass
        waiting = self.engine.num_waiting + self.pending_sequences
        if waiting + seqs > s.max_queued:
            self.metrics.rejected("queue_full")
            raise APIError(
                503, f"The server is overloaded: {waiting} requests are already queued and this call would add {seqs} "
                f"(at most {s.max_queued} may wait). Retry later.",
                "server_error", code="queue_full", headers=retry,
            )
        self.inflight += 1
        self.pending_sequences += seqs
        return Ticket(self, seqs)


class Ticket:
    """One admitted generation call; ``submitted()`` once its requests are the engine's (or
    refused by it), ``release()`` when its response has ended. Both idempotent."""

    def __init__(self, ctx: ServerContext, sequences: int = 0) -> None:
        self.ctx = ctx
        self.pending = sequences
        self.released = False

    def submitted(self) -> None:
        """The call's sequences now count in the engine's queue, no longer as pending here."""
        self.ctx.pending_sequences -= self.pending
        self.pending = 0

    def release(self) -> None:
        self.submitted()
        if not self.released:
            self.released = True
            self.ctx.inflight -= 1

"""Settings of the HTTP server (the engine has its own ``EngineConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """When set, every route but ``/health``, ``/version`` and ``/metrics`` needs
    ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``); otherwise 401."""
    served_model_name: str | None = None
    """The model id clients name; ``None``: the engine's ``model_name``."""
    max_queued: int = 1024
    """Most requests waiting for admission (not yet running): a call arriving while this many
    wait is answered 503 with ``Retry-After`` instead of letting the queue, and latency, grow
    without bound."""
    retry_after_s: int = 1
    """The ``Retry-After`` value sent with 503 answers."""
    shutdown_timeout: float = 30.0
    """On SIGTERM: seconds in-flight requests get to finish before they are aborted."""
    max_body_bytes: int = 32 << 20
    """Largest request body accepted (413 beyond): room for prompts of hundreds of thousands of
    tokens, while a client cannot make the server buffer unbounded input."""
    max_n: int = 128
    """Largest ``n`` (choices per prompt) accepted."""
    max_sequences_per_call: int = 256
    """Most engine requests one call may make (prompts x ``n``; 400 beyond). A call may also
    never hold more than ``max_queued``: it could not be admitted even into an empty queue."""
    max_stop_sequences: int = 16
    """Most stop strings per request (400 beyond). OpenAI allows 4, vLLM any number; 16 leaves
    room for chat templates' several end markers. Every string is checked after every token."""
    max_stop_length: int = 256
    """Longest stop string, in characters (400 beyond)."""
    unhealthy_after_step_failures: int = 3
    """``/health`` answers 503 (``unhealthy``) once this many engine steps in a row have failed,
    so an orchestrator restarts a server whose engine is broken (a lost device, say) instead of
    routing traffic to it; one successful step makes it healthy again. A single bad request
    fails one step and does not trip it."""
    generation_config: str = "auto"
    """``auto``: the sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty)
    of the model folder's ``generation_config.json`` apply to requests that do not set them
    (vLLM's ``--generation-config auto``); ``none``: OpenAI's defaults."""
    timeout_header: float = 10.0
    """Seconds a connection has to send a request's headers, counted from its opening or, on a
    kept-alive connection, from the next request's first byte; then it is closed (with a 408
    if part of a request came). Idle and slow-header connections (slowloris) cannot pile up."""
    timeout_body: float = 60.0
    """Seconds a request has to send its whole body, from the end of its headers (408 beyond;
    at the 32 MiB default body limit that asks for ~0.5 MiB/s at least)."""
    timeout_body_chunk: float = 10.0
    """Seconds the body may stall between two of its pieces (408 beyond): a client that stops
    sending is let go well before ``timeout_body``."""
    timeout_keep_alive: float = 5.0
    """Seconds an idle kept-alive connection stays open after a response (uvicorn's)."""
    limit_concurrency: int = 1024
    """Most connections served at once: a request on a connection beyond (or arriving while
    this many are in progress) is answered 503 (``too_many_connections``) and its connection
    closed. ``batchmax serve`` raises its open-file limit to fit, if the hard limit allows."""
    max_header_bytes: int = 16 * 1024
    """Largest request head (request line and headers) while it is incomplete: beyond, 400 and
    the connection closed (h11's ``max_incomplete_event_size``)."""
    log_level: str = "info"
    strict_request_fields: bool = False
    """A body field the server does not know is a 400 (``Unrecognized request argument
    supplied: NAME``, as OpenAI answers) instead of a warning in the log (as vLLM does)."""
    allowed_origins: list[str] = field(default_factory=list)
    """Origins allowed to call the API from a browser (CORS); empty: CORS off. ``["*"]``: any."""
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    access_log: bool = True
    """One line per request on the ``batchmax.access`` logger (``middleware.py``)."""
    log_stats_interval: float = 10.0
    """Seconds between the engine's periodic stats lines (``stats_log.py``); 0: none."""
    tool_call_parser: str | None = None
    """The model family's tool-call syntax (``server/tool_parsers``: hermes, llama3_json,
    mistral); None: detected from the chat template's call markers."""
    enable_auto_tool_choice: bool = True
    """``tool_choice: auto`` (the default with tools) parses calls out of the output. vLLM
    needs ``--enable-auto-tool-choice`` for it; here it is on whenever a parser is known (the
    flag is accepted for vLLM's command lines), and ``--no-enable-auto-tool-choice`` turns it
    off (auto is then a 400, as on vLLM without the flag)."""
    exclude_tools_when_tool_choice_none: bool = False
    """vLLM's flag: with ``tool_choice: none`` the tools are left out of the prompt (by default
    they go in, and the output is not parsed)."""
    reasoning_parser: str | None = None
    """``qwen3`` or ``deepseek_r1`` (``server/reasoning_parsers``): the thinking goes to
    ``reasoning`` / ``reasoning_content``; None: the output is all content."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued < 1:  # 0 would refuse everything: each new request waits a moment
            raise ValueError(f"max_queued must be >= 1, got {self.max_queued}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")
        for name in ("max_sequences_per_call", "max_stop_sequences", "max_stop_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.generation_config not in ("auto", "none"):
            raise ValueError(f"generation_config must be 'auto' or 'none', got {self.generation_config!r}")
        if self.unhealthy_after_step_failures < 1:
            raise ValueError("unhealthy_after_step_failures must be >= 1")
        for name in ("timeout_header", "timeout_body", "timeout_body_chunk", "timeout_keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, got {self.max_header_bytes}")
        if self.tool_call_parser is not None:
            from batchmax.server.tool_parsers import get_tool_parser

            get_tool_parser(self.tool_call_parser)
        if self.reasoning_parser is not None:
            from batchmax.server.reasoning_parsers import get_reasoning_parser

            get_reasoning_parser(self.reasoning_parser)
        if self.log_stats_interval < 0:
            raise ValueError(f"log_stats_interval must be >= 0, got {self.log_stats_interval}")

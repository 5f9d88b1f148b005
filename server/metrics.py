"""Prometheus metrics (prefix ``batchmax:``, label ``model_name``), vLLM's names plus
Batch-Max's compression metrics.

Two sources, one per-app ``CollectorRegistry`` (no global state, so several apps can live in
one process, as tests do):
- engine counters and gauges are read from the engine's ``stats()`` (``EngineCoreClient`` or ``AsyncEngine``) at scrape time by a custom
  collector, so they are exactly the engine's numbers, never a second bookkeeping;
- per-request histograms (TTFT, inter-token latency, end-to-end, queue time) and the finish
  counter are observed by the server as each request's outputs arrive (``RequestTracker``);
  ``iteration_tokens_total`` is observed by the engine thread after every step.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from batchmax.engine.outputs import RequestOutput
from batchmax.engine.stats import EngineStats

PREFIX = "batchmax:"
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's buckets (v1/metrics/loggers.py)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


class EngineStatsCollector(Collector):
    """Engine gauges and counters, read from the engine at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats | None], model_name: Callable[[], str]) -> None:
        self._stats = stats
        self.model_name = model_name

    def collect(self):
        st = self._stats() or EngineStats()
        label = [self.model_name()]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])  # exposed as NAME_total
            c.add_metric(label, value)
            return c

        yield gauge("num_requests_running", "Requests holding KV cache (running).", st.num_running)
        yield gauge("num_requests_waiting", "Requests waiting for admission.", st.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of the KV pool in use (1 = 100 percent).", st.kv_usage)
        yield gauge("kv_cache_capacity_tokens", "KV pool capacity in tokens per layer.", st.kv_capacity_tokens)
        yield counter("num_preemptions", "Preemptions (recompute) since start.", st.num_preemptions_total)
        yield counter("prompt_tokens", "Prompt tokens prefilled (each request counted once).", st.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", st.generation_tokens_total)
        yield counter("kv_tokens_seen", "Tokens written into the KV cache, summed over layers.", st.kv_tokens_seen_total)
        yield counter("kv_tokens_evicted", "Tokens evicted from the KV cache, summed over layers.", st.kv_tokens_evicted_total)
        yield gauge("kv_compression_ratio", "KV tokens kept over tokens seen by the running requests (1 = no eviction).", st.compression_ratio)
        yield gauge("running_batch_size", "Requests in the last engine step.", st.running_batch_size)
        yield gauge("peak_running_batch_size", "Most requests running at once since start.", st.peak_running_batch_size)
        yield counter("engine_steps", "Engine steps that ran the model.", st.num_steps_total)
        yield counter("engine_step_seconds", "Seconds spent inside the engine's step() (schedule, launch, wait for tokens).",
                      st.step_seconds_total)
        yield counter("engine_step_failures", "Engine steps that failed (their requests ended with an error).", st.num_step_failures_total)
        yield gauge("host_kv_usage_perc", "Fraction of recall's host store in use (1 = 100 percent).", st.host_kv_usage)
        yield counter("recall_fallbacks", "Recall requests run with plain eviction because the host store was full.", st.num_recall_fallbacks_total)


class ServerMetrics:
    """All collectors of one app, in its own registry."""

    def __init__(self, stats: Callable[[], EngineStats | None], model_name: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(EngineStatsCollector(stats, model_name))
        labels = ["model_name"]
        r = self.registry
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.", labels + ["finished_reason"], registry=r)
        self.requests_rejected = Counter(PREFIX + "num_requests_rejected", "Requests refused with 503 (queue full or draining).", labels + ["reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens.", labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish.", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first scheduled.", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.iteration_tokens = Histogram(PREFIX + "iteration_tokens_total", "Tokens scheduled per engine step.", labels, buckets=TOKEN_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram(PREFIX + "request_prompt_tokens", "Prompt tokens per finished request.", labels, buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(PREFIX + "request_generation_tokens", "Generated tokens per finished request.", labels, buckets=TOKEN_BUCKETS, registry=r)

    def init_labels(self) -> None:
        """Create every labelled child at 0 (once the model name is known), so a scrape shows
        each series from the start and rates/diffs need no special case."""
        name = self.model_name()
        for reason in FINISH_REASONS:
            self.request_success.labels(name, reason)
        for reason in ("queue_full", "draining", "loading"):
            self.requests_rejected.labels(name, reason)
        for h in (self.ttft, self.itl, self.e2e, self.queue_time, self.iteration_tokens, self.request_prompt_tokens, self.request_generation_tokens):
            h.labels(name)

    def on_step(self, stats: EngineStats) -> None:
        """Called in the engine thread after each step (prometheus-client is thread-safe)."""
        if stats.last_step_tokens:
            self.iteration_tokens.labels(self.model_name()).observe(stats.last_step_tokens)

    def rejected(self, reason: str) -> None:
        self.requests_rejected.labels(self.model_name(), reason).inc()

    def tracker(self, start: float | None = None) -> "RequestTracker":
        return RequestTracker(self, start)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Latency bookkeeping of one engine request, fed with its outputs as they arrive.

    Latencies run from ``start``, when the server received the call (so tokenization and
    the hop to the engine thread count, as the client sees them), on the same monotonic
    clock as the engine's timestamps; ``t`` is when the step that produced an output ended.
    When the reader fell behind and several steps' tokens arrive at once, the gap is spread
    evenly over them."""

    def __init__(self, metrics: ServerMetrics, start: float | None = None) -> None:
        self.m = metrics
        self.name = metrics.model_name()
        self.start = time.monotonic() if start is None else start
        self.num_tokens = 0
        self.last_t: float | None = None
        self.last: RequestOutput | None = None
        self.done = False

    def observe(self, out: RequestOutput, t: float) -> None:
        self.last = out
        new = len(out.token_ids) - self.num_tokens
        if new > 0:
            if self.num_tokens == 0:
                # the step's end, not out.first_token_time: the engine stamps that when the
                # step starts, before the forward pass that produced the token
                first = t
                self.m.ttft.labels(self.name).observe(max(0.0, first - self.start))
                prev, gaps = first, new - 1
            else:
                prev, gaps = self.last_t, new
            if gaps > 0 and prev is not None:
                itl = self.m.itl.labels(self.name)
                for _ in range(gaps):
                    itl.observe(max(0.0, t - prev) / gaps)
            self.num_tokens = len(out.token_ids)
            self.last_t = t
        if out.finished:
            self.finish(out.finish_reason or "stop")

    def finish(self, reason: str) -> None:
        """Record the end (``abort`` when the client went away before the final output)."""
        if self.done:
            return
        self.done = True
        out = self.last
        end = out.finished_time if out is not None and out.finished and out.finished_time else time.monotonic()
        self.m.request_success.labels(self.name, reason).inc()
        self.m.e2e.labels(self.name).observe(max(0.0, end - self.start))
        if out is not None and out.first_scheduled_time is not None:
            self.m.queue_time.labels(self.name).observe(max(0.0, out.first_scheduled_time - self.start))
        if out is not None:
            self.m.request_prompt_tokens.labels(self.name).observe(len(out.prompt_token_ids))
            self.m.request_generation_tokens.labels(self.name).observe(len(out.token_ids))

"""Engine counters and gauges, read by the offline benchmark and the Prometheus exporter."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    num_running: int = 0
    """Requests holding KV (scheduled in the last step or between chunks)."""
    num_waiting: int = 0
    kv_usage: float = 0.0
    """Fraction of the KV pool's blocks in use (0..1)."""
    kv_capacity_tokens: int = 0
    """Pool capacity in tokens per layer."""
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    """Prompt tokens of requests that started (counted once, at their first prefill chunk)."""
    generation_tokens_total: int = 0
    kv_tokens_seen_total: int = 0
    """Tokens written into the cache, summed over layers."""
    kv_tokens_evicted_total: int = 0
    """Tokens dropped by eviction, summed over layers."""
    kv_tokens_kept: int = 0
    """Tokens held now by running requests, summed over layers."""
    kv_tokens_seen: int = 0
    """Tokens running requests have written, summed over layers (kept + evicted)."""
    num_recall_fallbacks_total: int = 0
    """Recall requests that ran with plain eviction because the host store was full."""
    host_kv_usage: float = 0.0
    """Fraction of recall's host store in use (0..1)."""
    running_batch_size: int = 0
    """Requests in the last step."""
    peak_running_batch_size: int = 0
    last_step_tokens: int = 0
    """Tokens scheduled in the last step (prefill chunks + decode tokens)."""
    num_steps_total: int = 0
    scheduled_tokens_total: int = 0
    """Tokens scheduled by all steps (the sum of ``last_step_tokens``)."""
    step_seconds_total: float = 0.0
    """Wall time spent inside ``step()``: scheduling, launching and, with async scheduling,
    waiting for the previous step's tokens. Beside a run's wall time it says how much of it
    the engine loop spent outside the engine (commands, outputs, IPC, idle)."""
    num_step_failures_total: int = 0
    """Steps that raised; their requests ended with finish_reason ``error`` (counted by
    ``AsyncEngine``, which handles the failure)."""

    @property
    def compression_ratio(self) -> float:
        """Kept over seen tokens of the running requests (1.0 with the full cache)."""
        return self.kv_tokens_kept / self.kv_tokens_seen if self.kv_tokens_seen else 1.0

"""The periodic engine line, as vLLM prints every few seconds: requests running and waiting,
KV cache use, prompt and generation throughput over the interval, and the engine steps of the
interval with their mean time inside ``step()``, from the engine's ``stats()`` counters
(``prompt_tokens_total``, ``generation_tokens_total``, ``num_steps_total``,
``step_seconds_total``). Logged on ``batchmax.stats`` at info level every
``--log-stats-interval`` seconds, only for an interval with activity (requests running or
waiting, or tokens processed), so an idle server is quiet::

    engine: running 3 reqs, waiting 0 reqs, KV cache 12.5%, prompt 812.4 tok/s, generation 96.0 tok/s, 40 steps of 24.8 ms
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from batchmax.engine.stats import EngineStats

logger = logging.getLogger("batchmax.stats")


class StatsLine:
    """Turns successive samples of the engine's stats into lines (``tick``)."""

    def __init__(self, sample: Callable[[], tuple | None]) -> None:
        """``sample()``: (stats, waiting) of the engine now, or None while there is none."""
        self.sample = sample
        self._prev: tuple[float, EngineStats] | None = None  # the last tick's time and stats (a copy)
        self._none_at: float | None = None  # the last tick that found no engine

    def tick(self, now: float) -> tuple[str, dict] | None:
        """The line and its fields for the interval since the last tick, or None (no engine
        yet, the first sample of an engine already running, or nothing happened). An engine
        that appears after a tick without one was loaded since: its counters started at 0
        then, so its first interval counts from that tick."""
        got = self.sample()
        if got is None:
            self._none_at, self._prev = now, None
            return None
        st, waiting = got
        prev, self._prev = self._prev, (now, st)
        if prev is None and self._none_at is not None:
            prev, self._none_at = (self._none_at, EngineStats()), None
        if prev is None or now <= prev[0]:
            return None
        dt, before = now - prev[0], prev[1]
        dp, dg = st.prompt_tokens_total - before.prompt_tokens_total, st.generation_tokens_total - before.generation_tokens_total
        steps, step_s = st.num_steps_total - before.num_steps_total, st.step_seconds_total - before.step_seconds_total
        if not (st.num_running or waiting or dp or dg):
            return None
        fields = {
            "running": st.num_running,
            "waiting": waiting,
            "kv_usage": st.kv_usage,
            "prompt_tps": dp / dt,
            "generation_tps": dg / dt,
            "steps": steps,
            "step_ms": 1e3 * step_s / steps if steps else 0.0,
        }
        line = (f"engine: running {st.num_running} reqs, waiting {waiting} reqs, KV cache {st.kv_usage * 100:.1f}%, "
                f"prompt {dp / dt:.1f} tok/s, generation {dg / dt:.1f} tok/s, {steps} steps of {fields['step_ms']:.1f} ms")
        return line, fields


async def log_stats(sample: Callable[[], tuple | None], interval: float) -> None:
    """Every ``interval`` seconds, log the line of the interval (runs until cancelled)."""
    stats = StatsLine(sample)
    stats.tick(time.monotonic())
    while True:
        await asyncio.sleep(interval)
        try:
            got = stats.tick(time.monotonic())
        except Exception:  # a stats read must never end the task (or the app)
            logger.debug("reading the engine's stats failed", exc_info=True)
            continue
        if got is not None:
            logger.info(got[0], extra=got[1])

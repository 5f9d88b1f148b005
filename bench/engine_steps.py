"""Where the engine's time went during a timed run: steps, tokens per step and the time
inside ``step()``, from the engine's own counters (``EngineStats`` offline, ``/metrics`` for a
``batchmax serve``). A server and the offline engine on one workload then compare step by
step: more steps of fewer tokens is the scheduler; the same steps taking longer is the step
itself; a smaller share of the run inside ``step()`` is the loop around it (commands,
outputs, IPC, or waiting for work).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from batchmax.engine.stats import EngineStats


@dataclass
class StepFigures:
    steps: int
    """Steps that ran the model."""
    tokens: int
    """Tokens they scheduled (prefill chunks + decode tokens)."""
    step_s: float
    """Seconds inside ``step()``."""
    wall_s: float
    """The timed run's wall time."""

    def line(self) -> str:
        if not self.steps:
            return "no engine steps"
        return (f"{self.steps} steps, {self.tokens / self.steps:,.0f} tokens/step, {1e3 * self.step_s / self.steps:.1f} ms "
                f"in step() each, {100 * self.step_s / self.wall_s:.0f}% of the run inside step()")

    def as_dict(self) -> dict:
        return asdict(self)


def from_stats(before: EngineStats, after: EngineStats, wall_s: float) -> StepFigures:
    """Offline: two ``stats()`` around the run."""
    return StepFigures(after.num_steps_total - before.num_steps_total, after.scheduled_tokens_total - before.scheduled_tokens_total,
                       after.step_seconds_total - before.step_seconds_total, wall_s)


COUNTERS = ("batchmax:engine_steps_total", "batchmax:engine_step_seconds_total", "batchmax:iteration_tokens_total_sum")


def parse_metrics(text: str) -> dict[str, float]:
    """The counters above from a ``/metrics`` body (summed over label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in out:
                out[s.name] += s.value
    return out


def scrape(url: str) -> dict[str, float]:
    import httpx

    return parse_metrics(httpx.get(url.rstrip("/") + "/metrics", timeout=10).text)


def from_metrics(before: dict[str, float], after: dict[str, float], wall_s: float) -> StepFigures:
    d = {k: after[k] - before[k] for k in COUNTERS}
    return StepFigures(int(d[COUNTERS[0]]), int(d[COUNTERS[2]]), d[COUNTERS[1]], wall_s)

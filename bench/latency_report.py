"""Summaries of a load run: throughput and latency percentiles, and the final table.

``summarize`` works on plain per-request records, so the HTTP run and the offline engine
(``RequestOutput`` timestamps) are summarised the same way and shown side by side.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class Timing:
    """One finished request, in seconds from its own start; ``itl`` are inter-token gaps."""

    ttft: float | None
    e2e: float
    itl: list[float]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Summary:
    label: str
    completed: int
    failed: int
    duration_s: float
    request_per_s: float
    output_tok_per_s: float
    total_tok_per_s: float
    prompt_tokens: int
    completion_tokens: int
    ms: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{"ttft" | "itl" | "tpot" | "e2e": {"mean", "p50", "p90", "p99"}}`` in milliseconds."""

    def as_dict(self) -> dict:
        return dict(vars(self))


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("mean", *(f"p{p}" for p in PERCENTILES))}
    a = np.asarray(values, dtype=float) * 1000.0
    out = {"mean": round(float(a.mean()), 2)}
    for p in PERCENTILES:
        out[f"p{p}"] = round(float(np.percentile(a, p)), 2)
    return out


def summarize(label: str, timings: list[Timing], failed: int, duration_s: float) -> Summary:
    prompt = sum(t.prompt_tokens for t in timings)
    completion = sum(t.completion_tokens for t in timings)
    d = max(duration_s, 1e-9)
    tpot = [(t.e2e - t.ttft) / (t.completion_tokens - 1) for t in timings if t.ttft is not None and t.completion_tokens > 1]
    return Summary(
        label=label,
        completed=len(timings),
        failed=failed,
        duration_s=round(duration_s, 3),
        request_per_s=round(len(timings) / d, 3),
        output_tok_per_s=round(completion / d, 1),
        total_tok_per_s=round((prompt + completion) / d, 1),
        prompt_tokens=prompt,
        completion_tokens=completion,
        ms={
            "ttft": _stats_ms([t.ttft for t in timings if t.ttft is not None]),
            "itl": _stats_ms([g for t in timings for g in t.itl]),
            "tpot": _stats_ms(tpot),
            "e2e": _stats_ms([t.e2e for t in timings]),
        },
    )


def table(summaries: list[Summary]) -> str:
    """A plain-text table, one column per summary."""
    rows: list[tuple[str, list[str]]] = [
        ("completed", [str(s.completed) for s in summaries]),
        ("failed", [str(s.failed) for s in summaries]),
        ("duration (s)", [f"{s.duration_s:.2f}" for s in summaries]),
        ("request/s", [f"{s.request_per_s:.2f}" for s in summaries]),
        ("output tok/s", [f"{s.output_tok_per_s:,.1f}" for s in summaries]),
        ("total tok/s", [f"{s.total_tok_per_s:,.1f}" for s in summaries]),
        ("prompt / output tokens", [f"{s.prompt_tokens} / {s.completion_tokens}" for s in summaries]),
    ]
    names = {"ttft": "TTFT", "itl": "ITL", "tpot": "TPOT", "e2e": "E2E"}
    for key, name in names.items():
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            rows.append((f"{name} {stat} (ms)", [_fmt(s.ms.get(key, {}).get(stat)) for s in summaries]))
    head = ["", *[s.label for s in summaries]]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(head[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(len(summaries))]
    lines = ["  ".join([head[0].ljust(w0), *(h.rjust(w) for h, w in zip(head[1:], widths))])]
    lines.append("-" * len(lines[0]))
    for name, vals in rows:
        lines.append("  ".join([name.ljust(w0), *(v.rjust(w) for v, w in zip(vals, widths))]))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None or v != v:  # NaN: no sample (an offline run has no inter-token gaps)
        return "-"
    return f"{v:,.1f}"

"""Load generator for a running OpenAI-compatible server (workload W3 of docs/ARCHITECTURE.md, "Benchmarks and workloads").

N concurrent streaming clients send requests whose prompt and output lengths are drawn from
distributions (``N`` fixed or ``LO:HI`` uniform); it prints a progress bar, then request/s,
output tok/s, and TTFT, inter-token latency (ITL), time per output token (TPOT) and
end-to-end latency (E2E) at mean/p50/p90/p99. ``--compare-offline`` runs the same workload
through the offline engine (``engine.LLM``) in this process and shows both columns.

    batchmax serve --model DIR --port 8000 &
    python -m bench.serve_load --url http://127.0.0.1:8000 --num-requests 256 --concurrency 64 \\
        --prompt-len 64:512 --output-len 16:128
    python -m bench.serve_load --url http://127.0.0.1:8000 --num-requests 64 --concurrency 64 \\
        --prompt-len 128 --output-len 32 --compare-offline --model DIR --engine-args '{"device": "cpu"}'

Any OpenAI-compatible server works: ``--prompt-format text`` for servers that take no token
ids (and for ``--endpoint chat``), ``--no-ignore-eos`` for servers that reject vLLM's
``ignore_eos``. Exit status 1 if any request failed. ``batchmax bench serve ...`` runs this
from a checkout. On a CPU shared with other work, run the comparison with
``OMP_WAIT_POLICY=PASSIVE``: an engine stepped in the thread that created it otherwise loses
much of its time to OpenMP spin-waiting (bench/results/reliability-2026-11-25.md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

from bench.engine_steps import StepFigures, from_stats
from bench.latency_report import Summary, Timing, summarize, table
from bench.load_client import LoadConfig, LoadRun, run_load
from bench.workload import LenDist, LoadRequest, make_workload


def http_summary(run: LoadRun, label: str = "server") -> Summary:
    """Completed requests only (failed and hung-up ones are counted, not timed)."""
    done = [r for r in run.results if r.ok and not r.disconnected]
    timings = [
        Timing(r.ttft, r.e2e or 0.0, r.chunk_gaps, r.prompt_tokens or 0,
               r.completion_tokens if r.completion_tokens is not None else r.num_chunks)
        for r in done
    ]
    return summarize(label, timings, sum(not r.ok for r in run.results), run.duration)


def run_offline(workload: list[LoadRequest], model: str | None, engine_args: dict, temperature: float, ignore_eos: bool,
                warmup: list[LoadRequest] | None = None) -> tuple[Summary, StepFigures]:
    """The same workload through ``LLMEngine`` directly: every request added at once, then
    stepped to the end, timing each request's tokens as the steps produce them. ``warmup``
    runs first, untimed (kernels compile on first use of a shape). Also returns the run's
    engine step figures."""
    from batchmax.engine import LLM, SamplingParams

    llm = LLM(model, **engine_args)
    eng = llm.engine
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate([[100, 101, 102, 103]], warm)  # first-call costs stay out of the timing
    if warmup:
        llm.generate([r.prompt for r in warmup], [SamplingParams(max_tokens=r.max_tokens, temperature=temperature, ignore_eos=ignore_eos) for r in warmup])
    stats0 = eng.stats()
    t0 = time.perf_counter()
    marks: dict[str, list[float]] = {}
    for i, req in enumerate(workload):
        eng.add_request(f"load-{i}", req.prompt, SamplingParams(max_tokens=req.max_tokens, temperature=temperature, ignore_eos=ignore_eos))
        marks[f"load-{i}"] = []
    finals = {}
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for out in outs:
            m = marks.get(out.request_id)
            if m is None:
                continue
            m.extend([now] * (len(out.token_ids) - len(m)))
            if out.finished:
                finals[out.request_id] = (out, now)
    duration = time.perf_counter() - t0
    st = eng.stats()
    # recall that found no room in the host store ran plain eviction instead: say so beside the figure
    steps = from_stats(stats0, st, duration)
    print(f"offline engine: peak running batch {st.peak_running_batch_size}, recall fallbacks {st.num_recall_fallbacks_total}; "
          f"{steps.line()}", file=sys.stderr, flush=True)
    timings = []
    for rid, m in marks.items():
        out, end = finals[rid]
        timings.append(Timing(m[0] - t0 if m else None, end - t0, [b - a for a, b in zip(m, m[1:])],
                              len(out.prompt_token_ids), len(out.token_ids)))
    return summarize("offline engine", timings, 0, duration), steps


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--served-model", default=None, help="model id to send (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64, help="most requests in flight (concurrent streaming clients)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--prompt-len", type=LenDist.parse, default=LenDist(128, 128), help="N or LO:HI (uniform)")
    p.add_argument("--output-len", type=LenDist.parse, default=LenDist(64, 64), help="N or LO:HI (uniform)")
    p.add_argument("--prompt-format", default="ids", choices=["ids", "text"], help="token-id prompts (exact lengths) or text")
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="generate exactly the output length")
    p.add_argument("--disconnect-after-chunks", type=int, default=None, help="hang up after this many chunks (disconnect storm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compare-offline", action="store_true", help="also run the workload through engine.LLM in this process")
    p.add_argument("--model", default=None, help="with --compare-offline: the model directory (default: the default model)")
    p.add_argument("--engine-args", type=json.loads, default={}, help='with --compare-offline: engine options as JSON, e.g. \'{"device": "cpu", "max_num_seqs": 256}\'')
    p.add_argument("--json", default=None, help="append the summaries as one JSON line to this file")
    return p.parse_args(argv)


def main(argv=None, prog: str | None = None) -> int:
    a = parse_args(argv, prog)
    workload = make_workload(a.num_requests, a.prompt_len, a.output_len, a.seed, a.prompt_format, a.vocab_size)
    cfg = LoadConfig(
        url=a.url.rstrip("/").removesuffix("/v1"), endpoint=a.endpoint, model=a.served_model, api_key=a.api_key,
        concurrency=a.concurrency, request_rate=a.request_rate, temperature=a.temperature, ignore_eos=a.ignore_eos,
        disconnect_after_chunks=a.disconnect_after_chunks, timeout=a.timeout, seed=a.seed, progress=not a.no_progress,
    )
    run = asyncio.run(run_load(cfg, workload))
    summaries = [http_summary(run, f"server ({a.concurrency} clients)")]
    failures = [r for r in run.results if not r.ok]
    for r in failures[:5]:
        print(f"request {r.index} failed: {r.error}", file=sys.stderr)
    if a.compare_offline:
        summaries.append(run_offline(workload, a.model, a.engine_args, a.temperature, a.ignore_eos)[0])
    print(f"\n{a.num_requests} requests, prompt {a.prompt_len} ({a.prompt_format}), output {a.output_len}, "
          f"concurrency {a.concurrency}, rate {a.request_rate:g}/s, model {run.model} at {cfg.url}")
    print(table(summaries))
    if a.json:
        record = {"args": {k: str(v) for k, v in vars(a).items() if k != "api_key"}, "summaries": [s.as_dict() for s in summaries]}
        with open(a.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

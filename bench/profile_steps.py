"""Where a workload's time goes, step by step: wall time of every engine step split into
prefill-carrying and decode-only steps, the device span of its forward (CUDA events, so the
measurement adds no sync: with async scheduling a step's host work overlaps the previous
step's forward, and the step time approaches the forward's), and a torch-profiler table of
the CUDA kernels of a few steady-state steps of each kind.

    python -m bench.profile_steps --num-prompts 128 --prompt-len 4096 --output-len 256 --kv-policy snapkv --kv-budget 512
    python -m bench.profile_steps --num-prompts 256 --prompt-len 767 --output-len 16   # decode B=256 x 768

Writes ``--json`` (one line) and prints the kernel tables when ``--profile`` (or ``--profile-at``)
is given, each with the GPU's idle gaps in that step and the host's CUDA calls inside them
(``device_idle`` in the JSON): a step longer than its kernels is waiting on the host there.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import statistics
import time

import torch

from batchmax.engine import LLM, SamplingParams
from bench import append_jsonl
from bench.models import LLAMA3_8B, shape_only_model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", help="'llama3-8b' (random bf16 weights of that shape) or a local HF dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-policy", default="full")
    p.add_argument("--kv-budget", type=int, default=None)
    p.add_argument("--kv-recall", action="store_true")
    p.add_argument("--host-kv-tokens", type=int, default=131072, help="recall's host store, tokens per layer (as bench/throughput.py)")
    p.add_argument("--recall-stage-tokens", type=int, default=32768,
                   help="recall: most parked tokens per layer re-selected in one group (the engine's recall_stage_tokens)")
    p.add_argument("--layer-batch-mib", type=float, default=None,
                   help="eviction's layer batch (EvictionConfig.layer_batch_mib; 0: every layer alone; default: the engine's)")
    p.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="Triton RMSNorm/RoPE/SiLU kernels (default: with the Triton attention)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch step n+1 before reading step n's tokens (default: on with CUDA)")
    p.add_argument("--profile", action="store_true", help="print kernel tables of 3 prefill and 3 decode steps")
    p.add_argument("--profile-at", type=int, nargs="+", default=[],
                   help="also print the kernel tables of these steps (0-based; W1's first wave ends its prompts at step 7)")
    p.add_argument("--cprofile-at", type=int, nargs="+", default=[],
                   help="cProfile the host side of these steps (0-based), e.g. the slowest steps a run reported")
    p.add_argument("--cprofile", action="store_true",
                   help="cProfile the host side of the decode steps at the peak batch (their Python, not the kernels)")
    p.add_argument("--trace", default=None,
                   help="write a torch-profiler trace (chrome JSON, gzipped) of --trace-steps decode steps at the peak batch, "
                        "after 5 such steps, and print where the GPU idled in them")
    p.add_argument("--trace-steps", type=int, default=4)
    p.add_argument("--log-compiles", action="store_true",
                   help="report every Triton compile after the warm-up: the step, kernel, constexprs and seconds")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    dummy = a.model == "llama3-8b"
    llm = LLM(shape_only_model(LLAMA3_8B) if dummy else a.model, load_format="dummy" if dummy else "auto",
              skip_tokenizer_init=True, device=a.device, chunk_size=a.chunk,
              max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, kv_policy=a.kv_policy,
              kv_budget=a.kv_budget, kv_recall=a.kv_recall, host_kv_tokens=a.host_kv_tokens if a.kv_recall else None,
              recall_stage_tokens=a.recall_stage_tokens, cuda_graphs=a.cuda_graphs, fused_ops=a.fused_ops,
              async_scheduling=a.async_scheduling, cuda_graph_max_batch=max(256, a.max_num_seqs),
              **({} if a.layer_batch_mib is None else dict(layer_batch_mib=a.layer_batch_mib)))
    eng = llm.engine
    vocab = eng.runner.spec.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    llm.generate([[rng.randrange(1000, vocab - 1000) for _ in range(64)]], SamplingParams(max_tokens=4, ignore_eos=True))
    for i in range(a.num_prompts):
        eng.add_request(f"probe-{i}", [rng.randrange(1000, vocab - 1000) for _ in range(a.prompt_len)], params)

    cuda = eng.runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    execute = eng.runner.execute
    steps: list[dict] = []

    def timed_execute(cache, requests, num_new, *args, **kwargs):
        # device events, not syncs: a sync here would undo async scheduling's overlap. The
        # span runs from when the stream reaches the step's first command to its forward's end
        # (with the GPU idle before the step, the host's metadata work is inside it).
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        out = execute(cache, requests, num_new, *args, **kwargs)
        span = None
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            span = (start, end)
        steps.append(dict(model_s=time.perf_counter() - t, span=span, decodes=sum(n == 1 for n in num_new),
                          prefill_tokens=sum(n for n in num_new if n > 1), batch=len(num_new),
                          # prompts this step completes (recall re-selects at these)
                          last_chunks=sum(n > 1 and r.num_computed_tokens + n == r.num_prompt_tokens for r, n in zip(requests, num_new))))
        return out

    eng.runner.execute = timed_execute
    compiles: list[dict] = []
    if a.log_compiles:
        from triton.runtime.jit import JITFunction

        orig_compile = JITFunction._do_compile  # noqa: SLF001 - a benchmark-only hook on Triton's compile

        def logged_compile(self, key, signature, device, constexprs, *args, **kwargs):
            t = time.perf_counter()
            out = orig_compile(self, key, signature, device, constexprs, *args, **kwargs)
            compiles.append(dict(step=len(steps), kernel=self.fn.__name__, seconds=round(time.perf_counter() - t, 3),
                                 constexprs={str(k): v for k, v in constexprs.items()}, signature=str(signature)[:300]))
            return out

        JITFunction._do_compile = logged_compile  # noqa: SLF001
    tables, idle = {}, {}
    host_prof, host_steps = cProfile.Profile(), 0
    at_prof = cProfile.Profile()
    sync()
    t0 = time.perf_counter()
    tracer, traced = None, 0
    while eng.has_unfinished_requests():
        if a.trace and cuda and traced == 0 and tracer is None:
            steady = [s for s in steps if s["prefill_tokens"] == 0 and s["batch"] == a.num_prompts]
            if len(steady) >= 5:
                tracer = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                tracer.__enter__()
        kind = None
        if a.profile:
            running = eng.scheduler.running
            pre = any(r.num_computed_tokens < r.num_prompt_tokens for r in running) or eng.scheduler.waiting
            kind = "prefill" if pre else "decode"
            # steady state: the 4th..6th step of each kind (the first ones compile and tune)
            count = sum(1 for s in steps if (s["prefill_tokens"] > 0) == (kind == "prefill"))
            kind = kind if 3 <= count < 6 else None
        if len(steps) in a.profile_at:
            kind = f"step {len(steps)}"
        n_before = len(steps)
        prof_host = a.cprofile and not kind and steps and steps[-1]["prefill_tokens"] == 0 and steps[-1]["batch"] == a.num_prompts
        prof_at = len(steps) in a.cprofile_at and not prof_host
        if prof_host:
            host_prof.enable()
        if prof_at:
            at_prof.enable()
        ts = time.perf_counter()
        if kind:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])) as prof:
                eng.step()
        else:
            eng.step()
        if prof_host:
            host_prof.disable()
            host_steps += 1
        if prof_at:
            at_prof.disable()
        if len(steps) > n_before:  # a step that ran nothing (only reported finished requests) has no entry
            steps[-1]["step_s"] = time.perf_counter() - ts
        if tracer is not None:
            traced += 1
            if traced == a.trace_steps:
                tb = time.perf_counter()
                sync()
                tracer.__exit__(None, None, None)
                trace_report(tracer, a.trace, traced)
                tracer = None
                t0 += time.perf_counter() - tb
        if kind:
            # building the table takes seconds: keep it out of the step and the run's times
            tb = time.perf_counter()
            tables.setdefault(kind, []).append(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=18, max_name_column_width=60))
            if cuda:  # where in the step the GPU waited for the host
                idle[kind] = idle_report(chrome_events(prof))
            t0 += time.perf_counter() - tb
    sync()
    elapsed = time.perf_counter() - t0
    for st in steps:
        span = st.pop("span")
        if span is not None:
            st["model_s"] = span[0].elapsed_time(span[1]) / 1e3

    def summary(sel):
        if not sel:
            return {}
        return dict(steps=len(sel), step_s=round(sum(s["step_s"] for s in sel), 3), model_s=round(sum(s["model_s"] for s in sel), 3),
                    median_step_ms=round(1e3 * statistics.median(s["step_s"] for s in sel), 2),
                    median_model_ms=round(1e3 * statistics.median(s["model_s"] for s in sel), 2),
                    median_batch=statistics.median(s["batch"] for s in sel))

    pre = [s for s in steps if s["prefill_tokens"] > 0]
    last = [s for s in pre if s["last_chunks"]]
    dec = [s for s in steps if s["prefill_tokens"] == 0]
    full_dec = [s for s in dec if s["batch"] == max(x["batch"] for x in dec)] if dec else []
    total = a.num_prompts * (a.prompt_len + a.output_len)
    res = dict(device=torch.cuda.get_device_name() if cuda else "cpu", num_prompts=a.num_prompts, prompt_len=a.prompt_len, output_len=a.output_len,
               chunk=a.chunk, layer_batch_mib=eng.config.eviction.layer_batch_mib, kv_policy=a.kv_policy, kv_budget=a.kv_budget, kv_recall=a.kv_recall, host_kv_tokens=a.host_kv_tokens if a.kv_recall else None, recall_stage_tokens=a.recall_stage_tokens if a.kv_recall else None, fused_ops=eng.runner.fused_ops, cuda_graphs=a.cuda_graphs,
               async_scheduling=eng.async_scheduling,
               elapsed_s=round(elapsed, 2), total_tok_s=round(total / elapsed), prefill=summary(pre), prefill_completing_prompts=summary(last),
               prefill_other=summary([s for s in pre if not s["last_chunks"]]), decode=summary(dec),
               decode_at_peak_batch=summary(full_dec), peak_running_batch=eng.stats().peak_running_batch_size,
               # where a sum and its median disagree, these are why
               slowest_steps=[dict(step=i, step_ms=round(1e3 * s["step_s"], 1), model_ms=round(1e3 * s["model_s"], 1), batch=s["batch"],
                                   prefill_tokens=s["prefill_tokens"])
                              for i, s in sorted(enumerate(steps), key=lambda x: -x[1].get("step_s", 0))[:5]],
               alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0)
    if a.log_compiles:
        res["triton_compiles"] = compiles
    if idle:
        res["device_idle"] = idle
    for kind, tabs in tables.items():
        note = ""
        if kind.startswith("step "):
            st = steps[int(kind.split()[1])]
            note = f" ({st['prefill_tokens']} prefill tokens, {st['decodes']} decodes, {st['last_chunks']} prompts completed)"
        print(f"\n===== {kind} kernels{note} =====\n{tabs[-1]}")
        if kind in idle:
            print(f"----- {kind}: the GPU's idle time -----\n{format_idle(idle[kind])}")
    if a.cprofile_at:
        print(f"\n===== host side of steps {a.cprofile_at} (cProfile, by own time, then cumulative) =====")
        pstats.Stats(at_prof).sort_stats("tottime").print_stats(40)
        pstats.Stats(at_prof).sort_stats("cumulative").print_stats(60)
    if host_steps:
        print(f"\n===== host side of {host_steps} decode steps at batch {a.num_prompts} (cProfile, by own time) =====")
        pstats.Stats(host_prof).sort_stats("tottime").print_stats(30)
        pstats.Stats(host_prof).sort_stats("cumulative").print_stats(30)
    print(json.dumps(res))
    append_jsonl(a.json, res)
    return res


def chrome_events(prof, path: str | None = None) -> list[dict]:
    """The profiler's chrome-trace events (and the trace gzipped to ``path`` when given)."""
    import gzip
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        prof.export_chrome_trace(tmp.name)
        with open(tmp.name, "rb") as f:
            raw = f.read()
    if path:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    return json.loads(raw)["traceEvents"]


def idle_report(events: list[dict], top: int = 10) -> dict:
    """The GPU's idle time in a trace: the gaps between consecutive device activities
    (kernels, copies, memsets, on any stream), the largest with their neighbours and the
    host's CUDA calls that overlap them (a ``cudaStreamSynchronize`` or a pageable copy
    there is a sync the step should not have; launches alone mean the host issues kernels
    slower than the GPU runs them) and the operators it began meanwhile (what it was busy
    with), and the host's time in CUDA calls over the whole trace.
    Times in microseconds as the trace has them; the result in ms."""
    dev = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    if not dev:
        return {}
    gaps, end, prev = [], dev[0]["ts"] + dev[0]["dur"], dev[0]
    for e in dev[1:]:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, end, prev["name"][:50], e["name"][:50]))
        if e["ts"] + e["dur"] >= end:
            end, prev = e["ts"] + e["dur"], e
    span = end - dev[0]["ts"]
    idle = sum(g[0] for g in gaps)
    calls = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]
    host: dict[str, float] = {}
    for e in calls:
        host[e["name"]] = host.get(e["name"], 0.0) + e["dur"]
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    largest = []
    for us, at, before, after in sorted(gaps, reverse=True)[:top]:
        inside: dict[str, float] = {}
        for e in calls:  # the host's CUDA calls during the gap, by the time each spent in it
            o = min(e["ts"] + e["dur"], at + us) - max(e["ts"], at)
            if o > 0:
                inside[e["name"]] = inside.get(e["name"], 0.0) + o
        begun: dict[str, int] = {}
        for e in ops:  # the operators the host began while the GPU waited
            if at <= e["ts"] < at + us:
                begun[e["name"]] = begun.get(e["name"], 0) + 1
        largest.append(dict(idle_us=round(us, 1), after=before, before=after,
                            host={k: round(v, 1) for k, v in sorted(inside.items(), key=lambda x: -x[1])[:3]},
                            ops={k: n for k, n in sorted(begun.items(), key=lambda x: -x[1])[:4]}))
    return dict(span_ms=round(span / 1e3, 3), busy_ms=round((span - idle) / 1e3, 3), idle_ms=round(idle / 1e3, 3),
                gaps=len(gaps), gaps_over_20us=sum(g[0] >= 20 for g in gaps), activities=len(dev), largest_gaps=largest,
                host_cuda_calls_ms={k: round(v / 1e3, 3) for k, v in sorted(host.items(), key=lambda x: -x[1])[:8]})


def format_idle(r: dict) -> str:
    if not r:
        return "trace: no device activity"
    lines = [f"device span {r['span_ms']:.2f} ms, busy {r['busy_ms']:.2f} ms, idle {r['idle_ms']:.2f} ms in {r['gaps']} gaps"
             f" ({r['gaps_over_20us']} of >= 20 us); {r['activities']} device activities"]
    for g in r["largest_gaps"]:
        inside = ", ".join(f"{k} {v:.0f} us" for k, v in g["host"].items()) or "no CUDA call"
        begun = ", ".join(f"{k} x{n}" for k, n in g["ops"].items()) or "none"
        lines.append(f"  idle {g['idle_us']:8.1f} us  after {g['after']:50s} before {g['before']:50s} host: {inside}; ops begun: {begun}")
    lines.append("  host time in CUDA calls: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["host_cuda_calls_ms"].items()))
    return "\n".join(lines)


def trace_report(prof, path: str, num_steps: int) -> None:
    """Export the trace of ``num_steps`` decode steps to ``path`` and print the GPU's idle time in it."""
    print(f"\n===== trace of {num_steps} decode steps ({path}) =====")
    print(format_idle(idle_report(chrome_events(prof, path), top=15)))


if __name__ == "__main__":
    main()

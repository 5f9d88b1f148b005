"""The benchmark tools' own arithmetic and a CPU run of each (their figures come from the GPU)."""
from __future__ import annotations

import json

from bench.decode_step import decode_step_s
from bench.decode_step import main as decode_step_main


def test_decode_step_is_the_difference_of_medians():
    times = {16: [1.0, 1.2, 5.0], 144: [2.28, 2.5, 2.4]}  # medians 1.2 and 2.4: 128 extra steps
    assert abs(decode_step_s(times, 16, 144) - 1.2 / 128) < 1e-12


def test_decode_step_runs_batchmax_on_a_tiny_model(tiny_llama, tmp_path):
    out = tmp_path / "ds.jsonl"
    rows = decode_step_main(["--model", str(tiny_llama), "--batch", "4", "--prompt-len", "16", "--lens", "2", "6",
                             "--repeats", "1", "--json", str(out)])
    assert [r["system"] for r in rows] == ["batchmax"]
    (line,) = out.read_text().splitlines()
    rec = json.loads(line)
    assert rec["mean_context"] == 20 and len(rec["times"]["2"]) == len(rec["times"]["6"]) == 1
    assert rec["decode_step_ms"] == rows[0]["decode_step_ms"]


def test_decode_step_starts_vllm_before_batchmax_holds_the_device(tiny_llama, monkeypatch):
    """vLLM sizes its pool from the memory free when it starts; after batchmax's run this process
    still caches that run's memory, so vLLM must go first (on the H200 it refused to start)."""
    import bench.decode_step as ds

    order = []

    def fake(system):
        def run(prompts, l1, l2, a, model):
            order.append(system)
            return dict(system=system, times={l1: [1.0], l2: [2.0]})
        return run

    monkeypatch.setattr(ds, "run_vllm", fake("vllm"))
    monkeypatch.setattr(ds, "run_batchmax", fake("batchmax"))
    rows = ds.main(["--model", str(tiny_llama), "--batch", "2", "--prompt-len", "4", "--lens", "2", "6", "--peers", "vllm"])
    assert order == ["vllm", "batchmax"]
    assert [r["system"] for r in rows] == ["batchmax", "vllm"]  # the table keeps batchmax first


def _run(system, config, workload, tok_s, kv_gib=None, pool=None):
    return dict(system=system, config=config, workload=workload, total_tok_s=tok_s, output_tok_s=tok_s / 10,
                kv_gib=kv_gib, kv_pool_tokens=pool)


def test_kv_table_lines_up_both_systems_per_kv_size():
    from bench.throughput import kv_table

    rows = [
        _run("vllm", "defaults", "W2", 1000, kv_gib=6), _run("batchmax", "snapkv@512", "W2", 4000, kv_gib=6),
        _run("vllm", "defaults", "W2", 2000, kv_gib=28), _run("batchmax", "snapkv@512", "W2", 5000, kv_gib=28),
        # uncapped: each sized its own pool; both land in the whole-GPU column
        _run("vllm", "defaults", "W2", 6000, pool=891_712), _run("batchmax", "snapkv@512", "W2", 11000, pool=880_000),
        _run("batchmax-cold-start", "snapkv@512", "W2", 1, kv_gib=6), _run("vllm", "defaults", "W1", 9, kv_gib=6),
    ]
    assert kv_table(rows, "W2").splitlines() == [
        "| W2, output tok/s, KV memory | 6 GiB | 28 GiB | whole GPU |",
        "|---|---|---|---|",
        "| vllm defaults | 100 | 200 | 600 |",
        "| batchmax snapkv@512 | 400 (4.00x) | 500 (2.50x) | 1,100 (1.83x) |",
    ]


def test_kv_plot_draws_a_png(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    from bench.throughput import plot_kv

    rows = [_run("vllm", "defaults", "W1", 100, kv_gib=6), _run("batchmax", "snapkv@512", "W1", 300, kv_gib=6),
            _run("vllm", "defaults", "W1", 200, kv_gib=28), _run("batchmax", "snapkv@512", "W1", 350, pool=800_000)]
    src = tmp_path / "runs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_kv(str(src), str(tmp_path / "kv.png"))
    assert (tmp_path / "kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one panel per workload that has runs (W1 here); a file without any is an error, not a blank plot
    from PIL import Image

    assert Image.open(tmp_path / "kv.png").size[0] == int(5.5 * 130)
    src.write_text(json.dumps(_run("vllm", "defaults", "W1", 100)) + "\n")
    with pytest.raises(SystemExit, match="no --kv-gib run"):
        plot_kv(str(src), str(tmp_path / "none.png"))


def test_offline_step_figures_count_every_scheduled_token(tiny_llama):
    """``run_offline``'s engine step figures come from the engine's counters: each prompt
    token once and each output token but the first (sampled by the last prefill chunk)."""
    from bench.serve_load import run_offline
    from bench.workload import LenDist, make_workload

    work = make_workload(4, LenDist(20, 40), LenDist(3, 6), 0, "ids", 1000)
    summary, steps = run_offline(work, str(tiny_llama), dict(device="cpu", num_tokens=4096), 0.0, True)
    assert steps.tokens == sum(len(r.prompt) + r.max_tokens - 1 for r in work)
    assert steps.steps > 0 and 0 < steps.step_s <= steps.wall_s


def test_front_end_figures_from_a_run_and_the_process_cpu_time():
    import os
    import time

    from bench.front_end import FrontEnd, process_cpu_s
    from bench.load_client import LoadRun, RequestResult

    cpu0, t0 = process_cpu_s(os.getpid()), time.process_time()
    while time.process_time() - t0 < 0.3:  # burn CPU in this process
        pass
    assert process_cpu_s(os.getpid()) - cpu0 >= 0.25  # clock ticks of 10 ms: a little below 0.3 at worst

    def res(chunks, tokens):
        r = RequestResult(index=0)
        r.num_chunks, r.completion_tokens = chunks, tokens
        return r

    run = LoadRun(results=[res(10, 10), res(5, 15)], duration=2.0, model="m")
    fe = FrontEnd.of(run, cpu_s=0.5)
    assert (fe.chunks, fe.tokens) == (15, 25)
    assert fe.core_share == 0.25 and abs(fe.us_per_chunk - 1e6 * 0.5 / 15) < 1e-6 and abs(fe.tokens_per_chunk - 25 / 15) < 1e-12
    assert fe.line() == "25% of one core (0.5 s CPU in 2.0 s), 33,333 us CPU per streamed chunk, 1.67 tokens per chunk"
    assert fe.as_dict()["tokens_per_chunk"] == fe.tokens_per_chunk


def test_serve_compare_refuses_py_spy_it_cannot_run_before_any_run(monkeypatch, capsys):
    """On the H200 a missing py-spy surfaced only when the server's run began, after the
    offline run, and lost the offline run's figures with it."""
    import pytest

    import bench.serve_compare as sc

    monkeypatch.setattr(sc.shutil, "which", lambda name: None)
    monkeypatch.setattr(sc, "run_offline", lambda *a, **k: pytest.fail("ran before checking --py-spy"))
    with pytest.raises(SystemExit) as exc:
        sc.main(["--model", "m", "--systems", "offline", "batchmax", "--py-spy", "core.json"])
    assert exc.value.code == 2 and "no py-spy on PATH" in capsys.readouterr().err


def test_profile_steps_splits_the_steps_of_a_recall_run(tiny_llama, tmp_path):
    from bench.profile_steps import main as profile_main

    out = tmp_path / "p.jsonl"
    res = profile_main(["--model", str(tiny_llama), "--device", "cpu", "--num-prompts", "4", "--prompt-len", "128",
                        "--output-len", "3", "--chunk", "32", "--max-num-batched-tokens", "64", "--kv-policy", "snapkv",
                        "--kv-budget", "24", "--kv-recall", "--host-kv-tokens", "4096", "--recall-stage-tokens", "100",
                        "--json", str(out)])
    assert res["recall_stage_tokens"] == 100 and res["kv_recall"] is True
    # 4 prompts of 4 chunks, 64 tokens a step: the first two complete together at step 3; then
    # their decodes take 2 of the 64 tokens, so the other two read 31-token chunks and complete
    # in two more steps: 9 prefill steps, 3 of them completing prompts
    pre, done, other = res["prefill"], res["prefill_completing_prompts"], res["prefill_other"]
    assert (pre["steps"], done["steps"], other["steps"]) == (9, 3, 6)
    assert json.loads(out.read_text().splitlines()[-1])["prefill"]["steps"] == 9


def test_moved_bytes_charges_gathers_and_scatters_what_they_move():
    import torch

    from bench.step_ops import moved_bytes

    pool, idx = torch.zeros(100, 4), torch.arange(10)
    rows = pool.index_select(0, idx)  # (10, 4) float32: 160 bytes out, as many read
    assert moved_bytes("index_select", (pool, 0, idx), rows) == 2 * 160
    src = torch.ones(5, 4)
    assert moved_bytes("index_copy_", (pool, 0, idx[:5], src), pool) == 2 * 80  # not the pool's 1,600
    assert moved_bytes("copy_", (rows, rows), rows) == 2 * 160
    assert moved_bytes("add", (rows, rows), rows) == 3 * 160


def test_step_ops_bytes_at_real_widths():
    from bench.step_ops import main as step_ops_main

    r = step_ops_main(["--shape", "m1b", "--bytes", "--layers", "1", "--num-requests", "2", "--prompt-len", "128",
                       "--chunk", "64", "--kv-budget", "32", "--top", "0"])
    assert r["layers"] == 1 and r["real_widths"] and "step_ms" not in r
    # the kept keys and values written back: 2 rows x 32 kept x 8 KV heads x 64 x bf16, K and V, read and written
    assert r["bytes_by_function"]["engine/evictor.py:_keep_front"] >= 2 * 2 * (2 * 32 * 8 * 64 * 2)
    assert r["eviction_bytes_per_layer"] == sum(
        b for fn, b in r["bytes_by_function"].items() if fn.startswith(("engine/evictor.py", "engine/eviction.py", "policies/")))


def test_idle_report_finds_the_gpus_gaps_and_the_host_calls_inside_them():
    from bench.profile_steps import format_idle, idle_report

    def x(cat, name, ts, dur):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur)

    events = [
        x("kernel", "gemm", 0, 100), x("gpu_memcpy", "Memcpy HtoD", 50, 80),  # overlapping streams: busy 0-130
        x("kernel", "sort", 130, 10),  # touching: no gap
        x("kernel", "gather", 200, 20),  # 60 us idle after sort
        x("kernel", "attn", 230, 50),  # 10 us idle after gather
        x("cuda_runtime", "cudaStreamSynchronize", 135, 70),  # 60 of its 70 us inside the first gap
        x("cuda_runtime", "cudaLaunchKernel", 222, 5),  # 5 us inside the second
        x("cpu_op", "aten::sort", 120, 30),  # not a CUDA call, and begun before the gap
        x("cpu_op", "aten::item", 150, 50),  # begun in the first gap: what the host was doing
    ]
    r = idle_report(events, top=5)
    assert (r["span_ms"], r["busy_ms"], r["idle_ms"], r["gaps"], r["gaps_over_20us"]) == (0.28, 0.21, 0.07, 2, 1)
    assert r["largest_gaps"] == [
        dict(idle_us=60, after="sort", before="gather", host={"cudaStreamSynchronize": 60}, ops={"aten::item": 1}),
        dict(idle_us=10, after="gather", before="attn", host={"cudaLaunchKernel": 5}, ops={}),
    ]
    assert r["host_cuda_calls_ms"] == {"cudaStreamSynchronize": 0.07, "cudaLaunchKernel": 0.005}
    assert "idle     60.0 us  after sort" in format_idle(r) and idle_report([x("cpu_op", "a", 0, 1)]) == {}


def _step_ops(n: int, recall: bool) -> dict[str, int]:
    from bench.step_ops import main as step_ops_main

    args = ["--num-requests", str(n), "--prompt-len", "256", "--chunk", "64", "--kv-budget", "32", "--top", "0"]
    return step_ops_main(args + (["--kv-recall"] if recall else []))["by_function"]


def test_eviction_issues_the_same_operators_per_layer_whatever_the_batch():
    # On a GPU every operator is a launch: the evictor batches its members, so one prefill step
    # of the 1B layout (16 layers) issues as many eviction operators for 5 members as for 2.
    # Only per-step work grows with them (a window's positions, its copy at the step's end).
    two, five = _step_ops(2, False), _step_ops(5, False)
    per_step = {"engine/evictor.py:finish", "engine/evictor.py:push_positions", "engine/evictor.py:replace"}
    evicting = {fn for fn in two | five if fn.startswith(("engine/evictor.py", "engine/eviction.py", "policies/"))}
    assert evicting - per_step and all(two.get(fn) == five.get(fn) for fn in evicting - per_step)
    for fn in ("push_positions", "replace"):  # one a member and step: the window's positions, its queries at the end
        assert five[f"engine/evictor.py:{fn}"] - two[f"engine/evictor.py:{fn}"] == 3
    # select_keep's plan is made once a step, its sorts once a layer; the windows are one
    # gather a layer
    assert two["engine/eviction.py:keep_plan"] < 16 and two["engine/evictor.py:_push_windows"] == 16
    # recall parks one copy per member and layer (k, v, pos and state in one record): 16 more a member
    r2, r5 = _step_ops(2, True), _step_ops(5, True)
    assert r5["engine/host_store.py:copies"] - r2["engine/host_store.py:copies"] == 3 * 16

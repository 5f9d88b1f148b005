"""One serving workload against several systems in one run, on the same model, KV size and
client (``bench/load_client.py``): ``batchmax`` (``batchmax serve``), ``vllm`` (vLLM's OpenAI
server, ``python -m vllm.entrypoints.openai.api_server``, prefix caching off) and ``offline``
(batchmax's engine in this process, every request added at once). Each server is started,
waited for (``/health``), loaded, and stopped before the next, so each has the GPU alone.

    python -m bench.serve_compare --make-model /tmp/m1b --tokenizer DIR        # random bf16 weights
    python -m bench.serve_compare --model /tmp/m1b --kv-tokens 400000 --systems batchmax vllm offline \\
        --num-requests 1024 --concurrency 256 --prompt-len 256:1024 --output-len 128:256 --json out.jsonl

vLLM is given the same KV pool as batchmax (``--num-gpu-blocks-override`` = kv_tokens / 16) and
its defaults otherwise (8,192 batched tokens, async scheduling, CUDA graphs, torch.compile).
``--batchmax-args`` adds options to ``batchmax serve`` (``--kv-policy snapkv --kv-budget 512
--kv-recall``), and the offline run takes the same engine options.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from bench.engine_steps import from_metrics, scrape
from bench.front_end import FrontEnd, process_cpu_s
from bench.latency_report import table
from bench.load_client import LoadConfig, run_load
from bench.serve_load import http_summary, run_offline
from bench.workload import LenDist, make_workload

# A ~1.2B Llama shape (Llama-3.2-1B's layout with SmolLM2's 49,152-token vocabulary).
LLAMA_1B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=2048,
    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
)


def make_model(path: str, tokenizer: str) -> None:
    """Random bf16 weights saved with ``save_pretrained``, and ``tokenizer``'s files beside them."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in LLAMA_1B.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {path}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def start_server(cmd: list[str], url: str, log: str, timeout: float) -> subprocess.Popen:
    print("$ " + shlex.join(cmd), flush=True)
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    out = open(log, "wb")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    while not _healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        if time.monotonic() - t0 > timeout:
            stop_server(proc)
            raise RuntimeError(f"not healthy after {timeout:.0f} s; see {log}")
        time.sleep(1)
    print(f"  ready in {time.monotonic() - t0:.0f} s", flush=True)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def core_pid(server_pid: int) -> int:
    """The engine-core process that ``batchmax serve`` (pid ``server_pid``) started."""
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with open(f"/proc/{server_pid}/task/{task}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        if b"batchmax.engine.core_proc" in c.read():
                            return int(pid)
                except OSError:  # a child that has just exited
                    continue
    raise RuntimeError(f"no engine-core process under pid {server_pid}")


def start_py_spy(server_pid: int, out: str) -> subprocess.Popen:
    """py-spy on the engine core, sampling without pausing it, until ``stop_py_spy``."""
    cmd = ["py-spy", "record", "--pid", str(core_pid(server_pid)), "--rate", "100", "--nonblocking",
           "--format", "speedscope", "--output", out]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(spy: subprocess.Popen) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-model", default=None, metavar="DIR", help="write the random ~1.2B model to DIR and exit")
    p.add_argument("--tokenizer", default=None, help="with --make-model: a folder with the tokenizer to save beside it")
    p.add_argument("--model", default=None)
    p.add_argument("--systems", nargs="+", default=["batchmax", "vllm", "offline"], choices=["batchmax", "vllm", "offline"])
    p.add_argument("--kv-tokens", type=int, default=400000)
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--prompt-len", type=LenDist.parse, default=LenDist(256, 1024))
    p.add_argument("--output-len", type=LenDist.parse, default=LenDist(128, 256))
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--batchmax-args", default="", help="more `batchmax serve` options")
    p.add_argument("--vllm-args", default="", help="more vLLM server options")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--warmup-requests", type=int, default=64,
                   help="an untimed run of this many requests first, for every system (kernels compile on first use)")
    p.add_argument("--py-spy", default=None, metavar="FILE",
                   help="record the batchmax server's engine-core process with py-spy during the timed run (speedscope JSON)")
    p.add_argument("--log-dir", default=".")
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.py_spy and "batchmax" in a.systems and shutil.which("py-spy") is None:
        p.error("--py-spy: no py-spy on PATH")  # before any run, not after the offline one
    if a.make_model:
        make_model(a.make_model, a.tokenizer)
        return 0
    workload = make_workload(a.num_requests, a.prompt_len, a.output_len, 0, "ids", a.vocab_size)
    warmup = make_workload(a.warmup_requests, a.prompt_len, a.output_len, 1, "ids", a.vocab_size)
    url = f"http://127.0.0.1:{a.port}"
    name = os.path.basename(os.path.normpath(a.model))
    summaries, records = [], []
    for system in a.systems:
        t0 = time.monotonic()
        front = None
        if system == "offline":
            engine_args = dict(num_tokens=a.kv_tokens)
            engine_args.update(_engine_args(a.batchmax_args))
            s, steps = run_offline(workload, a.model, engine_args, 0.0, True, warmup=warmup)
            s.label = "batchmax offline engine"
        else:
            if system == "batchmax":
                cmd = [sys.executable, "-m", "batchmax.server.cli", "serve", "--model", a.model, "--port", str(a.port),
                       "--kv-tokens", str(a.kv_tokens), "--log-level", "warning", *shlex.split(a.batchmax_args)]
            else:
                cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", a.model, "--port", str(a.port),
                       "--served-model-name", name, "--num-gpu-blocks-override", str(a.kv_tokens // 16),
                       "--no-enable-prefix-caching", "--max-model-len", str(LLAMA_1B["max_position_embeddings"]),
                       *shlex.split(a.vllm_args)]
            proc = start_server(cmd, url, os.path.join(a.log_dir, f"{system}-server.log"), a.start_timeout)
            try:
                cfg = LoadConfig(url=url, model=name, concurrency=a.concurrency, temperature=0.0, ignore_eos=True, progress=False)
                if warmup:
                    asyncio.run(run_load(cfg, warmup))
                before = scrape(url) if system == "batchmax" else None
                spy = start_py_spy(proc.pid, a.py_spy) if system == "batchmax" and a.py_spy else None
                cpu0 = process_cpu_s(proc.pid)  # the API server process: both run the engine in a child
                try:
                    run = asyncio.run(run_load(cfg, workload))
                finally:
                    if spy is not None:
                        stop_py_spy(spy)
                front = FrontEnd.of(run, process_cpu_s(proc.pid) - cpu0)
                steps = from_metrics(before, scrape(url), run.duration) if system == "batchmax" else None
            finally:
                stop_server(proc)
            s = http_summary(run, f"{system} server ({a.concurrency} clients)")
        print(f"  {system}: {s.as_dict().get('total_tok_per_s', 0):,.0f} total tok/s ({time.monotonic() - t0:.0f} s with start-up)", flush=True)
        if steps is not None:  # the same workload's steps, server against offline engine (bench/engine_steps.py)
            print(f"  {system} engine: {steps.line()}", flush=True)
        if front is not None:
            print(f"  {system} front end: {front.line()}", flush=True)
        summaries.append(s)
        records.append({"system": system, **s.as_dict(), **({"engine_steps": steps.as_dict()} if steps else {}),
                        **({"front_end": front.as_dict()} if front else {})})
    print(f"\n{a.num_requests} requests, prompt {a.prompt_len}, output {a.output_len}, {a.concurrency} clients, "
          f"KV {a.kv_tokens} tokens, model {name} {a.label}")
    print(table(summaries))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"label": a.label, "args": {k: str(v) for k, v in vars(a).items()}, "results": records}) + "\n")
    return 0


def _engine_args(cli: str) -> dict:
    """`batchmax serve` options as engine keywords (for the offline run)."""
    from batchmax.server.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["serve", *shlex.split(cli)])
    kw = engine_kwargs(args)
    return {k: v for k, v in kw.items() if k in {"kv_policy", "kv_budget", "kv_recall", "chunk_size", "max_num_seqs",
                                                  "max_num_batched_tokens", "evict_decode_every", "host_kv_tokens"} and v is not None}


if __name__ == "__main__":
    sys.exit(main())

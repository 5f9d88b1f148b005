"""The ``batchmax`` command: ``generate`` (offline), ``serve`` (HTTP), ``plan`` (capacity).
The load generator is a bench script, not part of the product: ``python -m bench.serve_load``."""
from __future__ import annotations

import argparse
import json
import sys


def list_arg(value: str) -> list[str]:
    """A list option given as JSON (``'["a", "b"]'``) or comma-separated (``a,b``)."""
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return items
    return [x.strip() for x in value.split(",") if x.strip()]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine options shared by every subcommand that builds an engine."""
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--chunk", dest="chunk_size", type=int, default=512, help="prefill chunk (tokens of one request per step)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step, decode tokens plus prefill chunks (default: 8192 on CUDA, 2048 on the CPU)")
    p.add_argument("--kv-tokens", dest="num_tokens", type=int, default=None, help="KV pool capacity in tokens per layer")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-policy", default="full", help="default eviction policy")
    p.add_argument("--kv-budget", type=int, default=None, help="default tokens kept per layer and KV head")
    p.add_argument("--kv-policy-args", type=json.loads, default={}, help='JSON fields of the default policy, e.g. \'{"obs_window": 8}\'')
    p.add_argument("--evict-decode-every", type=int, default=0, help="also evict every k decode steps (0: prefill only)")
    p.add_argument("--layer-batch-mib", type=float, default=512,
                   help="evict consecutive layers as one batch up to this many MiB of gathered K/V (0: each layer alone)")
    p.add_argument("--kv-recall", action=argparse.BooleanOptionalAction, default=False, help="park evicted prefill K/V in host memory and re-select at the last chunk")
    p.add_argument("--host-kv-tokens", type=int, default=None, help="recall's host store capacity in tokens per layer")
    p.add_argument("--recall-stage-tokens", type=int, default=32768,
                   help="recall: most parked tokens per layer brought back to the device at once (requests re-selected together)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"], help="auto: fused Triton kernels on CUDA")
    p.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="Triton kernels for RMSNorm+residual, RoPE, SiLU x up (default: with the Triton attention backend)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="replay decode steps from CUDA graphs (CUDA + fused kernels)")
    p.add_argument("--cuda-graph-max-batch", type=int, default=256, help="largest decode batch captured in a graph")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch the next step before reading this one's tokens back, overlapping host work with the GPU "
                        "(default: on with CUDA)")
    p.add_argument("--decode-reserve-tokens", type=int, default=None,
                   help="decode tokens reserved per request at admission (default: all max_tokens, never preempts); "
                        "fewer admits more and preempts (recompute) when the pool runs out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over N devices, one process each (rank 0 is the engine core; see docs/ARCHITECTURE.md)")
    p.add_argument("--tp-timeout", dest="tp_timeout_s", type=float, default=120.0,
                   help="tensor parallel: seconds a collective may take before the engine fails (a dead or hung rank)")
    p.add_argument("--grammar-cache-size", type=int, default=64, help="compiled grammars kept for structured outputs (LRU)")
    p.add_argument("--json-any-whitespace", action=argparse.BooleanOptionalAction, default=False,
                   help="structured JSON outputs may put any whitespace between tokens (vLLM's default); off: compact JSON")
    p.add_argument("--debug-fail-step-token", type=int, default=None, metavar="ID",
                   help="TESTING ONLY: every engine step that schedules a request whose prompt holds token ID fails "
                        "(fault injection, see engine/faults.py)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_tokens=args.num_tokens,
        max_model_len=args.max_model_len,
        kv_policy=args.kv_policy,
        kv_budget=args.kv_budget,
        kv_policy_args=args.kv_policy_args,
        evict_decode_every=args.evict_decode_every,
        layer_batch_mib=args.layer_batch_mib,
        kv_recall=args.kv_recall,
        host_kv_tokens=args.host_kv_tokens,
        recall_stage_tokens=args.recall_stage_tokens,
        attention_backend=args.attention_backend,
        fused_ops=args.fused_ops,
        cuda_graphs=args.cuda_graphs,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        async_scheduling=args.async_scheduling,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        tp_timeout_s=args.tp_timeout_s,
        decode_reserve_tokens=args.decode_reserve_tokens,
        grammar_cache_size=args.grammar_cache_size,
        json_any_whitespace=args.json_any_whitespace,
        debug_fail_step_token=args.debug_fail_step_token,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from batchmax.engine import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    prompts = args.prompt
    if args.chat:
        prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.sample_seed)
    for out in llm.generate(prompts, params):
        print(out.text)
        print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible API. The port opens at once (``/health`` says 503 until the
    model is loaded). SIGTERM/SIGINT drain: no new calls (503), in-flight calls get up to
    ``--shutdown-timeout`` seconds to finish, then the process exits 0. A second signal
    stops at once."""
    import logging
    import os

    from batchmax.engine.config import EngineConfig
    from batchmax.server.settings import ServerSettings

    try:  # bad options fail here, before the port opens
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("BATCHMAX_API_KEY") or None,
            served_model_name=args.served_model_name,
            max_queued=args.max_queued,
            shutdown_timeout=args.shutdown_timeout,
            max_body_bytes=args.max_body_bytes,
            max_sequences_per_call=args.max_sequences_per_call,
            max_stop_sequences=args.max_stop_sequences,
            max_stop_length=args.max_stop_length,
            unhealthy_after_step_failures=args.unhealthy_after_step_failures,
            generation_config=args.generation_config,
            timeout_header=args.timeout_header,
            timeout_body=args.timeout_body,
            timeout_body_chunk=args.timeout_body_chunk,
            timeout_keep_alive=args.timeout_keep_alive,
            limit_concurrency=args.limit_concurrency,
            log_level=args.log_level,
            strict_request_fields=args.strict_request_fields,
            allowed_origins=args.allowed_origins,
            allowed_methods=args.allowed_methods,
            allowed_headers=args.allowed_headers,
            access_log=not args.disable_access_log,
            log_stats_interval=args.log_stats_interval,
            tool_call_parser=args.tool_call_parser,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
            reasoning_parser=args.reasoning_parser,
        )
        config = EngineConfig.from_kwargs(**engine_kwargs(args))
    except (ValueError, TypeError) as exc:
        print(f"batchmax serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def load():
        # the engine core in a process of its own, which owns the device (engine/core_client.py)
        from batchmax.engine.core_client import EngineCoreClient

        return EngineCoreClient(config, log_level=args.log_level)

    from batchmax.server.app import build_app

    app = build_app(load, settings)
    if args.debug_profile:
        from batchmax.server.sampling_profiler import SamplingProfiler

        prof = SamplingProfiler(args.debug_profile)
        prof.start()
        try:
            return _run_uvicorn(app, settings)
        finally:
            prof.stop()
    return _run_uvicorn(app, settings)


def _run_uvicorn(app, settings) -> int:
    import asyncio

    import uvicorn

    from batchmax.server.app import drain
    from batchmax.server.transport import ensure_open_files, uvicorn_config

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that the first SIGTERM/SIGINT drains the app before exiting."""

        draining = False
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            # Deliberately not recorded in uvicorn's captured signals: uvicorn re-raises
            # those after shutdown, and the default handler would then kill the process
            # (status -15) instead of the clean exit 0 a drain promises.
            if self.draining:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return
            if not self.started or self.loop is None:  # nothing to drain yet
                self.should_exit = True
                return
            self.draining = True
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self):
            try:
                await drain(app, settings.shutdown_timeout)
            finally:
                self.should_exit = True

    ensure_open_files(settings.limit_concurrency)
    # the app writes its own access log (server/middleware.py), with durations and tokens
    config = uvicorn_config(app, settings, timeout_graceful_shutdown=5, access_log=False)
    server = DrainingServer(config)
    ctx = app.state.bm
    ctx.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if ctx.load_error is not None:
        print(f"batchmax: could not load the model: {ctx.load_error}", file=sys.stderr)
        return 1
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig

    from batchmax.engine.default_model import resolve_model
    from batchmax.engine.model_runner import resolve_dtype
    from batchmax.engine.models.llama import ModelSpec
    from batchmax.engine.planner import make_plan

    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(resolve_model(args.model)))
    dtype = resolve_dtype(args.dtype, torch.device("cuda"))
    plan = make_plan(
        spec, args.gpu_mem_gb, args.prompt_len, args.max_tokens, args.budget, args.chunk, dtype,
        reserve_gb=args.reserve_gb, evict_decode_every=args.evict_decode_every, tensor_parallel_size=args.tensor_parallel_size,
    )
    if args.tensor_parallel_size > 1:
        print(f"tensor parallel over {args.tensor_parallel_size} GPUs: per GPU below (its KV heads, 1/{args.tensor_parallel_size} of the weights)")
    print(f"{args.prompt_len}-token prompts -> {args.max_tokens} tokens, chunk {args.chunk}, {args.gpu_mem_gb:g} GB GPU, {dtype}")
    print(plan.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchmax", description="OpenAI-compatible LLM server with bounded KV caches")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate offline from prompts given on the command line")
    add_engine_args(g)
    g.add_argument("prompt", nargs="+", help="one or more prompts")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="wrap each prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    pl = sub.add_parser("plan", help="KV footprint per request and the largest batch, full cache vs budgets")
    pl.add_argument("--model", default=None, help="local Hugging Face model directory (only config.json is read)")
    pl.add_argument("--gpu-mem-gb", type=float, default=80.0)
    pl.add_argument("--prompt-len", type=int, default=4096)
    pl.add_argument("--max-tokens", type=int, default=256)
    pl.add_argument("--budget", type=int, nargs="+", default=[512, 1024], help="one or more kv budgets")
    pl.add_argument("--chunk", type=int, default=512)
    pl.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    pl.add_argument("--reserve-gb", type=float, default=2.0, help="GPU memory kept for activations")
    pl.add_argument("--evict-decode-every", type=int, default=0)
    pl.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is sharded over")
    pl.set_defaults(func=cmd_plan)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY); also $BATCHMAX_API_KEY")
    s.add_argument("--served-model-name", default=None, help="model id clients use (default: the model's name)")
    s.add_argument("--max-queued", type=int, default=1024, help="most requests waiting for admission; beyond, 503 with Retry-After")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    s.add_argument("--max-body-bytes", type=int, default=32 << 20, help="largest request body accepted (413 beyond)")
    s.add_argument("--max-sequences-per-call", type=int, default=256,
                   help="most engine requests (prompts x n) one call may make; beyond, 400")
    s.add_argument("--max-stop-sequences", type=int, default=16, help="most stop strings per request; beyond, 400")
    s.add_argument("--max-stop-length", type=int, default=256, help="longest stop string in characters; beyond, 400")
    s.add_argument("--unhealthy-after-step-failures", type=int, default=3,
                   help="/health answers 503 after this many engine steps in a row failed (a success resets it)")
    s.add_argument("--generation-config", default="auto", choices=["auto", "none"],
                   help="auto: the model folder's generation_config.json sets the defaults of temperature, top_p, top_k, "
                        "min_p and repetition_penalty (a request's own values override them); none: OpenAI's defaults")
    s.add_argument("--timeout-header", type=float, default=10.0, metavar="S",
                   help="seconds a connection has to send a request's headers (then it is closed, 408 if part came)")
    s.add_argument("--timeout-body", type=float, default=60.0, metavar="S",
                   help="seconds a request has to send its whole body (408 beyond)")
    s.add_argument("--timeout-body-chunk", type=float, default=10.0, metavar="S",
                   help="seconds a request body may stall between two pieces (408 beyond)")
    s.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="S",
                   help="seconds an idle kept-alive connection stays open after a response")
    s.add_argument("--limit-concurrency", type=int, default=1024, metavar="N",
                   help="most connections served at once; a request beyond is answered 503 (too_many_connections)")
    s.add_argument("--strict-request-fields", action="store_true",
                   help="answer 400 (as OpenAI) to a body field the server does not know, instead of logging a warning and ignoring it (as vLLM)")
    s.add_argument("--allowed-origins", type=list_arg, default=[],
                   help='CORS: origins allowed to call the API from a browser, a JSON list or comma list ("*": any); default: CORS off')
    s.add_argument("--allowed-methods", type=list_arg, default=["*"], help="CORS: allowed methods (JSON or comma list; default *)")
    s.add_argument("--allowed-headers", type=list_arg, default=["*"], help="CORS: allowed request headers (JSON or comma list; default *)")
    s.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="tool-call syntax of the model: hermes, llama3_json, mistral (default: detected from the chat template)")
    s.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=True,
                   help="parse calls for tool_choice auto (on by default whenever a parser is known; --no-... refuses auto)")
    s.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="leave the tools out of the prompt when tool_choice is none")
    s.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="move the model's thinking into reasoning / reasoning_content: qwen3, deepseek_r1")
    s.add_argument("--disable-access-log", action="store_true", help="no access-log line per request (batchmax.access)")
    s.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between the engine's stats lines (running, waiting, KV use, tok/s), logged while busy; 0: off")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--debug-profile", default=None, metavar="FILE",
                   help="performance work only: sample the front end's main thread and write where it spent its time to FILE at exit")
    s.set_defaults(func=cmd_serve)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``batchmax`` command: ``generate`` (offline), ``serve`` (HTTP), ``plan`` (capacity)."""
from __future__ import annotations

import argparse
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine options shared by every subcommand that builds an engine."""
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--chunk", dest="chunk_size", type=int, default=512, help="prefill chunk (tokens of one request per step)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-tokens", dest="num_tokens", type=int, default=None, help="KV pool capacity in tokens per layer")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-policy", default="full", help="default eviction policy")
    p.add_argument("--kv-budget", type=int, default=None, help="default tokens kept per layer and KV head")
    p.add_argument("--seed", type=int, default=0)


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
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    prompts = args.prompt
    if args.chat:
        prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.sample_seed)
    for out in llm.generate(prompts, params):
        print(out.text)
        print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""xgrammar vs llguidance: grammar compile time of a typical JSON schema and the per-token
bitmask fill time (both on the host CPU), and the bitmask apply on ``--device`` (cpu or cuda),
with the default model's tokenizer (SmolLM2, vocab 49,152) or ``--tokenizer DIR``.

    python -m bench.grammar_engines [--repeats 5] [--device cuda] [--tokenizer DIR]

Each engine decodes the same JSON document token by token (the document is valid for the
schema, tokenized with the model's tokenizer): per token it fills the (1, ceil(V/32)) int32
bitmask and then accepts the token. Compile is timed cold (a new compiler, no cache) and
warm (the same schema again through the engine's own cache, where it has one).
Results: bench/results/2026-12-01-cpu-grammar-engines.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import version

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city"],
        },
        "manager": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
    },
    "required": ["id", "name", "active", "role", "tags"],
}
DOCUMENT = {
    "id": 4521, "name": "Ada Lovelace", "email": "ada@example.com", "active": True, "score": 0.93,
    "role": "admin", "tags": ["math", "engines", "poetry"], "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
    "manager": None,
}


def _tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from batchmax.engine.default_model import default_model_dir

    return AutoTokenizer.from_pretrained(path or default_model_dir())


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fill_times(new_matcher, fill, accept, ids: list[int], repeats: int, why=lambda m: "document rejected") -> list[float]:
    """Seconds of each per-token mask fill while a fresh matcher walks the document ``ids``,
    ``repeats`` times (``accept(m, t)`` must accept every token; ``why(m)`` says why not)."""
    fills = []
    for _ in range(repeats):
        m = new_matcher()
        for t in ids:
            t0 = time.perf_counter()
            fill(m)
            fills.append(time.perf_counter() - t0)
            assert accept(m, t), why(m)
    return fills


def _apply_time(apply, bitmask, vocab: int, device: str) -> float:
    """Mean seconds of the library's in-place apply of a 1-row bitmask repeated over (8, V)
    float32 logits on ``device`` (the mask where the library wants it: xgrammar and
    llguidance both take it on the logits' device)."""
    import torch

    logits = torch.randn(8, vocab, device=device)
    mask8 = bitmask.repeat(8, 1).to(device)
    for _ in range(3):  # first calls compile or load the library's kernel
        apply(logits, mask8)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(100):
        apply(logits, mask8)
    _sync(device)
    return (time.perf_counter() - t0) / 100


def bench_xgrammar(tok, ids: list[int], repeats: int, device: str) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    info_s = time.perf_counter() - t0
    text = json.dumps(SCHEMA)
    cold = []
    for _ in range(repeats):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
        cold.append(time.perf_counter() - t0)
    compiler = xgr.GrammarCompiler(info)
    compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
    t0 = time.perf_counter()
    compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
    warm = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    fills = _fill_times(lambda: xgr.GrammarMatcher(compiled), lambda m: m.fill_next_token_bitmask(bitmask, 0),
                        lambda m, t: m.accept_token(t), ids, repeats)
    apply_s = _apply_time(xgr.apply_token_bitmask_inplace, bitmask, info.vocab_size, device)
    return {"engine": f"xgrammar {version('xgrammar')}", "tokenizer_info_s": info_s, "compile_cold_s": cold,
            "compile_warm_s": warm, "fill_s": fills, "apply8_s": apply_s}


def bench_llguidance(tok, ids: list[int], repeats: int, device: str) -> dict:
    import llguidance as llg
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    info_s = time.perf_counter() - t0
    grammar = llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    cold = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = llg.LLMatcher(lltok, grammar)  # compiles (lazily built lexer, computed on demand)
        cold.append(time.perf_counter() - t0)
        assert not m.is_error(), m.get_error()
    bitmask = lt.allocate_token_bitmask(1, lltok.vocab_size)
    fills = _fill_times(lambda: llg.LLMatcher(lltok, grammar), lambda m: lt.fill_next_token_bitmask(m, bitmask, 0),
                        lambda m, t: m.consume_token(t), ids, repeats, why=lambda m: m.get_error())
    apply_s = _apply_time(lt.apply_token_bitmask_inplace, bitmask, lltok.vocab_size, device)
    return {"engine": f"llguidance {version('llguidance')}", "tokenizer_info_s": info_s,
            "compile_cold_s": cold, "compile_warm_s": None, "fill_s": fills, "apply8_s": apply_s}


def bench_batchmax_apply(vocab: int, device: str, rows=(1, 8, 64), repeats: int = 20) -> list[tuple[int, float]]:
    """batchmax's device-side masking (``StructuredOutputs.apply_bitmask``: unpack the
    (K, ceil(V/32)) bitmask, one masked_fill over the K rows of (S, V) float32 logits), on ``device``."""
    import torch

    from batchmax.engine.config import StructuredOutputsConfig
    from batchmax.engine.structured_output import StructuredOutputs

    so = StructuredOutputs(StructuredOutputsConfig(), None, vocab, set(), lambda t, d: t)
    out = []
    for k in rows:
        logits = torch.randn(k, vocab, device=device)
        mask = torch.randint(-(2**31), 2**31 - 1, (k, (vocab + 31) // 32), dtype=torch.int32, device=device)
        idx = torch.arange(k, device=device)
        so.apply_bitmask(logits, idx, mask)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            so.apply_bitmask(logits, idx, mask)
        _sync(device)
        out.append((k, (time.perf_counter() - t0) / repeats))
    return out


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="where the bitmask is applied (cpu, cuda)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the default model's)")
    args = ap.parse_args()
    tok = _tokenizer(args.tokenizer)
    ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    print(f"tokenizer vocab {len(tok)}; document {len(ids)} tokens; schema {len(json.dumps(SCHEMA))} bytes; apply on {args.device}")
    print("| engine | tokenizer info (ms) | compile cold, median (ms) | compile warm (ms) | fill per token median / mean / p99 (ms) | apply (8, V) (ms) |")
    print("|---|---|---|---|---|---|")
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        try:
            r = fn(tok, ids, args.repeats, args.device)
        except ImportError as exc:  # llguidance is not a dependency: pip install llguidance
            print(f"| {name} | not installed ({exc}) | | | | |")
            continue
        f = sorted(r["fill_s"])
        warm = "-" if r["compile_warm_s"] is None else _ms(r["compile_warm_s"])
        print(f"| {r['engine']} | {_ms(r['tokenizer_info_s'])} | {_ms(statistics.median(r['compile_cold_s']))} | {warm} | "
              f"{_ms(statistics.median(f))} / {_ms(statistics.mean(f))} / {_ms(f[int(0.99 * (len(f) - 1))])} | {_ms(r['apply8_s'])} |")
    print("\n| batchmax apply_bitmask, K rows of (K, V) float32 | ms |\n|---|---|")
    for k, t in bench_batchmax_apply(len(tok), args.device):
        print(f"| K = {k} | {_ms(t)} |")


if __name__ == "__main__":
    main()

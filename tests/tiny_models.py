"""Tiny random-weight models for tests, saved with ``save_pretrained`` like a real checkpoint.

They borrow the default model's tokenizer (vocab 49152, chat template) so text prompts,
chat and detokenization are exercised for real.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral", "qwen3")


def build_tiny_model(path: str | Path, family: str = "llama", tokenizer_dir: str | Path | None = None, seed: int = 0, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    kw = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        kw["head_dim"] = 32
    kw.update(overrides)
    config = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # from_config's default init is tiny (std 0.02): raise it so logits are far from ties and
    # greedy comparisons test the arithmetic, not rounding luck.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if "embed" not in name else 1.0)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
                shutil.copy(f, path / f.name)
    return path

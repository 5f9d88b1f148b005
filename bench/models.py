"""Model folders for benchmarks: shapes only (config.json), weights drawn at load time."""
from __future__ import annotations

import json
import os
import tempfile

# Llama-3-8B: 32 layers, 32 query / 8 KV heads of 128, bf16 -> 128 KiB of KV per token.
LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128001,
    dtype="bfloat16",
)

# Llama-3-70B: 80 layers, 64 query / 8 KV heads of 128 (320 KiB of KV per token in bf16);
# 141 GB of bf16 weights: tensor parallel (2 ranks: 70.5 GB each on H200s, 4: 35 GB).
LLAMA3_70B = dict(
    LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, max_position_embeddings=131072,
)

SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B}


def shape_only_model(config: dict, name: str = "llama3-8b-shape") -> str:
    """A model folder with only config.json (load it with load_format='dummy')."""
    path = os.path.join(tempfile.mkdtemp(prefix="batchmax-bench-"), name)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path

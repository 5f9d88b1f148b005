"""One decoder forward for Llama, Mistral, Qwen2 and Qwen3: the same shape with switches
(GQA, bias on q/k/v, RMSNorm on q and k, tied embeddings), as nano-vllm does.

The model sees a flat batch: every scheduled token of every request packed into one
sequence of N tokens with its true position. Attention is delegated to the step's
``AttentionContext``, which reads and writes the KV pool and runs eviction right after each
layer's attention; the model itself knows nothing of the pool, so the same module serves the
torch reference path and the fast CUDA path.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from batchmax.engine.fused_ops import rms_norm, rotary_qk, silu_mul
from batchmax.engine.parallel import Shard, TPGroup


@dataclass(frozen=True)
class ModelSpec:
    """The numbers of a decoder, read from a Hugging Face config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelSpec":
        mt = config.model_type
        if mt not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"unsupported model type {mt!r}: batchmax serves llama, mistral, qwen2 and qwen3")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}")
        heads = config.num_attention_heads
        attn_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attn_bias,  # Qwen2 always has q/k/v bias
            o_bias=attn_bias if mt in ("llama", "mistral", "qwen3") else False,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=mt == "qwen3",
        )


def rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale, with every RoPE variant transformers knows
    (llama3, yarn, linear, dynamic...) delegated to its own initialisers."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "dynamic":
        raise ValueError("dynamic NTK RoPE rescales with the sequence length, which evicted caches cannot follow")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scale)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``x`` -> normed; with ``residual``: (normed ``x + residual``, ``x + residual``)."""
        return rms_norm(x, self.weight, self.eps, residual, fused=self.fused)


class Rotary(nn.Module):
    def __init__(self, inv_freq: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


class AttentionContext(Protocol):
    """What a layer needs from the step: attention over the request's cache plus new tokens."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_score: torch.Tensor | None = None) -> torch.Tensor:
        """q (N, H_q, D), k and v (N, H_kv, D), post-RoPE -> (N, H_q, D). ``q_score``: the
        queries eviction scores with, when they are not ``q`` (tensor parallel, replicated KV heads)."""
        ...


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, fused: bool = False, tp: TPGroup | None = None, shard: Shard | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.fused = fused
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.proj_heads, self.attn_offset = self.num_heads, 0
        if shard is not None:  # column-parallel q/k/v: this rank's heads; row-parallel o_proj
            self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
            self.proj_heads, self.attn_offset = shard.proj_heads, shard.attn_head_offset
        self.q_size = self.num_heads * spec.head_dim
        self.proj_q_size = self.proj_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        # fused q/k/v projection: one matmul instead of three
        self.qkv_proj = nn.Linear(spec.hidden_size, self.proj_q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, fused)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, fused)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.proj_q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.proj_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # fused: in place on the projection's output (q and k are views of it), one launch
        q, k = rotary_qk(q, k, cos, sin, self.fused)
        if self.proj_heads != self.num_heads:  # replicated KV head: attend with this rank's heads
            out = ctx.attend(self.layer_idx, q[:, self.attn_offset : self.attn_offset + self.num_heads], k, v, q_score=q)
        else:
            out = ctx.attend(self.layer_idx, q, k, v)  # (N, H_q, D)
        if self.tp is None:
            return self.o_proj(out.reshape(n, self.q_size))
        return _row_parallel(self.o_proj, out.reshape(n, self.q_size), self.tp)


def _row_parallel(linear: nn.Linear, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """A row-parallel linear: this rank's partial product, summed over the ranks, then the
    (replicated) bias once."""
    out = tp.all_reduce(F.linear(x, linear.weight))
    return out if linear.bias is None else out + linear.bias


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool = False, tp: TPGroup | None = None, shard: Shard | None = None) -> None:
        super().__init__()
        self.fused = fused
        self.tp = tp
        self.inter = spec.intermediate_size if shard is None else shard.inter_size
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * self.inter, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(self.inter, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.down_proj(silu_mul(self.gate_up_proj(x), self.fused))
        return _row_parallel(self.down_proj, silu_mul(self.gate_up_proj(x), self.fused), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, fused: bool = False, tp: TPGroup | None = None, shard: Shard | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, fused)
        self.self_attn = Attention(spec, layer_idx, fused, tp, shard)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, fused)
        self.mlp = MLP(spec, fused, tp, shard)

    def forward(self, x, residual, cos, sin, ctx):
        """(x, residual) -> (x, residual): the residual add is fused into the next norm, so
        ``x`` is the sublayer's output and ``residual`` the stream before it (None at layer 0)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(
        self, spec: ModelSpec, inv_freq: torch.Tensor, rope_scale: float = 1.0, fused_ops: bool = False,
        tp: TPGroup | None = None, shard: Shard | None = None,
    ) -> None:
        """``fused_ops``: RMSNorm (+ residual add), RoPE and SiLU x up run as Triton kernels
        (engine/fused_ops.py; CUDA) instead of their torch reference. ``tp`` and ``shard``:
        this rank's share of a tensor-parallel model (``engine/parallel.py``); None: the whole."""
        super().__init__()
        self.spec = spec
        self.tp, self.shard = tp, shard
        vocab = spec.vocab_size if shard is None else shard.vocab_size
        self.embed_tokens = nn.Embedding(vocab, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, fused_ops, tp, shard) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, fused_ops)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, vocab, bias=False)
        self.rotary = Rotary(inv_freq, rope_scale)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        # vocab-parallel: this rank's ids looked up, zeros for the others', summed over ranks
        local = input_ids - self.shard.vocab_start
        mine = (local >= 0) & (local < self.shard.vocab_valid)
        x = self.embed_tokens(torch.where(mine, local, 0)) * mine[:, None].to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids, positions (N,) -> final hidden states (N, hidden)."""
        x = self._embed(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, hidden) -> (B, V) logits in the model's dtype: greedy picks need no float32 copy
        (at batch 256 and a 128k vocabulary that copy is 200 MB of traffic per step); the
        sampler and the logprobs cast the rows that need it."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp is None:
            return F.linear(hidden, weight)
        # vocab-parallel LM head: every rank its slice, gathered so each holds the full logits
        full = self.tp.all_gather_last(F.linear(hidden, weight))
        return full[:, : self.spec.vocab_size]

    # ---- weights -------------------------------------------------------------------------

    @torch.no_grad()
    def load_hf_weights(self, tensors: dict[str, torch.Tensor] | Any) -> None:
        """Copy a Hugging Face state dict (``model.layers.0.self_attn.q_proj.weight``...)
        into the fused layout. ``tensors`` maps names to tensors (lazily is fine)."""
        loaded: set[str] = set()
        sh = self.shard
        # Tensor parallel: this rank's slice of a tensor (``src_slice``: (dim, start, length)),
        # read alone from safetensors (``SafetensorsDir.read_slice``), else cut from the whole.

        def put(dst: torch.Tensor, name: str, rows: slice | None = None, src_slice: tuple[int, int, int] | None = None) -> None:
            if src_slice is None:
                src = tensors[name]
            elif hasattr(tensors, "read_slice"):
                src = tensors.read_slice(name, *src_slice)
            else:
                src = tensors[name].narrow(*src_slice)
            (dst if rows is None else dst[rows]).copy_(src.to(dst.dtype))
            loaded.add(name)

        def vocab_put(dst: torch.Tensor, name: str) -> None:
            if sh is None:
                return put(dst, name)
            dst.zero_()  # the padded rows of the last slice
            put(dst, name, slice(0, sh.vocab_valid), (0, sh.vocab_start, sh.vocab_valid))

        d = self.spec.head_dim
        if sh is None:
            q_src = k_src = o_src = gu_src = down_src = None
        else:
            q_src = (0, sh.proj_head_start * d, sh.proj_heads * d)
            k_src = (0, sh.kv_head_start * d, sh.num_kv_heads * d)
            o_src = (1, sh.q_head_start * d, sh.num_heads * d)
            gu_src = (0, sh.inter_start, sh.inter_size)
            down_src = (1, sh.inter_start, sh.inter_size)
        vocab_put(self.embed_tokens.weight, "model.embed_tokens.weight")
        put(self.norm.weight, "model.norm.weight")
        if self.lm_head is not None:
            vocab_put(self.lm_head.weight, "lm_head.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = layer.self_attn
            q, kv = a.proj_q_size, a.kv_size
            parts = (
                ("q_proj", slice(0, q), q_src), ("k_proj", slice(q, q + kv), k_src), ("v_proj", slice(q + kv, q + 2 * kv), k_src),
            )
            for proj, rows, src in parts:
                put(a.qkv_proj.weight, f"{p}self_attn.{proj}.weight", rows, src)
                if a.qkv_proj.bias is not None:
                    put(a.qkv_proj.bias, f"{p}self_attn.{proj}.bias", rows, src)
            put(a.o_proj.weight, f"{p}self_attn.o_proj.weight", None, o_src)
            if a.o_proj.bias is not None:
                put(a.o_proj.bias, f"{p}self_attn.o_proj.bias")
            if a.q_norm is not None:
                put(a.q_norm.weight, f"{p}self_attn.q_norm.weight")
                put(a.k_norm.weight, f"{p}self_attn.k_norm.weight")
            m, inter = layer.mlp, layer.mlp.inter
            put(m.gate_up_proj.weight, f"{p}mlp.gate_proj.weight", slice(0, inter), gu_src)
            put(m.gate_up_proj.weight, f"{p}mlp.up_proj.weight", slice(inter, 2 * inter), gu_src)
            put(m.down_proj.weight, f"{p}mlp.down_proj.weight", None, down_src)
            if m.down_proj.bias is not None:
                put(m.gate_up_proj.bias, f"{p}mlp.gate_proj.bias", slice(0, inter), gu_src)
                put(m.gate_up_proj.bias, f"{p}mlp.up_proj.bias", slice(inter, 2 * inter), gu_src)
                put(m.down_proj.bias, f"{p}mlp.down_proj.bias")
            put(layer.input_layernorm.weight, f"{p}input_layernorm.weight")
            put(layer.post_attention_layernorm.weight, f"{p}post_attention_layernorm.weight")


class SafetensorsDir:
    """Lazy name -> tensor view over every ``*.safetensors`` file of a model directory."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self._files = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            handle = safe_open(f, framework="pt")
            for key in handle.keys():
                self._files[key] = handle
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return self._files[name].get_tensor(name)

    def read_slice(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """``self[name].narrow(dim, start, length)``, reading only that part of the file
        (a tensor-parallel rank's shard)."""
        if name not in self._files:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        part = self._files[name].get_slice(name)
        index = (slice(None),) * dim + (slice(start, start + length),)
        return part[index]


def load_weights_source(path: str) -> Any:
    """Safetensors read lazily; other formats through transformers (slower, full copy)."""
    if glob.glob(os.path.join(path, "*.safetensors")):
        return SafetensorsDir(path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def read_config_json(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)

"""Typed engine configuration.

Three groups, each a dataclass with documented fields validated in ``__post_init__``:
``CacheConfig`` (the KV pool), ``SchedulerConfig`` (batching and chunked prefill) and
``EvictionConfig`` (the server-wide default KV policy). ``EngineConfig`` holds them plus the
model, device and dtype. ``EngineConfig.from_kwargs`` maps flat keywords (``chunk_size=128``)
to the right group, which is how ``LLM(model, **kwargs)`` and the CLI build a config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from batchmax.engine.faults import FaultConfig


@dataclass
class CacheConfig:
    """The KV pool: preallocated per layer, handed out in blocks of ``block_size`` tokens."""

    block_size: int = 16
    """Tokens per block. Every request's per-layer cache is a list of such blocks."""
    num_tokens: int | None = None
    """Pool capacity in tokens per layer. ``None``: size it from ``memory_fraction``."""
    host_kv_tokens: int | None = None
    """Capacity of recall's host store (pinned CPU memory), tokens per layer. ``None``: a
    quarter of available RAM, at most as many tokens as the GPU pool, made on first use."""
    recall_stage_tokens: int = 32768
    """Recall: most parked tokens (per layer, summed over the requests re-selected together)
    brought back to the device at once. The requests completing their prompt in a step are
    re-selected in groups of this size, and the next group loads while one is scored, so
    recall's device memory is bounded by two groups' K/V of one layer (Llama-3-8B, 32768
    tokens: 128 MiB per group) whatever the batch and prompt lengths; a single request's layer
    always fits (it forms a group alone)."""
    memory_fraction: float = 0.9
    """When ``num_tokens`` is None: the fraction of the device's free memory (after the
    weights are loaded) that the pool may take, less 1 GiB for activations and less the
    sampler's per-request tables at ``max_num_seqs`` requests. On the CPU: of available RAM
    (less the same tables), at most 1 GiB."""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.host_kv_tokens is not None and self.host_kv_tokens < 0:
            raise ValueError("host_kv_tokens must be >= 0")
        if self.recall_stage_tokens <= 0:
            raise ValueError(f"recall_stage_tokens must be positive, got {self.recall_stage_tokens}")
        if self.num_tokens is not None and self.num_tokens < self.block_size:
            raise ValueError(f"num_tokens must be at least one block ({self.block_size}), got {self.num_tokens}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


def default_batched_tokens(device_type: str) -> int:
    """``SchedulerConfig.max_num_batched_tokens`` when unset, by device type."""
    return 8192 if device_type == "cuda" else 2048


@dataclass
class SchedulerConfig:
    """Continuous batching with chunked prefill (vLLM v1 style: one token budget per step)."""

    max_num_seqs: int = 256
    """Most requests running (holding KV) at once."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step: decode tokens plus prefill chunks. ``None``: the device's
    default, ``default_batched_tokens()`` (8,192 on CUDA, as vLLM's server on a large GPU;
    2,048 on the CPU, where a step's cost grows with its tokens and latency with it)."""
    chunk_size: int = 512
    """Most prompt tokens of one request processed in one step. With eviction this is the
    Batch-Max chunk: each layer evicts down to its budget after every chunk."""
    decode_reserve_tokens: int | None = None
    """Decode tokens reserved per request at admission. ``None`` reserves all ``max_tokens``
    (never preempts); a smaller number admits more optimistically, and a request that then
    outgrows the pool preempts the newest running one (recomputed later)."""
    max_model_len: int | None = None
    """Context length (prompt + output). ``None``: the model's ``max_position_embeddings``."""
    async_scheduling: bool | None = None
    """Launch step n+1 before reading step n's sampled tokens back: the host schedules,
    builds metadata and processes outputs while the GPU runs, and the next step takes its
    input tokens from the device. Outputs are then reported one step later, and a request that
    hits a stop condition has run one extra (discarded) step. ``None``: on with CUDA, off on
    the CPU (where the host runs the model itself, so there is nothing to overlap)."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.decode_reserve_tokens is not None and self.decode_reserve_tokens < 0:
            raise ValueError("decode_reserve_tokens must be >= 0")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")


@dataclass
class EvictionConfig:
    """Server-wide default KV eviction; each request may override policy and budget."""

    kv_policy: str = "full"
    """Registry name of the default policy (``full`` never evicts)."""
    kv_budget: int | None = None
    """Default tokens kept per layer and KV head. Required when the policy evicts."""
    kv_policy_args: dict[str, Any] = field(default_factory=dict)
    """Fields of the default policy (``{"obs_window": 16}``, ``sink``, ``window``, ``kernel``,
    ``beta``...), applied to every request that uses the default policy."""
    kv_recall: bool = False
    """Recall: park the K/V evicted during prefill in host memory and, at the prompt's last
    chunk, re-select each layer's budget from all of the prompt's tokens (kept and parked)."""
    recall_attention: str = "compressed"
    """What the prompt's last chunk attends to under recall: ``compressed`` (the held tokens,
    recall re-selects after the chunk's attention) or ``recalled`` (re-select the held prompt
    tokens from held + parked with the chunk's window first, then attend)."""
    evict_decode_every: int = 0
    """Also evict during decode every k generated tokens (0: only during prefill). The
    decode footprint is then ``budget + k`` instead of ``budget + max_tokens``."""
    layer_batch_mib: float = 512
    """Eviction of consecutive layers runs as one batch (one gather, score, top-k and scatter
    for all of them instead of one per layer) until the batch's gathered keys and values reach
    this many MiB (fractions allowed), and always ends at the last layer; the same tokens are
    kept. The batch is device memory beside the pool (the pool leaves room for activations).
    0: each layer evicts alone right after its attention. Stateful policies (h2o) and ones
    that are not ``rows_independent`` always evict per layer."""

    def __post_init__(self) -> None:
        if self.kv_budget is not None and self.kv_budget <= 0:
            raise ValueError(f"kv_budget must be positive, got {self.kv_budget}")
        from batchmax.policies import get_policy  # validates the name and the fields up front

        get_policy(self.kv_policy, **self.kv_policy_args)
        if self.recall_attention not in ("compressed", "recalled"):
            raise ValueError(f"recall_attention must be 'compressed' or 'recalled', got {self.recall_attention!r}")
        if self.evict_decode_every < 0:
            raise ValueError("evict_decode_every must be >= 0")
        if self.layer_batch_mib < 0:
            raise ValueError("layer_batch_mib must be >= 0")


@dataclass
class StructuredOutputsConfig:
    """Grammar-constrained decoding (``engine/structured_output.py``)."""

    grammar_cache_size: int = 64
    """Compiled grammars kept (LRU, keyed by the schema, regex, choice or grammar text)."""
    json_any_whitespace: bool = False
    """Let JSON outputs put any whitespace between tokens (vLLM's default). ``False``: compact
    JSON with the separators ", " and ": ", which also keeps a weak model from filling its
    output with whitespace."""

    def __post_init__(self) -> None:
        if self.grammar_cache_size < 1:
            raise ValueError("grammar_cache_size must be >= 1")


@dataclass
class EngineConfig:
    model: str | None = None
    """A local Hugging Face model directory. ``None``: the default model (SmolLM2-135M-Instruct)."""
    tokenizer: str | None = None
    """Tokenizer directory when it differs from ``model``."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``."""
    load_format: str = "auto"
    """``auto`` reads the checkpoint; ``dummy`` initialises random weights (benchmarks)."""
    skip_tokenizer_init: bool = False
    """Run without a tokenizer: prompts must be token ids and outputs carry no text."""
    detokenize: bool = True
    """Decode output text and check stop strings in the engine. ``False``: outputs carry token
    ids only (empty text) and stop strings are not checked here; the engine-core process runs
    so, because its front end (``core_client.py``) decodes and checks them."""
    attention_backend: str = "auto"
    """``auto`` (the fused Triton kernels on CUDA when Triton is installed, else torch),
    ``triton`` or ``torch`` (the reference: SDPA per request over gathered K/V)."""
    fused_ops: bool | None = None
    """RMSNorm (with the residual add), RoPE and SiLU x up as Triton kernels
    (``engine/fused_ops.py``). ``None``: whenever attention runs the Triton kernels."""
    cuda_graphs: bool = True
    """Replay decode-only steps from CUDA graphs captured per batch-size bucket (on CUDA with
    the fused kernels; steps that evict, or need prompt logprobs, run eagerly)."""
    cuda_graph_max_batch: int = 256
    """Largest decode batch served from a graph; larger batches run eagerly."""
    seed: int = 0
    """Seeds the generators of requests that carry no seed of their own."""
    tensor_parallel_size: int = 1
    """Processes (one device each) the model is sharded over (``engine/parallel.py``). 1: one
    process, no ``torch.distributed``. N > 1: the caller's process is rank 0, N - 1 workers are
    spawned; it must divide the attention heads, the MLP width and the KV heads (or be a
    multiple of the KV heads, which are then replicated)."""
    tp_timeout_s: float = 120.0
    """Tensor parallel: a collective (or a worker's start) that takes longer than this fails
    the engine (a rank that died or hangs) instead of waiting forever."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Fault injection for reliability tests (``engine/faults.py``); off by default."""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError("cuda_graph_max_batch must be >= 1")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tp_timeout_s <= 0:
            raise ValueError("tp_timeout_s must be positive")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"unknown device {self.device!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build a config from flat keywords: top-level fields, or fields of any group."""
        groups = {
            "cache": CacheConfig, "scheduler": SchedulerConfig, "eviction": EvictionConfig,
            "structured_outputs": StructuredOutputsConfig, "faults": FaultConfig,
        }
        top = {f.name for f in dataclasses.fields(cls)} - set(groups)
        found: dict[str, dict[str, Any]] = {g: {} for g in groups}
        direct: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in top or key in groups:
                direct[key] = value
                continue
            owner = [g for g, c in groups.items() if key in {f.name for f in dataclasses.fields(c)}]
            if not owner:
                raise TypeError(f"unknown engine option {key!r}")
            found[owner[0]][key] = value
        for g, c in groups.items():
            if g not in direct:
                direct[g] = c(**found[g])
            elif found[g]:
                direct[g] = dataclasses.replace(direct[g], **found[g])
        return cls(**direct)

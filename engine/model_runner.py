"""Loads the model and runs one step: the packed tokens of all scheduled requests in one
forward, attention over the pool, logits for the rows that need them."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from batchmax.engine.attention import PoolAttention, StepMetadata
from batchmax.engine.config import EngineConfig
from batchmax.engine.cuda_graphs import DecodeGraphs
from batchmax.engine.evictor import Evictor, QueryWindow
from batchmax.engine.host_store import HostKVStore
from batchmax.engine.inflight import StepInFlight
from batchmax.engine.kv_cache import KVCache
from batchmax.engine.models.llama import DecoderModel, ModelSpec, load_weights_source, rope_inv_freq
from batchmax.engine.parallel import Shard, TPGroup
from batchmax.engine.request import Request
from batchmax.engine.triton_attention import HAS_TRITON

log = logging.getLogger("batchmax")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_POOL_CAP = 1 << 30  # a CPU pool larger than this only slows tests and small hosts down


def _available_ram() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str | Path, load_weights: bool = True, tp: TPGroup | None = None) -> None:
        """``tp``: this process's rank of a tensor-parallel group (``engine/parallel.py``): the
        model holds this rank's shard and the pool this rank's KV heads. None: the whole model."""
        from transformers import AutoConfig

        self.config = config
        self.tp = tp
        self.device = resolve_device(config.device) if tp is None else tp.device
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.spec = ModelSpec.from_hf_config(self.hf_config)
        s = self.spec
        self.shard = None if tp is None else Shard.of(tp.rank, tp.size, s.num_heads, s.num_kv_heads, s.intermediate_size, s.vocab_size)
        # what this process holds: every head, or its rank's share
        # query heads eviction sees (with replicated KV heads, the whole group of this rank's KV head)
        self.local_heads = s.num_heads if self.shard is None else self.shard.proj_heads
        self.local_kv_heads = s.num_kv_heads if self.shard is None else self.shard.num_kv_heads
        inv_freq, scale = rope_inv_freq(self.hf_config, self.spec.head_dim)
        backend = config.attention_backend
        if backend == "triton" and not (HAS_TRITON and self.device.type == "cuda"):
            raise ValueError("attention_backend='triton' needs CUDA and Triton")
        self.fused = backend == "triton" or (backend == "auto" and HAS_TRITON and self.device.type == "cuda")
        self.fused_ops = self.fused if config.fused_ops is None else config.fused_ops
        if self.fused_ops and not (HAS_TRITON and self.device.type == "cuda"):
            raise ValueError("fused_ops needs CUDA and Triton")
        # Build on the meta device and allocate once in the target dtype: no float32 copy of
        # an 8B model, no init kernels for weights that are overwritten anyway.
        with torch.device("meta"):
            model = DecoderModel(self.spec, inv_freq, scale, fused_ops=self.fused_ops, tp=tp, shard=self.shard).to(dtype=self.dtype)
        model.to_empty(device=self.device)
        model.rotary.inv_freq = inv_freq.to(self.device)  # RoPE frequencies stay float32
        with torch.no_grad():
            if load_weights:
                model.load_hf_weights(load_weights_source(str(model_path)))
            else:  # random weights for benchmarks ("dummy" load, as vLLM calls it)
                if tp is not None:  # the same random shard on a rank whatever the process
                    torch.manual_seed(1000 + tp.rank)
                for name, p in model.named_parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, 0.02)
                    elif name.endswith("bias"):
                        p.zero_()
                    else:  # norm scales
                        p.fill_(1.0)
        self.model = model.eval().requires_grad_(False)
        self.graphs: DecodeGraphs | None = None

    # ---- the pool ---------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        s = self.spec
        return KVCache.bytes_per_token(s.num_layers, self.local_kv_heads, s.head_dim, self.dtype)

    def pool_tokens(self, max_useful_tokens: int, reserve_bytes: int = 0) -> int:
        """Capacity from the config: given, or a fraction of free memory after the weights and
        ``reserve_bytes`` (what the engine allocates later on the device: the sampler's tables)."""
        cc = self.config.cache
        if cc.num_tokens is not None:
            return cc.num_tokens
        per_token = self.kv_bytes_per_token()
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # keep activations' room: the fraction's remainder plus 1 GiB
            avail = int(free * cc.memory_fraction) - (1 << 30) - reserve_bytes
        else:
            free = _available_ram()
            avail = min(int(free * cc.memory_fraction) - reserve_bytes, _CPU_POOL_CAP)
        tokens = min(avail // per_token, max_useful_tokens)
        if self.tp is not None:  # every rank's scheduler must see the same pool: the smallest
            tokens = min(v[0] for v in self.tp.agree(tokens))
        if tokens < cc.block_size:
            raise RuntimeError(f"no memory left for the KV pool ({avail / 2**20:.0f} MiB available)")
        return tokens

    def allocate_cache(self, num_tokens: int) -> KVCache:
        s, bs = self.spec, self.config.cache.block_size
        cache = KVCache(s.num_layers, self.local_kv_heads, s.head_dim, num_tokens // bs, bs, self.dtype, self.device)
        log.info("KV pool: %d tokens per layer (%.2f GiB)", cache.capacity_tokens, cache.capacity_tokens * self.kv_bytes_per_token() / 2**30)
        if self.tp is not None and self.config.cache.host_kv_tokens is None:
            # the host store is made on first use, which happens on rank 0 (add_request) before
            # the workers (next step): agree on its size now, while every rank is here
            self._host_tokens = min(v[0] for v in self.tp.agree(self._default_host_tokens(cache.capacity_tokens)))
        return cache

    def _default_host_tokens(self, gpu_pool_tokens: int) -> int:
        """A quarter of the host's available RAM (shared by the ranks on it), at most the pool."""
        per_token = self.kv_bytes_per_token() + 4 * self.spec.num_layers * self.local_kv_heads
        ranks = 1 if self.tp is None else self.tp.size
        return min(gpu_pool_tokens, _available_ram() // 4 // ranks // per_token)

    def allocate_host_store(self, gpu_pool_tokens: int) -> HostKVStore:
        s = self.spec
        tokens = self.config.cache.host_kv_tokens
        if tokens is None:
            # tensor parallel: agreed by the ranks (ranks on one host share its RAM)
            tokens = self._default_host_tokens(gpu_pool_tokens) if self.tp is None else self._host_tokens
        store = HostKVStore(s.num_layers, self.local_kv_heads, s.head_dim, tokens, self.dtype, self.device, self.config.cache.recall_stage_tokens)
        log.info("recall host store: %d tokens per layer (%.2f GiB, pinned=%s)", store.capacity_tokens, store.capacity_tokens * self.kv_bytes_per_token() / 2**30, store.pin_memory)
        return store

    def prepare_cuda_graphs(self, cache: KVCache, max_blocks: int) -> None:
        """Capture the decode graphs over ``cache`` (CUDA with the fused kernels only)."""
        cfg = self.config
        if not (cfg.cuda_graphs and self.fused and self.device.type == "cuda"):
            return
        self.graphs = DecodeGraphs(self.model, cache, min(cfg.cuda_graph_max_batch, cfg.scheduler.max_num_seqs), max_blocks)
        with torch.inference_mode():
            self.graphs.capture_all()
        log.info("CUDA graphs captured for decode batches %s", self.graphs.buckets)

    # ---- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self,
        cache: KVCache,
        requests: list[Request],
        num_new: list[int],
        logit_rows: list[int],
        windows: dict[str, QueryWindow] | None = None,
        host: HostKVStore | None = None,
        prev: StepInFlight | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Run the step; returns logits (len(logit_rows), V) in the model's dtype for the
        packed-token indices ``logit_rows`` and the number of tokens evicted (summed over layers). The
        pool's held lengths advance by ``num_new``, then drop where layers evicted.
        ``windows`` holds the requests' observation windows across steps. ``prev``: the step
        still in flight (async scheduling), whose sampled ids are inputs of this one where
        the host does not know them yet."""
        ids: list[int] = []
        pos: list[int] = []
        fill_at: list[int] = []  # packed index of each input the previous step is still sampling
        fill_from: list[int] = []  # ... and its row of prev.tokens
        for req, n in zip(requests, num_new):
            start = req.num_computed_tokens
            known = req.token_ids(start, n)
            ids.extend(known)
            if len(known) < n:
                # only a request's newest token can be unknown (one step in flight at most)
                if prev is None or len(known) != n - 1:
                    raise RuntimeError(f"request {req.request_id}: {n - len(known)} of its input tokens are unknown")
                fill_at.append(len(ids))
                fill_from.append(prev.input_fill(req))
                ids.append(0)
            pos.extend(range(start, start + n))
        input_ids = cache.stager.to_device(ids, torch.int64)
        if fill_at:
            # on the device, ordered after the previous step's sampling: no wait on the host
            src = prev.tokens.index_select(0, cache.stager.to_device(fill_from, torch.int64))
            input_ids.index_copy_(0, cache.stager.to_device(fill_at, torch.int64), src)
        positions = cache.stager.to_device(pos, torch.int64)
        meta = StepMetadata.build(cache, [r.request_id for r in requests], num_new, positions)
        evictor = None
        if any(r.policy is not None for r in requests):
            spec = self.spec
            ev = self.config.eviction
            evictor = Evictor(cache, spec.num_layers, self.local_heads, ev.evict_decode_every, windows, self.dtype, host, ev.recall_attention,
                              layer_batch_bytes=int(ev.layer_batch_mib * 2**20))
            if not evictor.plan(requests, num_new, positions, meta.query_start):
                evictor = None
        graphs = self.graphs
        if (
            graphs is not None and evictor is None and graphs.cache is cache and meta.num_decodes == len(requests)
            and len(logit_rows) == len(requests) and graphs.usable(meta)
        ):
            # decode-only and nothing to evict: replay; every row is one request's last token
            hidden = graphs.run(meta, input_ids, positions)
        else:
            hidden = self.model(input_ids, positions, PoolAttention(cache, meta, evictor, fused=self.fused))
        for req, n in zip(requests, num_new):
            cache.commit(req.request_id, n)
        evicted = 0
        if evictor is not None:
            evictor.finish()
            evicted = evictor.evicted_tokens
        rows = cache.stager.to_device(logit_rows, torch.int64)
        return self.model.compute_logits(hidden.index_select(0, rows)), evicted

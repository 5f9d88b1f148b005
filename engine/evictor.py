"""Batch-Max eviction inside the forward: once a layer has attended, the requests whose cache
in that layer outgrew their budget are scored by their policy, keep the top-k tokens per KV
head (plus sinks and the recent window) and are compacted in place.

When a request evicts (its layer ``l`` holds ``held + n`` tokens after this step):

- a prefill step (a chunk of the prompt): whenever ``held + n > budget_l``. The request then
  never holds more than ``budget_l + chunk`` tokens in any layer.
- a decode step, only with ``evict_decode_every = k > 0``: when ``held + 1 >= budget_l + k``,
  so the decode footprint stays at ``budget_l + k``.

Policies that need queries see an observation window of the request's latest ``obs_window``
queries (kept across steps in a small per-request buffer, so a window can span decode steps),
or, for ``obs_window=None`` (h2o), this step's queries: such policies are stateful and fold
every step's queries into their running state, evicting or not, so no query is missed.

Everything is batched over the requests of one policy and over consecutive layers (nothing
reads a layer's cache again in the forward once it has attended): one gather of their keys,
one ``score``, one ``select_keep`` (its plan made once per step), one scatter back into the
pool per batch of layers (``EvictionConfig.layer_batch_mib``; the last layer ends a batch).

Recall (``Request.recall``): the tokens a prefill chunk drops are parked in the host store
instead of being lost. At the prompt's last chunk, after the chunk's attention (which used
the compressed cache), each layer scores the union of held and parked tokens, i.e. every
prompt token, with the final observation window, and keeps its budget from all of them: the
same selection as evicting once after the whole prompt, under the ``budget + chunk`` GPU
bound. The requests completing their prompt in one step are re-selected together, per layer,
in groups whose parked tokens fit the host store's ``stage_tokens``; the next group's parked
K/V load on a side stream while the current group is scored, so the device holds at most two
groups' parked K/V (and never a whole request's: one layer at a time).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from batchmax.engine.attention import PoolAttention
from batchmax.engine.eviction import keep_plan, select_planned
from batchmax.engine.host_store import HostKVStore, StagedRun
from batchmax.engine.kv_cache import KVCache
from batchmax.engine.request import Request
from batchmax.policies import EvictionPolicy, ScoreContext


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``counts[i]`` entries each, flattened: the row of every entry and its
    index within the row, e.g. [2, 1] -> ([0, 0, 1], [0, 1, 0])."""
    row = np.repeat(np.arange(len(counts)), counts)
    return row, np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)


@dataclass
class _Member:
    b: int  # index in the step's batch
    req: Request
    n: int  # new tokens this step
    evict_layers: list[bool]
    windowed: bool  # keeps an observation window this step
    recall: bool = False  # parks what it drops (a prefill step of a recall request)
    last_chunk: bool = False  # this step completes the prompt


@dataclass
class _PoolLayer:
    """The pool's tensors one eviction batch indexes (one layer's, or all layers' flattened)."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    state: torch.Tensor | None


@dataclass
class _Group:
    policy: EvictionPolicy
    members: list[_Member] = field(default_factory=list)


class QueryWindow:
    """The latest ``size`` queries of one request, per layer (observation window)."""

    def __init__(self, num_layers: int, size: int, num_heads: int, head_dim: int, dtype, device) -> None:
        self.q = torch.zeros(num_layers, size, num_heads, head_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(size, dtype=torch.int64, device=device)
        self.filled = 0
        self.size = size

    def push(self, layer: int, q_new: torch.Tensor) -> None:
        """q_new (n, H_q, D): the request's queries of this step in this layer."""
        m = min(self.size, q_new.shape[0])
        self.q[layer] = torch.cat([self.q[layer, m:], q_new[-m:]])

    def replace(self, q: torch.Tensor, layer: int | None = None) -> None:
        """The whole window, of one layer ((size, H_q, D)) or of all ((L, size, H_q, D)): this
        step's chunk was at least as long as it."""
        (self.q if layer is None else self.q[layer]).copy_(q)

    def push_positions(self, pos_new: torch.Tensor) -> None:
        m = min(self.size, pos_new.shape[0])
        self.pos = torch.cat([self.pos[m:], pos_new[-m:]])
        self.filled = min(self.size, self.filled + pos_new.shape[0])


class Evictor:
    """The eviction hook of one step (``PoolAttention`` calls it after every layer)."""

    def __init__(
        self,
        cache: KVCache,
        num_layers: int,
        num_heads: int,
        evict_decode_every: int,
        windows: dict[str, QueryWindow],
        q_dtype: torch.dtype,
        host: HostKVStore | None = None,
        recall_attention: str = "compressed",
        layer_batch_bytes: int = 0,
    ) -> None:
        """``layer_batch_bytes``: the eviction of consecutive layers is batched until the
        batch's gathered keys and values reach this size (``EvictionConfig.layer_batch_mib``);
        0: every layer evicts alone."""
        self.host = host
        self.layer_batch_bytes = layer_batch_bytes
        self._pending: dict[str, list[tuple[int, list[_Member], tuple | None]]] = {}
        """group key -> the layers whose eviction waits for the batch: (layer, members, their
        queries, taken when the layer attended)."""
        self._pending_bytes: dict[str, int] = {}
        self.recall_attention = recall_attention
        self.cache = cache
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.q_dtype = q_dtype
        self.k = evict_decode_every
        self.windows = windows  # persistent across steps, owned by the engine
        self.groups: dict[str, _Group] = {}
        self.new_lens: dict[str, list[int]] = {}
        self.evicted_tokens = 0
        # recall's work in the order the hooks need it: (layer, group key, before attention?,
        # members), and the load of the queue's head issued ahead of use
        self._recall_queue: deque[tuple[int, str, bool, list[_Member]]] = deque()
        self._inflight: StagedRun | None = None
        self.peak_staged_tokens = 0
        """Most parked tokens (per layer) on the device at once in this step: the group being
        re-selected plus the one loading."""
        self._memo: dict[tuple, object] = {}  # see ``_shared``
        self._fresh: dict[tuple[int, str], tuple[dict[str, int], torch.Tensor]] = {}
        """(layer, group key) -> (request id -> row, (M, W, H_q, D)): this step's observation
        windows of the members whose chunk fills the whole window, gathered from the layer's
        queries in one index (``_push_windows``); written to their ``QueryWindow`` at
        ``finish``, once for all layers."""

    def _shared(self, key: tuple, make):
        """``make()`` (device tensors of indices known on the host), made once per step for
        ``key``. The layers of a step share them whenever they evict the same counts (a policy
        with one budget for every layer), so later layers skip the staging copies and the
        index arithmetic: on W1 a prefill step staged 263 index copies, ~8 per layer."""
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = make()
        return hit

    # ---- planning (before the forward) -------------------------------------------------------

    def plan(self, requests: list[Request], num_new: list[int], positions: torch.Tensor, query_start: list[int]) -> bool:
        """Decide who evicts where; returns False when nobody needs the hook this step.
        ``positions`` (N,) of the packed tokens, request b's at ``query_start[b]:query_start[b + 1]``."""
        for b, (req, n) in enumerate(zip(requests, num_new)):
            policy = req.policy
            if policy is None:
                continue
            held = self.cache.seqs[req.request_id].lens
            budgets = req.layer_budgets
            decode = n == 1 and req.num_output_tokens > 0 and req.num_computed_tokens == req.num_tokens - 1
            if decode:
                evict = [self.k > 0 and h + 1 >= bl + self.k for h, bl in zip(held, budgets)]
            else:
                evict = [h + n > bl for h, bl in zip(held, budgets)]
            # the window matters only while the request may still evict
            windowed = policy.needs_queries and policy.obs_window is not None and (not decode or self.k > 0)
            if windowed:
                w = self.windows.get(req.request_id)
                if w is None or req.num_computed_tokens == 0:  # new, or restarted after preemption
                    w = self.windows[req.request_id] = QueryWindow(
                        self.num_layers, policy.obs_window, self.num_heads, self.cache.head_dim, self.q_dtype, self.cache.device
                    )
                w.push_positions(positions[query_start[b] : query_start[b + 1]])
            if not (any(evict) or policy.stateful or windowed):
                continue
            recall = req.recall and not decode and self.host is not None and req.request_id in self.host.seqs
            last = req.num_computed_tokens + n == req.num_tokens
            key = repr(policy)
            self.groups.setdefault(key, _Group(policy)).members.append(_Member(b, req, n, evict, windowed, recall, last))
        if self.host is not None and any(m.recall and m.last_chunk for g in self.groups.values() for m in g.members):
            self._plan_recall()
        return bool(self.groups)

    def _plan_recall(self) -> None:
        """Queue the step's re-selections (layer by layer, groups within the staging bound)
        and start loading the first. With ``recall_attention="recalled"`` a layer is
        re-selected twice: before its attention (the held count, the rest parked back) and
        after it (the budget, from what the first pass parked back)."""
        cap = self.host.stage_tokens
        phases = (True, False) if self.recall_attention == "recalled" else (False,)
        for layer in range(self.num_layers):
            for before in phases:
                for key, group in self.groups.items():
                    chunk, size = [], 0
                    for m in group.members:
                        if not self._recalls_now(m, layer):
                            continue
                        p = self.host.seqs[m.req.request_id].lens[layer]
                        if chunk and size + p > cap:
                            self._recall_queue.append((layer, key, before, chunk))
                            chunk, size = [], 0
                        chunk.append(m)
                        size += p
                    if chunk:
                        self._recall_queue.append((layer, key, before, chunk))
        self._load_next()

    def _load_next(self) -> None:
        """Issue the load of the queue's head, unless it reads what this step parks back
        (the second pass of ``recalled``): that one loads when it is reached."""
        self._inflight = None
        if self._recall_queue:
            layer, key, before, members = self._recall_queue[0]
            if before or self.recall_attention != "recalled":
                self._inflight = self.host.load([m.req.request_id for m in members], layer, with_state=self.groups[key].policy.stateful)

    def _recall_groups(self, layer: int, key: str, before: bool, q: torch.Tensor, meta) -> None:
        """Re-select the queued groups of (layer, policy, pass): each one's load was issued
        when the previous one started, and this one's start issues the next."""
        while self._recall_queue and self._recall_queue[0][:3] == (layer, key, before):
            _, _, _, members = self._recall_queue.popleft()
            staged = self._inflight
            if staged is None:  # after this step's parks: the load must follow them
                self.host.mark_parks()
                staged = self.host.load([m.req.request_id for m in members], layer, with_state=self.groups[key].policy.stateful)
            staged.ready()
            self._load_next()
            nxt = sum(self._inflight.counts) if self._inflight is not None else 0
            self.peak_staged_tokens = max(self.peak_staged_tokens, sum(staged.counts) + nxt)
            self._recall_group(layer, self.groups[key].policy, members, staged, q, meta, before)

    # ---- the hook (inside the forward) -------------------------------------------------------

    def _recalls_now(self, m: _Member, layer: int) -> bool:
        return m.recall and m.last_chunk and m.evict_layers[layer] and bool(self.host.seqs[m.req.request_id].lens[layer])

    def before_attention(self, layer: int, q: torch.Tensor, attn: PoolAttention) -> None:
        """After the step's K/V are written, before the layer attends."""
        meta = attn.meta
        self._push_windows(layer, q, meta)
        if self.recall_attention == "recalled":
            for key in self.groups:
                self._recall_groups(layer, key, True, q, meta)

    def _push_windows(self, layer: int, q: torch.Tensor, meta) -> None:
        """This layer's queries into the members' observation windows. A chunk at least as
        long as the window replaces it: those members' windows are one gather of ``q`` for
        the whole group (a copy per member and layer cost W1 32 operators a layer); shorter
        chunks (decode, a short last chunk) shift into the stored window."""
        for key, group in self.groups.items():
            whole: list[_Member] = []
            for m in group.members:
                if not m.windowed:
                    continue
                if m.n >= group.policy.obs_window:
                    whole.append(m)
                else:
                    self.windows[m.req.request_id].push(layer, q[meta.query_start[m.b] : meta.query_start[m.b + 1]])
            if whole:
                W = group.policy.obs_window
                ends = tuple(meta.query_start[m.b + 1] for m in whole)
                rows = self._shared(("wrows", W, ends), lambda ends=ends, W=W: self.cache.stager.to_device(
                    torch.from_numpy((np.asarray(ends, dtype=np.int64)[:, None] + np.arange(-W, 0)).reshape(-1)), torch.int64))
                got = q.index_select(0, rows).view(len(whole), W, q.shape[1], q.shape[2])  # (M, W, H_q, D)
                self._fresh[(layer, key)] = ({m.req.request_id: i for i, m in enumerate(whole)}, got)

    def __call__(self, layer: int, q: torch.Tensor, attn: PoolAttention) -> None:
        """After the layer attended: evict (and park, and recall). Batched layers only take
        their queries here; their eviction runs when the batch is full or at the last layer
        (nothing reads a layer's cache again in this forward once it has attended)."""
        meta = attn.meta
        for key, group in self.groups.items():
            pol = group.policy
            members = [m for m in group.members if (m.evict_layers[layer] or pol.stateful) and not self._recalls_now(m, layer)]
            if members:
                queries = self._queries(pol, members, layer, q, meta) if pol.needs_queries else None
                if self._batches(pol):
                    self._pending.setdefault(key, []).append((layer, members, queries))
                    tokens = sum(meta.lens[m.b][layer] + m.n for m in members)
                    self._pending_bytes[key] = self._pending_bytes.get(key, 0) + 2 * tokens * self._token_bytes
                    if self._pending_bytes[key] >= self.layer_batch_bytes:
                        self._flush(key, meta)
                else:
                    self._score_and_compact(pol, [(layer, members, queries)], meta)
            if layer == self.num_layers - 1:
                self._flush(key, meta)
            self._recall_groups(layer, key, False, q, meta)

    @property
    def _token_bytes(self) -> int:
        """One token's K (or V) in one layer."""
        k = self.cache.k
        return k.shape[2] * k.shape[3] * k.element_size()

    def _batches(self, pol: EvictionPolicy) -> bool:
        # a stateful policy's queries are the whole chunk's (obs_window None): too large to hold
        return self.layer_batch_bytes > 0 and pol.rows_independent and not pol.stateful and (
            not pol.needs_queries or pol.obs_window is not None)

    def _flush(self, key: str, meta) -> None:
        jobs = self._pending.pop(key, None)
        self._pending_bytes.pop(key, None)
        if jobs:
            self._score_and_compact(self.groups[key].policy, jobs, meta)

    def _score_and_compact(self, pol: EvictionPolicy, jobs: list[tuple[int, list[_Member], tuple | None]], meta) -> None:
        """Evict the ``jobs`` (layer, members, their queries) of one policy in one batch: a
        row per (layer, member), one gather of their keys, one score, one top-k, one scatter."""
        cache, dev = self.cache, self.cache.device
        stage = cache.stager.to_device  # every index goes up staged: a list index would sync
        rows = [(layer, m) for layer, members, _ in jobs for m in members]
        lens = [meta.lens[m.b][layer] + m.n for layer, m in rows]  # held after this step's writes
        T = max(lens)
        bs = tuple(m.b for _, m in rows)
        single = len(jobs) == 1
        layer = jobs[0][0] if single else -1

        def rows_and_mask():
            slots = meta.slots.index_select(0, stage(list(bs), torch.int64))[:, :T]  # (R, T); pad entries are valid slots of the row
            return slots, torch.arange(T, device=dev)[None, :] < stage(lens, torch.int64)[:, None]  # (R, T)

        slots, key_mask = self._shared(("score", bs, tuple(lens)), rows_and_mask)
        layers = None if single else np.array([lr for lr, _ in rows], dtype=np.int64)
        if pol.stateful and cache.state is None:
            cache.ensure_state()
        pool = self._pool(layer if layers is None else None)
        R, H = len(rows), cache.k.shape[2]

        def head_major():
            # every (slot, head) of the rows, head-major: the gathers come out (R, H_kv, T[, D])
            # contiguous, the layout the scoring and the top-k read, instead of a transposed
            # view that each later operator reads through strides
            at = slots if layers is None else slots + self._layer_offsets(layers)[:, None]  # (R, T) slots in ``pool``
            return (at[:, None, :] * H + torch.arange(H, device=dev)[None, :, None]).view(-1)  # (R * H_kv * T,)

        heads = self._shared(("heads", bs, tuple(lens), None if layers is None else layers.tobytes()), head_major)

        def gather(t: torch.Tensor) -> torch.Tensor:  # (S, H_kv[, D]) -> (R, H_kv, T[, D])
            return t.flatten(0, 1).index_select(0, heads).view(R, H, T, *t.shape[2:])

        keys = gather(pool.k)  # (R, H_kv, T, D)
        values = gather(pool.v)
        key_pos = gather(pool.pos).to(torch.int64)  # (R, H_kv, T)

        queries = q_pos = q_mask = None
        if pol.needs_queries:
            parts = [qs for _, _, qs in jobs]
            queries, q_pos, q_mask = parts[0] if single else (torch.cat([p[i] for p in parts]) for i in range(3))
        state = None
        if pol.stateful:
            held = stage([meta.lens[m.b][lr] for lr, m in rows], torch.int64)
            old = torch.arange(T, device=dev)[None, :] < held[:, None]  # new keys start at 0
            state = gather(pool.state) * old[:, None, :]  # (R, H_kv, T)
        ctx = ScoreContext(keys, values if pol.needs_values else None, key_pos, key_mask, queries, q_pos, q_mask, state,
                           layer, self.num_layers)
        result = pol.score(ctx)

        # rows that do not evict keep everything (stateful policies still update their state);
        # every count is known on the host, so nothing here waits for the GPU
        keep = [min(m.req.layer_budgets[lr], ln) if m.evict_layers[lr] else ln for (lr, m), ln in zip(rows, lens)]
        plan = self._shared(("plan", bs, tuple(lens), tuple(keep), pol.sink, pol.window), lambda: keep_plan(
            key_mask, stage(keep, torch.int64), pol.sink, pol.window, max_keep=max(keep), uniform=len(set(keep)) == 1))
        keep_idx = select_planned(result.scores, plan)
        members = [m for _, m in rows]
        self._keep_front(layer if single else layers, meta, members, np.asarray(keep, dtype=np.int64), keep_idx, keys, values,
                         key_pos, result.state)
        parking = [i for i, (lr, m) in enumerate(rows) if m.recall and m.evict_layers[lr]]
        if parking:
            if len(parking) == len(rows):
                # every row parks (the rule when recall is on): no copy. On the H200 the
                # index_select of keys and values cost 9.3 ms of a 235 ms W1 prefill step.
                sel = lambda t: t  # noqa: E731
            else:
                pidx = self._shared(("park", tuple(parking)), lambda: stage(parking, torch.int64))
                sel = lambda t: None if t is None else t.index_select(0, pidx)  # noqa: E731
            self._park(
                layer if single else [rows[i][0] for i in parking], [members[i] for i in parking],
                [lens[i] - keep[i] for i in parking], sel(keep_idx), sel(key_mask), sel(keys), sel(values), sel(key_pos),
                sel(result.state),
            )
        for (lr, m), ln, kl in zip(rows, lens, keep):
            if m.evict_layers[lr]:
                self._shrunk(m, lr, ln, kl)

    def _pool(self, layer: int | None) -> _PoolLayer:
        """The pool's tensors a batch indexes: one layer's (S, H_kv[, D]), or with ``None``
        (rows of several layers) every layer's flattened to (L * S, H_kv[, D])."""
        cache = self.cache
        if layer is None:
            flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731
            return _PoolLayer(flat(cache.k), flat(cache.v), flat(cache.pos), flat(cache.state))
        return _PoolLayer(cache.k[layer], cache.v[layer], cache.pos[layer], None if cache.state is None else cache.state[layer])

    def _layer_offsets(self, layers: np.ndarray) -> torch.Tensor:
        """(R,) where each row's layer starts in the flattened pool, in slots."""
        S = self.cache.k.shape[1]
        return self._shared(("layers", layers.tobytes()), lambda: self.cache.stager.to_device(torch.from_numpy(layers * S), torch.int64))

    def _shrunk(self, m: _Member, layer: int, held: int, kept: int) -> None:
        """The layer of ``m`` goes from ``held`` tokens in the pool to ``kept`` (at finish)."""
        nl = self.new_lens.setdefault(m.req.request_id, [None] * self.num_layers)
        nl[layer] = kept
        self.evicted_tokens += held - kept

    def _keep_front(self, layer: int | np.ndarray, meta, members: list[_Member], keep: np.ndarray, keep_idx: torch.Tensor,
                    keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, state: torch.Tensor | None,
                    values_at: torch.Tensor | None = None) -> None:
        """Write row i's ``keep[i]`` kept tokens (``keep_idx`` (B, H, K) into keys, values
        (B, H, T, D) and pos, state (B, H, T)) to the first ``keep[i]`` slots of its member's
        row of the pool in ``layer`` (or in ``layer[i]``, an array with a layer per row), per
        head: the kept tokens move to the front. ``values_at`` (B, H, T): where each index of
        the keys' order is in ``values``, when values are in another order."""
        stage = self.cache.stager.to_device
        b_of = np.array([m.b for m in members], dtype=np.int64)
        single = not isinstance(layer, np.ndarray)

        def places():
            rows, cols = _ragged(keep)  # (M,) row of each kept token and its place in the member's row
            rows_t, cols_t = stage(torch.from_numpy(rows), torch.int64), stage(torch.from_numpy(cols), torch.int64)
            dst = meta.slots[stage(torch.from_numpy(b_of[rows]), torch.int64), cols_t]
            if not single:  # into the flattened (L * S) pool
                dst = dst + self._layer_offsets(layer).index_select(0, rows_t)
            return dst, rows_t, cols_t

        key = ("front", b_of.tobytes(), keep.tobytes()) + (() if single else (layer.tobytes(),))
        dst, rows, cols = self._shared(key, places)
        pool = self._pool(layer if single else None)
        gidx = keep_idx[..., None].expand(-1, -1, -1, keys.shape[-1])
        take = lambda t, ix: t.gather(2, ix)[rows, :, cols]  # noqa: E731  (B, H, K[, D]) -> (M, H[, D])
        pool.k.index_copy_(0, dst, take(keys, gidx))
        if values_at is not None:
            gidx = values_at.gather(2, keep_idx)[..., None].expand(-1, -1, -1, values.shape[-1])
        pool.v.index_copy_(0, dst, take(values, gidx))
        pool.pos.index_copy_(0, dst, take(pos, keep_idx).to(torch.int32))
        if state is not None:
            pool.state.index_copy_(0, dst, take(state, keep_idx))

    @staticmethod
    def _dropped(keep_idx: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Indices of the keys ``keep_idx`` leaves out, in position order: (B, H, T) with the
        dropped ones first."""
        H = keep_idx.shape[1]
        kept = key_mask.logical_not()[:, None, :].repeat(1, H, 1)  # (B, H, T): padding is never dropped
        kept.scatter_(2, keep_idx, True)  # padding entries repeat a kept index: harmless
        # 0 for the dropped keys, 1 for the others; stable: position order among each
        return torch.sort(kept.view(torch.int8), dim=-1, stable=True).indices

    def _park(self, layer, members, counts, keep_idx, key_mask, keys, values, key_pos, state, replace: bool = False,
              values_at: torch.Tensor | None = None) -> None:
        """Send what the layer (``layer``, or ``layer[i]`` for row i) just dropped (``counts[i]``
        tokens of member i) to the host store, in one gather for all rows. keep_idx (B, H, K);
        keys, values (B, H, T, D); key_pos, state (B, H, T).
        ``replace``: these become the layer's whole parked run instead of being appended.
        ``values_at``: as in ``_keep_front``."""
        if replace:
            for m in members:
                self.host.seqs[m.req.request_id].lens[layer] = 0
        cmax = max(counts)
        if cmax == 0:
            return
        idx = self._dropped(keep_idx, key_mask)[:, :, :cmax]  # (B, H, C)

        def take(t: torch.Tensor, at: torch.Tensor = idx) -> torch.Tensor:  # (B, H, T[, D]) -> (B, C, H[, D]), one gather for all
            ix = at[..., None].expand(-1, -1, -1, t.shape[-1]) if t.dim() == 4 else at
            return t.gather(2, ix).transpose(1, 2)  # the store packs them into records in one kernel

        # the store packs a row into (c, H) records: one copy per member and host run
        items = [(m.req.request_id, i, c) for i, (m, c) in enumerate(zip(members, counts)) if c]
        if not isinstance(layer, int):
            layer = [layer[i] for i, c in enumerate(counts) if c]
        v = take(values) if values_at is None else take(values, values_at.gather(2, idx))
        self.host.park(layer, items, take(keys), v, take(key_pos), None if state is None else take(state))

    def _recall_group(self, layer: int, pol: EvictionPolicy, members: list[_Member], staged: StagedRun, q: torch.Tensor,
                      meta, before: bool) -> None:
        """Re-select a group of recall requests in one layer from the union of their held and
        parked tokens, scored with the final observation window, batched over the group.

        ``before`` (``recalled``, before the chunk attends): the union is the held tokens plus
        the parked ones, each keeps as many as it held and the rest is parked back. Otherwise
        (after the last chunk attended): held + the chunk's tokens + parked, each keeps its
        budget, and its parked copy is done with."""
        cache, dev = self.cache, self.cache.device
        stage = cache.stager.to_device
        B, D = len(members), cache.head_dim
        held = np.array([meta.lens[m.b][layer] for m in members], dtype=np.int64)
        T = held if before else held + np.array([m.n for m in members], dtype=np.int64)  # pool tokens in the union
        P = np.array(staged.counts, dtype=np.int64)  # parked tokens
        U = P + T
        Um = int(U.max())
        # flat union index (member * Um + column) of every token: parked first, then the pool's,
        # as the unbatched concatenation had them (the sort below is stable)
        b_of = np.array([m.b for m in members], dtype=np.int64)
        t_row, t_j = _ragged(T)  # t_j: index among the member's pool tokens

        def places():
            p_row, p_col = _ragged(P)
            p_at = stage(torch.from_numpy(p_row * Um + p_col), torch.int64)
            t_at = stage(torch.from_numpy(t_row * Um + P[t_row] + t_j), torch.int64)
            t_slots = meta.slots[stage(torch.from_numpy(b_of[t_row]), torch.int64), stage(torch.from_numpy(t_j), torch.int64)]  # (ΣT,)
            return p_at, t_at, t_slots

        p_at, t_at, t_slots = self._shared(("union", b_of.tobytes(), P.tobytes(), T.tobytes()), places)

        def union(parked: torch.Tensor, pooled: torch.Tensor, fill=0) -> torch.Tensor:  # -> (B, Um, H[, D])
            shape = (B * Um, *parked.shape[1:])
            out = torch.empty(shape, dtype=pooled.dtype, device=dev) if fill is None else torch.full(shape, fill, dtype=pooled.dtype, device=dev)
            out.index_copy_(0, p_at, parked.to(pooled.dtype))
            out.index_copy_(0, t_at, pooled)
            return out.view(B, Um, *parked.shape[1:])

        pos = union(staged.pos, cache.pos[layer].index_select(0, t_slots).to(torch.int64), fill=torch.iinfo(torch.int64).max)
        order = pos.argsort(dim=1, stable=True)  # (B, Um, H): position order per head, padding last
        g4 = order[..., None].expand(-1, -1, -1, D)
        keys = union(staged.k, cache.k[layer].index_select(0, t_slots)).gather(1, g4).transpose(1, 2)  # (B, H, Um, D)
        # Values stay in union order: no policy reads them, and only the kept (and, before
        # attention, the dropped) ones are gathered, through ``order`` (sorted index -> union
        # index), which saves sorting the whole union. Padding rows are never read: empty.
        values = union(staged.v, cache.v[layer].index_select(0, t_slots), fill=None).transpose(1, 2)  # (B, H, Um, D)
        to_union = order.transpose(1, 2)  # (B, H, Um)
        pos = pos.gather(1, order).transpose(1, 2)  # (B, H, Um)
        state = None
        if pol.stateful:
            old = stage(torch.from_numpy(t_j < held[t_row]), torch.bool)  # this chunk's keys start at 0
            cur = cache.state[layer].index_select(0, t_slots) * old[:, None]
            state = union(staged.state, cur).gather(1, order).transpose(1, 2)
        key_mask = self._shared(("umask", U.tobytes()), lambda: torch.arange(Um, device=dev)[None, :] < stage(torch.from_numpy(U), torch.int64)[:, None])  # (B, Um)
        queries = q_pos = q_mask = None
        if pol.needs_queries:
            queries, q_pos, q_mask = self._queries(pol, members, layer, q, meta)
        if pol.needs_values:  # the contract: values aligned with keys
            values, to_union = values.gather(2, to_union[..., None].expand(-1, -1, -1, D)), None
        result = pol.score(ScoreContext(keys, values if to_union is None else None, pos, key_mask, queries, q_pos, q_mask, state,
                                        layer, self.num_layers))

        budgets = held if before else np.array([m.req.layer_budgets[layer] for m in members], dtype=np.int64)
        keep = np.minimum(budgets, U)  # known on the host: no device sync
        plan = self._shared(("uplan", U.tobytes(), keep.tobytes(), pol.sink, pol.window), lambda: keep_plan(
            key_mask, stage(torch.from_numpy(keep), torch.int64), pol.sink, pol.window, max_keep=int(keep.max()),
            uniform=bool((keep == keep[0]).all())))
        keep_idx = select_planned(result.scores, plan)
        self._keep_front(layer, meta, members, keep, keep_idx, keys, values, pos, result.state, values_at=to_union)
        if before:
            self._park(layer, members, (U - keep).tolist(), keep_idx, key_mask, keys, values, pos, result.state, replace=True,
                       values_at=to_union)
            return
        for m, t, k in zip(members, T.tolist(), keep.tolist()):
            self._shrunk(m, layer, t, k)  # GPU-side accounting: parked tokens were counted when parked

    def _queries(self, pol: EvictionPolicy, members: list[_Member], layer: int, q: torch.Tensor, meta):
        dev = q.device
        if pol.obs_window is not None:
            fresh = self._fresh.get((layer, repr(pol)))  # groups are keyed by their policy's repr
            rids = tuple(m.req.request_id for m in members)
            wins = [self.windows[rid] for rid in rids]
            W = pol.obs_window
            at = [fresh[0].get(rid) for rid in rids] if fresh is not None else [None]
            if None not in at:  # every member's window is this step's gather
                got = fresh[1]
                if at != list(range(len(got))):
                    got = got.index_select(0, self._shared(("wsel", tuple(at)), lambda: self.cache.stager.to_device(at, torch.int64)))
            else:
                if fresh is not None:  # some members shifted their stored window: write the gathered ones too
                    for rid, i in fresh[0].items():
                        self.windows[rid].replace(fresh[1][i], layer)
                got = torch.stack([w.q[layer] for w in wins])
            queries = got.permute(0, 2, 1, 3)  # (B, H_q, W, D)
            q_pos = self._shared(("qpos", rids), lambda: torch.stack([w.pos for w in wins]))  # (B, W): the same in every layer
            filled = tuple(w.filled for w in wins)
            q_mask = self._shared(("window", W, filled), lambda: torch.arange(W, device=dev)[None, :]
                                  >= (W - self.cache.stager.to_device(list(filled), torch.int64))[:, None])  # newest at the end
            return queries, q_pos, q_mask
        # every query of this step (stateful policies fold them in step by step)
        W = max(m.n for m in members)
        H_q, D = q.shape[1], q.shape[2]
        queries = q.new_zeros(len(members), W, H_q, D)
        q_pos = torch.zeros(len(members), W, dtype=torch.int64, device=dev)
        q_mask = torch.zeros(len(members), W, dtype=torch.bool, device=dev)
        for i, m in enumerate(members):
            s, e = meta.query_start[m.b], meta.query_start[m.b + 1]
            queries[i, : m.n] = q[s:e]
            q_pos[i, : m.n] = meta.positions[s:e]
            q_mask[i, : m.n] = True
        return queries.permute(0, 2, 1, 3), q_pos, q_mask

    # ---- after the forward -------------------------------------------------------------------

    def finish(self) -> None:
        """Lower the held lengths of the layers that evicted (after the step's commit)."""
        if self._recall_queue:  # the plan and the hooks disagree: a bug, not a user error
            raise RuntimeError(f"recall re-selections planned but not run: {[(l, b) for l, _, b, _ in self._recall_queue]}")
        if self._pending:  # the last layer flushes every batch
            raise RuntimeError(f"eviction batches never run: layers {[[j[0] for j in v] for v in self._pending.values()]}")
        for key in {k for _, k in self._fresh}:  # the gathered windows, all layers of a member at once
            layers = [self._fresh[(layer, key)] for layer in range(self.num_layers)]
            stacked = torch.stack([got for _, got in layers], dim=1)  # (M, L, W, H_q, D)
            for rid, i in layers[0][0].items():
                self.windows[rid].replace(stacked[i])
        self._fresh.clear()
        for rid, lens in self.new_lens.items():
            cur = self.cache.seqs[rid].lens
            self.cache.set_lens(rid, [c if n is None else n for c, n in zip(cur, lens)])
        if self.host is not None:  # prefill is over for these: their parked copy goes
            self.host.mark_parks()
            for group in self.groups.values():
                for m in group.members:
                    if m.recall and m.last_chunk:
                        self.host.free(m.req.request_id)

"""Recall: evicted prefill K/V parked in host memory, re-selected at the last chunk."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from batchmax.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from batchmax.policies import EvictionPolicy, ScoreContext, ScoreResult
from tests.helpers import PeakRecorder, random_prompts

BUDGET = 64


def _greedy(n=6, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def _engine(path, **kw):
    return LLMEngine(EngineConfig.from_kwargs(model=str(path), device="cpu", num_tokens=8192, kv_budget=BUDGET, **kw))


def _kept_after_prefill(path, prompt, policy, **kw):
    """Per layer, per KV head: the sorted positions held once the prompt is read."""
    e = _engine(path, kv_policy=policy, **kw)
    e.add_request("a", prompt, _greedy(3))
    while not e.requests["a"].output_token_ids:
        e.step()
    c = e.cache
    slots = c.slots(torch.from_numpy(c.block_table(["a"])))[0]
    kept = [[sorted(h) for h in c.pos[l, slots[: c.seqs["a"].lens[l]]].T.tolist()] for l in range(c.num_layers)]
    return kept, e


@pytest.mark.parametrize("policy", ["snapkv", "tova", "pyramid", "knorm", "streaming"])
@pytest.mark.parametrize("recall_attention", ["compressed", "recalled"])
def test_recalled_selection_equals_one_shot(policy, recall_attention, tiny_llama):
    """Layer 0's keys and queries depend on the tokens alone, so there recall over 32-token
    chunks must select exactly what one eviction after the whole prompt selects."""
    prompt = random_prompts([300], seed=3)[0]
    one_shot, _ = _kept_after_prefill(tiny_llama, prompt, policy, chunk_size=512)
    recalled, eng = _kept_after_prefill(tiny_llama, prompt, policy, chunk_size=32, kv_recall=True, recall_attention=recall_attention)
    assert recalled[0] == one_shot[0]
    plain, _ = _kept_after_prefill(tiny_llama, prompt, policy, chunk_size=32)
    if policy in ("snapkv", "tova", "pyramid"):  # attention-based: chunked eviction alone differs
        assert plain[0] != one_shot[0]
    assert "a" not in eng.scheduler.host.seqs  # parked copy freed once prefill ended


@pytest.mark.parametrize("recall_attention", ["compressed", "recalled"])
def test_gpu_bound_holds_with_recall(recall_attention, tiny_llama, monkeypatch):
    rec = PeakRecorder(monkeypatch)
    chunk = 32
    e = _engine(tiny_llama, kv_policy="snapkv", chunk_size=chunk, kv_recall=True, recall_attention=recall_attention)
    rec.engine = e
    prompts = random_prompts([400, 250, 90], seed=8)
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, _greedy(5))
    host_seen = 0.0
    while e.has_unfinished_requests():
        e.step()
        host_seen = max(host_seen, e.stats().host_kv_usage)
        for r in e.scheduler.running:
            if r.num_computed_tokens < r.num_prompt_tokens:
                assert max(e.cache.seqs[r.request_id].lens) <= BUDGET
            elif r.request_id in e.scheduler.host.seqs:
                raise AssertionError("host copy kept after prefill")
    assert host_seen > 0
    assert max(rec.prefill.values()) <= BUDGET + chunk
    assert e.stats().host_kv_usage == 0.0 and e.cache.usage == 0.0


def test_host_freed_on_abort(tiny_llama):
    e = _engine(tiny_llama, kv_policy="snapkv", chunk_size=32, kv_recall=True)
    e.add_request("a", random_prompts([500], seed=1)[0], _greedy(5))
    for _ in range(6):
        e.step()
    assert e.scheduler.host.parked("a") > 0 and e.stats().host_kv_usage > 0
    e.abort_request("a")
    assert "a" not in e.scheduler.host.seqs and e.stats().host_kv_usage == 0.0
    assert "a" not in e.cache.seqs


def test_full_host_store_falls_back_to_plain_eviction(tiny_llama):
    prompts = random_prompts([300, 280], seed=4)
    plain = LLM(str(tiny_llama), device="cpu", chunk_size=32, num_tokens=8192, kv_policy="snapkv", kv_budget=BUDGET).generate(prompts, _greedy())
    # room to park one request's prompt, not two
    llm = LLM(str(tiny_llama), device="cpu", chunk_size=32, num_tokens=8192, kv_policy="snapkv", kv_budget=BUDGET, kv_recall=True, host_kv_tokens=256)
    outs = llm.generate(prompts, _greedy())
    st = llm.engine.stats()
    assert st.num_recall_fallbacks_total == 1
    assert outs[1].token_ids == plain[1].token_ids  # the fallback ran plain eviction
    assert st.host_kv_usage == 0.0


def test_recall_per_request_switch(tiny_llama):
    prompt = random_prompts([300], seed=3)[0]
    llm = LLM(str(tiny_llama), device="cpu", chunk_size=32, num_tokens=8192, kv_policy="snapkv", kv_budget=BUDGET)
    off = llm.generate([prompt], _greedy())[0].token_ids
    on = llm.generate([prompt], _greedy(kv_recall=True))[0].token_ids
    on_engine = LLM(str(tiny_llama), device="cpu", chunk_size=32, num_tokens=8192, kv_policy="snapkv", kv_budget=BUDGET, kv_recall=True)
    assert on_engine.generate([prompt], _greedy())[0].token_ids == on
    assert on_engine.generate([prompt], _greedy(kv_recall=False))[0].token_ids == off


def _kept_many(path, prompts, policy, **kw):
    """Kept positions (per request, layer, KV head) once every prompt is read, and the peak
    number of parked tokens any step held on the device."""
    from batchmax.engine import evictor as evictor_mod

    peaks, loads = [], []
    finish, load = evictor_mod.Evictor.finish, evictor_mod.HostKVStore.load

    def recording_finish(self):
        peaks.append(self.peak_staged_tokens)
        return finish(self)

    def recording_load(self, request_ids, layer, with_state=True):
        loads.append(len(request_ids))
        return load(self, request_ids, layer, with_state)

    evictor_mod.Evictor.finish, evictor_mod.HostKVStore.load = recording_finish, recording_load
    try:
        e = _engine(path, kv_policy=policy, **kw)
        for i, p in enumerate(prompts):
            e.add_request(f"r{i}", p, _greedy(3))
        while not all(e.requests[f"r{i}"].output_token_ids for i in range(len(prompts))):
            e.step()
    finally:
        evictor_mod.Evictor.finish, evictor_mod.HostKVStore.load = finish, load
    c, kept = e.cache, []
    for i in range(len(prompts)):
        rid = f"r{i}"
        slots = c.slots(torch.from_numpy(c.block_table([rid])))[0]
        kept.append([[sorted(h) for h in c.pos[l, slots[: c.seqs[rid].lens[l]]].T.tolist()] for l in range(c.num_layers)])
    return kept, max(peaks, default=0), loads


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "pyramid"])
@pytest.mark.parametrize("recall_attention", ["compressed", "recalled"])
def test_batched_recall_equals_one_request_at_a_time(policy, recall_attention, tiny_llama):
    """Three prompts completing in the same step are re-selected together (and, with a small
    staging bound, in several groups whose loads overlap): each keeps exactly what it keeps
    when it is alone, in every layer."""
    prompts = random_prompts([300, 300, 300], seed=11)
    kw = dict(chunk_size=32, kv_recall=True, recall_attention=recall_attention)
    alone = [_kept_many(tiny_llama, [p], policy, **kw)[0][0] for p in prompts]
    together, _, loads = _kept_many(tiny_llama, prompts, policy, **kw)
    assert together == alone
    assert max(loads) == 3  # one load for the three
    # room for one request's parked layer (fewer than its 300 tokens; pyramid's budgets vary
    # by layer), not for two (each parks more than 150: the budgets are under 150)
    cap = 300
    split, peak, loads = _kept_many(tiny_llama, prompts, policy, recall_stage_tokens=cap, **kw)
    assert split == alone
    assert max(loads) == 1 and 0 < peak <= 2 * cap  # one request per group; the next one loading


def test_host_store_contiguous_runs_and_round_trip():
    """A reservation takes one contiguous run of blocks when there is one, so a layer's parked
    run is one slice (one copy of its records); parks append, and a group load returns every
    request's run in order, also when the free blocks are fragmented."""
    from batchmax.engine.host_store import HOST_BLOCK, HostKVStore

    H, D = 2, 4
    store = HostKVStore(2, H, D, 8 * HOST_BLOCK, torch.float32, torch.device("cpu"), stage_tokens=4096)
    assert store.reserve("a", 2 * HOST_BLOCK + 5)  # 3 blocks
    assert store.reserve("b", HOST_BLOCK)
    assert list(store._runs("a", 0, 2 * HOST_BLOCK + 5)) == [(0, store.seqs["a"].blocks[0] * HOST_BLOCK, 2 * HOST_BLOCK + 5)]
    assert store.reserve("c", 2 * HOST_BLOCK)
    store.free("b")  # free blocks: b's one and the last two, no run of three
    assert store.reserve("d", 3 * HOST_BLOCK)
    assert len(list(store._runs("d", 0, 3 * HOST_BLOCK))) > 1
    g = torch.Generator().manual_seed(0)
    sent = {}
    for rid, n in (("a", 2 * HOST_BLOCK + 5), ("d", 3 * HOST_BLOCK)):
        parts = []
        for take in (n // 3, n - n // 3):  # two parks: the second appends
            k, v = torch.randn(1, take, H, D, generator=g), torch.randn(1, take, H, D, generator=g)
            pos = torch.randint(0, 10**6, (1, take, H), generator=g)
            store.park(1, [(rid, 0, take)], k, v, pos, None)
            parts.append((k[0], v[0], pos[0]))
        sent[rid] = [torch.cat(t) for t in zip(*parts)]
    got = store.load(["d", "a"], 1, with_state=False).ready()
    assert got.counts == [3 * HOST_BLOCK, 2 * HOST_BLOCK + 5] and got.state is None
    want = [torch.cat([sent["d"][i], sent["a"][i]]) for i in range(3)]
    assert torch.equal(got.k, want[0]) and torch.equal(got.v, want[1]) and torch.equal(got.pos.long(), want[2])
    assert store.seqs["a"].lens == [0, 2 * HOST_BLOCK + 5]


@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 4), (torch.float8_e4m3fn, 3)])
def test_host_store_records_round_trip_every_field(dtype, D):
    """One record per token and head holds k, v, pos and state: a park of strided (gathered,
    transposed) sources and a load give every field back bit for bit, also for a record whose
    k and v bytes need padding before the 4-byte pos (an odd head of 1-byte elements)."""
    from batchmax.engine.host_store import HostKVStore

    H, C = 3, 40
    store = HostKVStore(2, H, D, 4096, dtype, torch.device("cpu"))
    assert store.reserve("r", C)
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, H, C, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))  # (1, C, H, D), strided
    pos = torch.randint(0, 2**31 - 1, (1, H, C), generator=g).transpose(1, 2)
    state = torch.rand(1, H, C, generator=g).transpose(1, 2)
    store.park(0, [("r", 0, C)], k, v, pos, state)
    got = store.load(["r"], 0).ready()
    for a, b in ((got.k, k[0]), (got.v, v[0])):
        assert torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))
    assert torch.equal(got.pos.long(), pos[0]) and torch.equal(got.state, state[0])
    assert store.load(["r"], 0, with_state=False).ready().state is None
    # the park packs on 4-byte words where k is whole words (bf16, even D), on bytes otherwise
    # (and for a source a word view cannot take: an odd element offset): the same bytes
    odd = torch.randn(1, C * H * D + 1, generator=g).to(dtype)[:, 1:].view(1, C, H, D)
    for src in (k, odd):
        assert torch.equal(store._pack(src, v, pos, state), store._cat(torch.uint8, src, v, pos, state))  # noqa: SLF001
        assert torch.equal(store._pack(src, v, pos, None)[..., : 2 * store._kb + 4], store._cat(torch.uint8, src, v, pos, None)[..., : 2 * store._kb + 4])  # noqa: SLF001


@dataclass
class _ValueNorm(EvictionPolicy):
    """Keeps the largest values: a policy that reads ``ctx.values``."""

    name = "vnorm_test"
    needs_queries = False
    needs_values = True

    def score(self, ctx: ScoreContext) -> ScoreResult:
        assert ctx.values is not None and ctx.values.shape == ctx.keys.shape
        return ScoreResult(torch.linalg.vector_norm(ctx.values.float(), dim=-1))  # (B, H_kv, T)


@pytest.mark.parametrize("recall_attention", ["compressed", "recalled"])
def test_a_policy_reading_values_gets_them_aligned_with_keys(recall_attention, tiny_llama, monkeypatch):
    """Recall sorts the union's values only for policies with ``needs_values``; the others
    get ``values=None`` and the kept values are gathered from the unsorted union. Layer 0's
    values depend on the tokens alone: scored by value norm, recall keeps what one eviction
    after the whole prompt keeps."""
    from batchmax.policies import registry

    monkeypatch.setitem(registry._FACTORIES, "vnorm_test", _ValueNorm)
    monkeypatch.setitem(registry._FIELDS, "vnorm_test", {"sink", "window"})
    prompt = random_prompts([300], seed=5)[0]
    one_shot, _ = _kept_after_prefill(tiny_llama, prompt, "vnorm_test", chunk_size=512)
    recalled, _ = _kept_after_prefill(tiny_llama, prompt, "vnorm_test", chunk_size=32, kv_recall=True, recall_attention=recall_attention)
    assert recalled[0] == one_shot[0]


def _layer0_kv_by_position(eng, rid: str) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(head, position) -> (key, value) held by layer 0 of request ``rid``."""
    c = eng.cache
    slots = c.slots(torch.from_numpy(c.block_table([rid])))[0][: c.seqs[rid].lens[0]]
    pos, k, v = c.pos[0, slots], c.k[0, slots], c.v[0, slots]  # (n, H), (n, H, D)
    return {(h, int(pos[i, h])): (k[i, h], v[i, h]) for i in range(pos.shape[0]) for h in range(pos.shape[1])}


@pytest.mark.parametrize("policy", ["snapkv", "knorm"])
@pytest.mark.parametrize("recall_attention", ["compressed", "recalled"])
def test_recalled_tokens_bring_their_own_keys_and_values(policy, recall_attention, tiny_llama):
    """Not only the kept positions: every kept token's key and value in layer 0 (which depend
    on the tokens alone) are those of the one-shot eviction, so nothing is gathered from
    another token's row."""
    prompt = random_prompts([300], seed=3)[0]
    _, one = _kept_after_prefill(tiny_llama, prompt, policy, chunk_size=512)
    _, rec = _kept_after_prefill(tiny_llama, prompt, policy, chunk_size=32, kv_recall=True, recall_attention=recall_attention)
    a, b = _layer0_kv_by_position(one, "a"), _layer0_kv_by_position(rec, "a")
    assert a.keys() == b.keys()
    for key, (k, v) in a.items():
        torch.testing.assert_close(b[key][0], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[key][1], v, rtol=1e-5, atol=1e-5)


def test_recall_and_plain_requests_evicting_in_one_step_keep_what_they_keep_alone(tiny_llama):
    """A step whose policy group mixes recall and plain requests parks only the recall ones'
    dropped tokens (a subset of the group's rows): each keeps what it keeps alone."""
    prompts = random_prompts([300, 300], seed=5)

    def kept(reqs):
        e = _engine(tiny_llama, kv_policy="snapkv", chunk_size=32)
        for rid, p, recall in reqs:
            e.add_request(rid, p, _greedy(3, kv_recall=recall))
        while not all(e.requests[rid].output_token_ids for rid, _, _ in reqs):
            e.step()
        c, out = e.cache, {}
        for rid, _, _ in reqs:
            slots = c.slots(torch.from_numpy(c.block_table([rid])))[0]
            out[rid] = [[sorted(h) for h in c.pos[l, slots[: c.seqs[rid].lens[l]]].T.tolist()] for l in range(c.num_layers)]
        return out

    alone = {**kept([("a", prompts[0], True)]), **kept([("b", prompts[1], False)])}
    # the plain request first: the recall one's rows are not the group's first ones
    assert kept([("b", prompts[1], False), ("a", prompts[0], True)]) == alone
    assert alone["a"] != kept([("a", prompts[0], False)])["a"]  # recall changed what "a" keeps

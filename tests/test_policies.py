"""Eviction policies (policies/) and the keep-set selection (engine/eviction.py), on hand-built tensors."""
from __future__ import annotations

import math

import pytest
import torch

from batchmax.engine.eviction import select_keep
from batchmax.policies import (
    EvictionPolicy,
    H2OPolicy,
    KNormPolicy,
    PyramidPolicy,
    ScoreContext,
    SnapKVPolicy,
    StreamingPolicy,
    TOVAPolicy,
    attention_received,
    available_policies,
    get_policy,
    window_attention,
)


def make_ctx(
    keys,
    queries=None,
    key_positions=None,
    key_mask=None,
    query_positions=None,
    query_mask=None,
    state=None,
    values=None,
) -> ScoreContext:
    """Defaults: keys at positions 0..T-1, all real; queries are the last W positions, all real."""
    B, _, T, _ = keys.shape
    if key_positions is None:
        key_positions = torch.arange(T).expand(B, T).clone()
    if key_mask is None:
        key_mask = torch.ones(B, T, dtype=torch.bool)
    if queries is not None:
        W = queries.shape[2]
        if query_positions is None:
            query_positions = key_positions.amax(dim=1, keepdim=True) - W + 1 + torch.arange(W)
        if query_mask is None:
            query_mask = torch.ones(B, W, dtype=torch.bool)
    return ScoreContext(
        keys=keys,
        values=torch.zeros_like(keys) if values is None else values,
        key_positions=key_positions,
        key_mask=key_mask,
        queries=queries,
        query_positions=query_positions,
        query_mask=query_mask,
        state=state,
        layer_idx=0,
        num_layers=1,
    )


def one_hot_keys(B: int, H_kv: int, T: int, D: int | None = None) -> torch.Tensor:
    """Orthogonal unit keys: key t is e_t, so a query c·e_t attends (almost) only to key t."""
    D = D or T
    keys = torch.zeros(B, H_kv, T, D)
    keys[..., torch.arange(T), torch.arange(T)] = 1.0
    return keys


def naive_window_attention(ctx: ScoreContext) -> torch.Tensor:
    B, H_kv, T, D = ctx.keys.shape
    H_q, W = ctx.queries.shape[1:3]
    G = H_q // H_kv
    out = torch.zeros(B, H_kv, G, W, T)
    for b in range(B):
        for hq in range(H_q):
            h, g = divmod(hq, G)  # query heads of one KV head are contiguous (repeat_kv layout)
            for w in range(W):
                if not ctx.query_mask[b, w]:
                    continue
                qpos = ctx.query_positions[b, w]
                seen = [t for t in range(T) if ctx.key_mask[b, t] and ctx.key_positions[b, t] <= qpos]
                if not seen:
                    continue
                q = ctx.queries[b, hq, w].double()
                logits = torch.stack([q @ ctx.keys[b, h, t].double() for t in seen]) / math.sqrt(D)
                out[b, h, g, w, seen] = torch.softmax(logits, dim=0).float()
    return out


# --------------------------------------------------------------------------- window_attention


def ragged_ctx(seed: int = 0) -> ScoreContext:
    """Two requests, GQA 6 query / 2 KV heads; row 1 has 3 padded keys and a left-padded query,
    kept keys have gaps in their positions, and one query sees no key at all."""
    g = torch.Generator().manual_seed(seed)
    B, H_kv, G, W, T, D = 2, 2, 3, 4, 10, 8
    keys = torch.randn(B, H_kv, T, D, generator=g)
    queries = torch.randn(B, H_kv * G, W, D, generator=g)
    key_positions = torch.tensor([[0, 1, 2, 5, 8, 9, 10, 11, 12, 13], [3, 4, 6, 7, 9, 10, 11, 0, 0, 0]])
    key_mask = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
    query_positions = torch.tensor([[10, 11, 12, 13], [99, 2, 8, 11]])  # row 1, query 1 precedes every key
    query_mask = torch.tensor([[True] * 4, [False, True, True, True]])
    return make_ctx(keys, queries, key_positions, key_mask, query_positions, query_mask)


def test_window_attention_matches_naive_loop_with_gqa_causality_and_padding():
    ctx = ragged_ctx()
    attn = window_attention(ctx)
    assert attn.shape == (2, 2, 3, 4, 10) and attn.dtype == torch.float32
    torch.testing.assert_close(attn, naive_window_attention(ctx), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(attn).all()
    # causal: no attention to a key from the future or to a padded key
    future = ctx.key_positions[:, None, :] > ctx.query_positions[:, :, None]  # (B, W, T)
    assert (attn.masked_select(future[:, None, None].expand_as(attn)) == 0).all()
    assert (attn[1, ..., 7:] == 0).all()
    # a padded query and a query that sees no key give all-zero rows; others sum to 1
    assert (attn[1, :, :, 0] == 0).all() and (attn[1, :, :, 1] == 0).all()
    sums = attn.sum(-1)
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]))
    torch.testing.assert_close(sums[1, :, :, 2:], torch.ones_like(sums[1, :, :, 2:]))


def test_window_attention_computes_in_float32_from_bf16():
    ctx = ragged_ctx()
    ctx16 = make_ctx(ctx.keys.bfloat16(), ctx.queries.bfloat16(), ctx.key_positions, ctx.key_mask,
                     ctx.query_positions, ctx.query_mask)
    attn = window_attention(ctx16)
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn, window_attention(ctx), atol=2e-2, rtol=0)


def test_attention_received_blocks_equal_the_unblocked_sum():
    ctx = ragged_ctx()
    full = window_attention(ctx).sum(dim=(2, 3))  # (B, H_kv, T)
    torch.testing.assert_close(attention_received(ctx, query_block=3), full)
    torch.testing.assert_close(attention_received(ctx, query_block=1), full)


def test_policies_needing_queries_reject_missing_ones():
    ctx = make_ctx(one_hot_keys(1, 1, 8))
    for policy in (H2OPolicy(), TOVAPolicy(), SnapKVPolicy()):
        with pytest.raises(ValueError, match="needs queries"):
            policy.score(ctx)


# --------------------------------------------------------------------------- policies


def test_h2o_keeps_the_keys_that_received_most_attention_and_accumulates_state():
    B, H_kv, G, T, W = 1, 2, 2, 32, 8
    keys = one_hot_keys(B, H_kv, T)
    queries = torch.zeros(B, H_kv * G, W, T)
    queries[:, :, :, 7] = 20.0  # every query looks at key 7 ...
    queries[:, :, :, 12] = 19.0  # ... and a little less at key 12
    state = torch.zeros(B, H_kv, T)
    state[:, :, 3] = 0.5
    ctx = make_ctx(keys, queries, state=state)
    result = H2OPolicy().score(ctx)
    assert result.scores.shape == result.state.shape == (B, H_kv, T)
    torch.testing.assert_close(result.state, state + window_attention(ctx).sum(dim=(2, 3)))
    keep, _ = select_keep(result.scores, ctx.key_mask, torch.tensor([4 + 8 + 2]), sink=4, window=8)
    for h in range(H_kv):
        assert set(keep[0, h].tolist()) == set(range(4)) | {7, 12} | set(range(T - 8, T))


def test_h2o_normalises_by_how_many_queries_could_see_each_key():
    # Every query so far gave keys A (pos 5) and B (pos 15) the same attention a = 1/30; the
    # observed query (zero vector: uniform over its 30 keys) does too. A's raw sum is larger
    # only because A is older. C (pos 20) got twice as much per query and must win.
    T = 30
    keys = torch.randn(1, 1, T, 4, generator=torch.Generator().manual_seed(0))
    queries = torch.zeros(1, 1, 1, 4)
    a = 1.0 / T
    state = torch.zeros(1, 1, T)
    state[0, 0, 5] = a * (29 - 5)  # seen by queries 5..28
    state[0, 0, 15] = a * (29 - 15)
    state[0, 0, 20] = 2 * a * (29 - 20)
    result = H2OPolicy().score(make_ctx(keys, queries, state=state))
    s = result.scores[0, 0]
    assert result.state[0, 0, 5] > result.state[0, 0, 15]  # the raw sum would favour the older key
    torch.testing.assert_close(s[5], torch.tensor(a))
    torch.testing.assert_close(s[15], torch.tensor(a))
    assert s[20] > s[5] + 0.5 * a


def test_tova_uses_only_the_newest_real_query():
    T = 16
    keys = one_hot_keys(1, 1, T)
    queries = torch.zeros(1, 2, 3, T)  # G = 2
    queries[0, :, 0, 9] = 80.0  # padding slot (mask False) pointing at key 9, with the largest position
    queries[0, :, 1, 2] = 80.0  # older real query looks at key 2
    queries[0, :, 2, 5] = 80.0  # newest real query looks at key 5
    query_positions, query_mask = torch.tensor([[99, 14, 15]]), torch.tensor([[False, True, True]])
    ctx = make_ctx(keys, queries, query_positions=query_positions, query_mask=query_mask)
    scores = TOVAPolicy().score(ctx).scores
    assert scores.shape == (1, 1, T)
    assert scores[0, 0].argmax() == 5
    assert scores[0, 0, 2] < 1e-6 and scores[0, 0, 9] < 1e-6
    # exactly the newest query's attention, averaged over the G query heads
    newest = make_ctx(keys, queries[:, :, 2:], query_positions=torch.tensor([[15]]))
    torch.testing.assert_close(scores, window_attention(newest)[:, :, :, 0].mean(dim=2))


def test_snapkv_mean_over_heads_and_real_queries():
    ctx = ragged_ctx()
    scores = SnapKVPolicy(kernel=1).score(ctx).scores  # no pooling: the plain mean
    attn = window_attention(ctx)  # (B, H_kv, G, W, T)
    n_real = ctx.query_mask.sum(1).float()  # padded queries do not dilute the mean
    expected = attn.sum(dim=(2, 3)) / (attn.shape[2] * n_real)[:, None, None]
    torch.testing.assert_close(scores, expected)


def test_snapkv_max_pool_spreads_a_spike_to_two_neighbours_each_side():
    T = 24
    keys = one_hot_keys(1, 1, T)
    queries = torch.zeros(1, 1, 4, T)
    queries[..., 10] = 40.0  # all attention on key 10
    scores = SnapKVPolicy().score(make_ctx(keys, queries)).scores[0, 0]
    assert torch.allclose(scores[8:13], scores[10].expand(5))
    assert scores[10] > 0.99
    assert scores[7] < 0.01 and scores[13] < 0.01


def test_snapkv_padding_does_not_leak_into_real_keys():
    # Row 0 is the row alone; row 1 is the same request right-padded with keys that would
    # dominate attention if they were not masked. Real keys must score the same in both.
    T, pad = 12, 4
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, T, 8, generator=g)
    queries = torch.randn(1, 4, 3, 8, generator=g)
    alone = SnapKVPolicy().score(make_ctx(keys, queries)).scores  # (1, 2, T)

    loud = queries[0, ::2, -1:, :].expand(2, pad, 8) * 50  # keys aligned with the queries
    padded_keys = torch.cat([keys, loud[None]], dim=2)  # (1, 2, T + pad, 8)
    key_mask = torch.tensor([[True] * T + [False] * pad])
    key_positions = torch.cat([torch.arange(T), torch.zeros(pad, dtype=torch.long)])[None]
    query_positions = torch.arange(T - 3, T)[None]
    padded_ctx = make_ctx(padded_keys, queries, key_positions, key_mask, query_positions)
    padded = SnapKVPolicy().score(padded_ctx).scores
    torch.testing.assert_close(padded[..., :T], alone)


def test_knorm_prefers_small_norm_keys():
    keys = torch.zeros(1, 2, 5, 3)
    norms = torch.tensor([[3.0, 1.0, 5.0, 0.5, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    keys[0, :, :, 0] = norms
    scores = KNormPolicy().score(make_ctx(keys)).scores
    torch.testing.assert_close(scores[0], -norms)
    assert scores[0, 0].argmax() == 3 and scores[0, 1].argmax() == 0
    assert not KNormPolicy.needs_queries


def test_streaming_keeps_sinks_and_most_recent():
    B, T = 2, 40
    key_positions = torch.arange(T).expand(B, T) * 3  # gaps from earlier evictions
    ctx = make_ctx(torch.randn(B, 2, T, 4), key_positions=key_positions)
    scores = StreamingPolicy().score(ctx).scores
    assert scores.shape == (B, 2, T)
    keep, keep_len = select_keep(scores, ctx.key_mask, torch.tensor([20, 20]), sink=4, window=8)
    assert keep_len.tolist() == [20, 20]
    expected = list(range(4)) + list(range(T - 16, T))
    assert (keep == torch.tensor(expected)).all()


# --------------------------------------------------------------------------- budgets, pyramid


def test_validate_budget_rejects_budgets_below_sink_plus_window():
    policy = get_policy("snapkv", sink=4, window=16)
    policy.validate_budget(20)
    with pytest.raises(ValueError, match=r"sink \(4\) \+ window \(16\)"):
        policy.validate_budget(19)
    with pytest.raises(ValueError):
        get_policy("h2o", sink=0, window=0).validate_budget(0)
    get_policy("full").validate_budget(1)  # full ignores the budget


@pytest.mark.parametrize("budget", [20, 21, 64, 128, 333, 512, 4096])
@pytest.mark.parametrize("num_layers", [1, 2, 3, 7, 30, 32])
def test_pyramid_budgets_sum_exactly_fall_with_depth_and_cover_sink_plus_window(budget, num_layers):
    policy = get_policy("pyramid")  # sink 4 + window 16
    budgets = policy.layer_budgets(budget, num_layers)
    assert len(budgets) == num_layers and all(isinstance(b, int) for b in budgets)
    assert sum(budgets) == budget * num_layers
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert min(budgets) >= policy.sink + policy.window


def test_pyramid_shape_follows_beta():
    budgets = get_policy("pyramid").layer_budgets(512, 32)
    reserved = 20
    assert budgets[-1] == reserved + (512 - reserved) // 20  # top layer: 1/beta of the evictable part
    assert budgets[0] > 1.8 * 512  # bottom layer takes nearly twice the mean
    steeper = get_policy("pyramid", beta=40).layer_budgets(512, 32)
    assert steeper[-1] < budgets[-1] and steeper[0] > budgets[0]
    with pytest.raises(ValueError):
        get_policy("pyramid").layer_budgets(10, 32)


def test_pyramid_delegates_to_its_scorer():
    pyr = get_policy("pyramid_h2o", sink=2, window=8, beta=10)
    assert isinstance(pyr, PyramidPolicy) and isinstance(pyr.scorer, H2OPolicy)
    assert pyr.name == "pyramid_h2o" and pyr.stateful and pyr.needs_queries and pyr.evicts
    assert pyr.obs_window is None and pyr.beta == 10
    assert (pyr.sink, pyr.window) == (2, 8) == (pyr.scorer.sink, pyr.scorer.window)
    assert not get_policy("pyramid_knorm").needs_queries
    default = PyramidPolicy(scorer=SnapKVPolicy(window=32))
    assert default.name == "pyramid" and default.window == 32 and default.obs_window == 8
    ctx = ragged_ctx()
    torch.testing.assert_close(default.score(ctx).scores, SnapKVPolicy().score(ctx).scores)
    with pytest.raises(ValueError):
        PyramidPolicy(scorer=get_policy("full"))


def test_uniform_layer_budgets_by_default():
    assert get_policy("tova").layer_budgets(64, 3) == [64, 64, 64]


# --------------------------------------------------------------------------- registry


def test_registry_names_and_instances():
    names = available_policies()
    assert set(names) == {
        "full", "streaming", "h2o", "tova", "snapkv", "knorm",
        "pyramid", "pyramid_streaming", "pyramid_h2o", "pyramid_tova", "pyramid_knorm",
    }
    for name in names:
        policy = get_policy(name)
        assert isinstance(policy, EvictionPolicy) and policy.name == name
        assert policy.evicts == (name != "full")
        if policy.needs_queries:
            assert hasattr(policy, "obs_window")
    assert get_policy("snapkv") is not get_policy("snapkv")
    assert get_policy(" SnapKV ").name == "snapkv"
    assert get_policy("h2o").stateful and get_policy("h2o").obs_window is None
    assert get_policy("tova").obs_window == 1 and get_policy("snapkv").obs_window == 8
    assert not get_policy("streaming").needs_queries and not get_policy("full").evicts


def test_registry_errors_and_overrides():
    with pytest.raises(ValueError, match="available: .*snapkv.*pyramid_h2o"):
        get_policy("nope")
    with pytest.raises(ValueError, match="no field.*obs_window"):
        get_policy("knorm", obs_window=4)
    with pytest.raises(ValueError, match="no field.*beta"):
        get_policy("snapkv", beta=3)
    with pytest.raises(ValueError, match="kernel"):
        get_policy("snapkv", kernel=4)
    with pytest.raises(ValueError, match="obs_window"):
        get_policy("snapkv", obs_window=0)
    p = get_policy("snapkv", sink=1, window=2, obs_window=8, kernel=3)
    assert (p.sink, p.window, p.obs_window, p.kernel) == (1, 2, 8, 3)
    p = get_policy("pyramid", obs_window=8, kernel=7, beta=5)
    assert p.obs_window == 8 and p.scorer.kernel == 7 and p.beta == 5


# --------------------------------------------------------------------------- select_keep


def naive_select_keep(scores, key_mask, budgets, sink, window):
    B, H, T = scores.shape
    result = []
    for b in range(B):
        n, budget = int(key_mask[b].sum()), int(budgets[b])
        rows = []
        for h in range(H):
            if n <= budget:
                rows.append(list(range(n)))
                continue
            forced = set(range(min(sink, n))) | set(range(n - window, n))
            rest = [t for t in range(n) if t not in forced]
            rest.sort(key=lambda t: (-float(scores[b, h, t]), t))  # ties: earlier index first
            rows.append(sorted(forced | set(rest[: budget - len(forced)])))
        result.append(rows)
    return result


def check_select_keep(scores, key_mask, budgets, sink, window):
    keep, keep_len = select_keep(scores, key_mask, budgets, sink, window)
    B, H, _ = scores.shape
    lens = key_mask.sum(1)
    assert keep.dtype == torch.int64 and keep_len.dtype == torch.int64
    assert keep_len.tolist() == torch.minimum(budgets, lens).tolist()
    assert keep.shape == (B, H, int(keep_len.max()))
    expected = naive_select_keep(scores, key_mask, budgets, sink, window)
    for b in range(B):
        n = int(keep_len[b])
        for h in range(H):
            row = keep[b, h].tolist()
            assert row[:n] == expected[b][h]
            assert all(i == row[n - 1] for i in row[n:])  # padding repeats the last kept index
            if int(lens[b]) > int(budgets[b]):
                assert set(range(sink)) <= set(row[:n])
                assert set(range(int(lens[b]) - window, int(lens[b]))) <= set(row[:n])
    return keep, keep_len


def test_select_keep_ragged_batch_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, H, T = 4, 3, 50
    scores = torch.randn(B, H, T, generator=g)
    lens = torch.tensor([50, 33, 12, 0])
    key_mask = torch.arange(T)[None] < lens[:, None]
    budgets = torch.tensor([20, 25, 16, 20])  # row 2 (12 keys) is shorter than its budget
    keep, keep_len = check_select_keep(scores, key_mask, budgets, sink=4, window=8)
    assert keep_len.tolist() == [20, 25, 12, 0]
    assert keep[2, :, :12].tolist() == [list(range(12))] * H
    assert (keep[3] == 0).all()  # an empty row points at a valid index
    assert (keep[:, :, 1:] >= keep[:, :, :-1]).all()  # sorted (padding repeats)


def test_select_keep_random_cases_against_reference():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        B, H, T = (int(torch.randint(1, n, (1,), generator=g)) for n in (5, 4, 30))
        T += 10
        sink = int(torch.randint(0, 4, (1,), generator=g))
        window = int(torch.randint(0, 6, (1,), generator=g))
        lens = torch.randint(0, T + 1, (B,), generator=g)
        budgets = torch.randint(max(sink + window, 1), T + 2, (B,), generator=g)
        scores = torch.randint(0, 5, (B, H, T), generator=g).float()  # many ties
        key_mask = torch.arange(T)[None] < lens[:, None]
        check_select_keep(scores, key_mask, budgets, sink, window)


def test_select_keep_per_head_selections_differ():
    T = 20
    scores = torch.zeros(1, 2, T)
    scores[0, 0, 6] = scores[0, 0, 7] = 1.0
    scores[0, 1, 10] = scores[0, 1, 11] = 1.0
    keep, _ = select_keep(scores, torch.ones(1, T, dtype=torch.bool), torch.tensor([8]), sink=2, window=4)
    assert keep[0, 0].tolist() == [0, 1, 6, 7, 16, 17, 18, 19]
    assert keep[0, 1].tolist() == [0, 1, 10, 11, 16, 17, 18, 19]


def test_select_keep_sinks_and_window_beat_any_score_and_ties_are_deterministic():
    T = 16
    scores = torch.full((1, 1, T), float("inf"))
    scores[0, 0, :2] = float("-inf")  # sinks
    scores[0, 0, -3:] = float("nan")  # window
    keep, _ = select_keep(scores, torch.ones(1, T, dtype=torch.bool), 7, sink=2, window=3)
    assert keep[0, 0].tolist() == [0, 1, 2, 3, 13, 14, 15]  # equal scores: earliest first
    keep2, _ = select_keep(torch.zeros(1, 1, T), torch.ones(1, T, dtype=torch.bool), 7, sink=2, window=3)
    assert keep2[0, 0].tolist() == [0, 1, 2, 3, 13, 14, 15]


def test_select_keep_gathers_in_range_and_handles_empty_batch():
    scores = torch.randn(2, 2, 9)
    key_mask = torch.tensor([[True] * 9, [True] * 3 + [False] * 6])
    keep, keep_len = select_keep(scores, key_mask, torch.tensor([6, 6]), sink=1, window=2)
    assert keep_len.tolist() == [6, 3]
    values = torch.randn(2, 2, 9, 5)
    kept = values.gather(2, keep[..., None].expand(-1, -1, -1, 5))  # never out of range
    assert kept.shape == (2, 2, 6, 5)
    empty_mask, empty_budgets = torch.zeros(0, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    keep, keep_len = select_keep(torch.zeros(0, 2, 5), empty_mask, empty_budgets, 1, 1)
    assert keep.shape == (0, 2, 0) and keep_len.shape == (0,)

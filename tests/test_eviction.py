"""Batch-Max eviction in the engine: footprint bounds per layer, sinks and window kept,
exactness when nothing needs evicting, admission by compressed footprint."""
from __future__ import annotations

import pytest
import torch

from batchmax.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from batchmax.policies import available_policies, get_policy
from tests.helpers import PeakRecorder, random_prompts

EVICTING = [p for p in available_policies() if get_policy(p).evicts]
PROMPTS = [300, 217, 90, 45]
BUDGET = 64


def _greedy(n=8, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def _check_kept_positions(engine, rid, policy, prompt_len, num_out):
    """Every layer and head holds the sinks and the most recent ``window`` tokens."""
    cache = engine.cache
    seq = cache.seqs[rid]
    slots = cache.slots(torch.from_numpy(cache.block_table([rid])))[0]
    newest = prompt_len + num_out - 1  # the last sampled token is not written yet
    for layer, n in enumerate(seq.lens):
        pos = cache.pos[layer, slots[:n]].T  # (H_kv, n)
        for h in range(pos.shape[0]):
            held = set(pos[h].tolist())
            assert len(held) == n, "a position is held twice"
            assert set(range(policy.sink)) <= held
            assert set(range(newest - policy.window, newest)) <= held


@pytest.mark.parametrize("policy_name", EVICTING)
@pytest.mark.parametrize("chunk", [32, 512])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_llama_mha"])
def test_footprint_bounds_and_kept_tokens(policy_name, chunk, model, request, monkeypatch):
    path = request.getfixturevalue(model)
    rec = PeakRecorder(monkeypatch)
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(path), device="cpu", chunk_size=chunk, num_tokens=8192, kv_policy=policy_name, kv_budget=BUDGET))
    rec.engine = engine
    policy = get_policy(policy_name)
    budgets = policy.layer_budgets(BUDGET, engine.runner.spec.num_layers)
    prompts = random_prompts(PROMPTS, seed=21)
    n_out = 6
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy(n_out))
    checked = set()
    while engine.has_unfinished_requests():
        for req in list(engine.scheduler.running):
            rid = req.request_id
            lens = engine.cache.seqs[rid].lens
            for layer, n in enumerate(lens):
                # between steps a layer holds its budget plus what decode appended, or
                # everything it has seen while that still fits the budget
                assert n <= budgets[layer] + req.num_output_tokens or n == req.num_computed_tokens <= budgets[layer]
            if req.num_output_tokens == n_out - 1 and rid not in checked and req.num_prompt_tokens > BUDGET:
                _check_kept_positions(engine, rid, policy, req.num_prompt_tokens, req.num_output_tokens)
                checked.add(rid)
        engine.step()
    assert checked, "no request was checked after prefill"
    step_chunk = min(chunk, engine.scheduler_config.max_num_batched_tokens)
    for (rid, layer), peak in rec.prefill.items():
        assert peak <= budgets[layer] + step_chunk, (rid, layer, peak)
    for (rid, layer), peak in rec.decode.items():
        prompt_len = PROMPTS[int(rid[1:])]
        assert peak <= min(prompt_len, budgets[layer]) + n_out, (rid, layer, peak)
    # chunked prompts longer than budget + chunk really were bounded below their length
    long = [(rid, layer) for (rid, layer) in rec.prefill if PROMPTS[int(rid[1:])] > budgets[layer] + step_chunk]
    assert all(rec.prefill[key] <= budgets[key[1]] + step_chunk for key in long)
    assert engine.stats().kv_tokens_evicted_total > 0
    assert engine.cache.usage == 0.0


@pytest.mark.parametrize("policy_name", ["snapkv", "h2o", "tova"])
def test_decode_eviction_keeps_budget_plus_k(policy_name, tiny_llama, monkeypatch):
    rec = PeakRecorder(monkeypatch)
    k = 4
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", chunk_size=64, num_tokens=8192, kv_policy=policy_name, kv_budget=BUDGET, evict_decode_every=k))
    rec.engine = engine
    prompts = random_prompts([150, 80], seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy(40))
    decode_peak = 0
    while engine.has_unfinished_requests():
        for req in engine.scheduler.running:
            if req.num_output_tokens > 0:
                decode_peak = max(decode_peak, max(engine.cache.seqs[req.request_id].lens))
        engine.step()
    assert BUDGET < decode_peak <= BUDGET + k
    # within decode steps too, never more than budget + k (40 tokens generated, far more than k)
    assert max(rec.decode.values()) <= BUDGET + k
    assert max(rec.prefill.values()) <= BUDGET + 64


def test_full_policy_and_large_budgets_equal_full_cache(tiny_llama):
    prompts = random_prompts([1, 30, 100, 170], seed=31)
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=48, num_tokens=8192).generate(prompts, _greedy(10))
    ref_ids = [o.token_ids for o in ref]
    full = LLM(str(tiny_llama), device="cpu", chunk_size=48, num_tokens=8192, kv_policy="full").generate(prompts, _greedy(10))
    assert [o.token_ids for o in full] == ref_ids
    for name in EVICTING:
        # every layer's budget >= the prompt length: nothing is evicted, outputs are identical
        # (a pyramid's top layer keeps only ~1/20 of the budget)
        budget = 4000 if name.startswith("pyramid") else 180
        assert min(get_policy(name).layer_budgets(budget, 3)) >= 180
        llm = LLM(str(tiny_llama), device="cpu", chunk_size=48, num_tokens=16384)
        outs = llm.generate(prompts, [_greedy(10, kv_policy=name, kv_budget=budget)] * len(prompts))
        assert [o.token_ids for o in outs] == ref_ids, name
        assert llm.engine.stats().kv_tokens_evicted_total == 0


def test_compressed_admission_runs_many_more_requests(tmp_path, default_model_path):
    from tests.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path / "m", "llama", default_model_path, max_position_embeddings=4096, seed=9)
    prompt_len, out_len = 2000, 8
    full_fp = prompt_len + out_len
    pool = 2 * full_fp  # room for two full-cache requests
    prompts = random_prompts([prompt_len] * 10, seed=41)
    full = LLM(str(path), device="cpu", chunk_size=128, num_tokens=pool, max_num_batched_tokens=1024)
    full.generate(prompts[:4], _greedy(out_len))
    assert full.engine.stats().peak_running_batch_size <= 2

    llm = LLM(str(path), device="cpu", chunk_size=128, num_tokens=pool, max_num_batched_tokens=1024, kv_policy="snapkv", kv_budget=128)
    outs = llm.generate(prompts, _greedy(out_len))
    st = llm.engine.stats()
    assert st.peak_running_batch_size >= 8
    assert all(len(o.token_ids) == out_len or o.finish_reason == "stop" for o in outs)
    assert st.kv_tokens_evicted_total > 0 and llm.engine.cache.usage == 0.0


def test_compression_ratio_in_stats(tiny_llama):
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", chunk_size=64, num_tokens=8192, kv_policy="snapkv", kv_budget=BUDGET))
    engine.add_request("a", random_prompts([256], seed=2)[0], _greedy(20))
    while engine.scheduler.running == [] or engine.scheduler.running[0].num_output_tokens < 2:
        engine.step()
    st = engine.stats()
    n_layers = engine.runner.spec.num_layers
    seq = engine.cache.seqs["a"]
    assert st.kv_tokens_kept == sum(seq.lens) == n_layers * (BUDGET + 1)
    assert st.kv_tokens_seen == n_layers * 257
    assert st.compression_ratio == pytest.approx((BUDGET + 1) / 257)
    assert st.kv_tokens_evicted_total == n_layers * (256 - BUDGET)


def test_bad_policy_or_budget_is_a_clear_error(tiny_llama):
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", num_tokens=2048))
    prompt = random_prompts([10])[0]
    with pytest.raises(ValueError, match="unknown kv policy 'nope'.*snapkv"):
        engine.add_request("a", prompt, _greedy(kv_policy="nope"))
    with pytest.raises(ValueError, match="needs a kv_budget"):
        engine.add_request("b", prompt, _greedy(kv_policy="snapkv"))
    with pytest.raises(ValueError, match="smaller than the tokens always kept"):
        engine.add_request("c", prompt, _greedy(kv_policy="h2o", kv_budget=8))
    with pytest.raises(ValueError):
        SamplingParams(kv_budget=-1)
    assert not engine.has_unfinished_requests()


def test_plan_command_table(capsys):
    from batchmax.server.cli import main
    from bench.models import LLAMA3_8B, shape_only_model

    main(["plan", "--model", shape_only_model(LLAMA3_8B), "--gpu-mem-gb", "80", "--prompt-len", "4096", "--max-tokens", "256", "--budget", "512", "1024", "--chunk", "512"])
    out = capsys.readouterr().out
    assert "132,096 bytes" in out  # 32 layers x 8 heads x (2 x 128 x 2 B + 4 B)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in out.splitlines() if line.startswith("| full") or line.startswith("| budget")}
    assert rows["full"][0] == "4,352" and rows["budget 512"][0] == "1,024" and rows["budget 1024"][0] == "1,536"
    full_batch, b512 = int(rows["full"][2].replace(",", "")), int(rows["budget 512"][2].replace(",", ""))
    assert b512 >= 4 * full_batch

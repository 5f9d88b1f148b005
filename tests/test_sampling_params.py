"""The sampling parameters that change a request's logits (``engine/logits_processors.py``:
logit_bias, allowed_token_ids, bad_words, presence / frequency / repetition penalties) and
min_p (``Sampler``): each one's effect asserted exactly where it is deterministic, the
processed logits against references computed by hand and by transformers' own processors
(read back through logprobs, which are taken from the processed logits), async scheduling on
and off, mixed batches, preemption."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from batchmax.engine import LLM, SamplingParams
from batchmax.engine.logits_processors import LogitsProcessors, LogitsSpec, bad_words_token_ids
from batchmax.engine.request import Request
from batchmax.engine.sampling import Sampler
from tests.helpers import hf_model, random_prompts

KW = dict(device="cpu", num_tokens=8192, chunk_size=32, max_num_batched_tokens=96)
VOCAB = 49152


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), async_scheduling=False, **KW)


@pytest.fixture(scope="module")
def llm_async(tiny_llama):
    return LLM(str(tiny_llama), async_scheduling=True, **KW)


def _p(n: int = 16, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def _gen(llm, prompts, params):
    outs = llm.generate(prompts, params)
    assert llm.engine.processors.num_slots_used == 0  # every slot given back
    return outs


@pytest.fixture(scope="module")
def repeating(llm):
    """A prompt whose greedy continuation repeats a token, and that continuation."""
    prompts = random_prompts([8] * 16, seed=7)
    for prompt, out in zip(prompts, _gen(llm, prompts, _p(40))):
        if len(set(out.token_ids)) < len(out.token_ids):
            return prompt, out.token_ids
    raise AssertionError("no greedy output of the tiny model repeats a token")


def _raw_logits(path, prompt: list[int], out: list[int]) -> torch.Tensor:
    """transformers' logits predicting each token of ``out`` after ``prompt``: (len(out), V)."""
    with torch.no_grad():
        logits = hf_model(str(path))(torch.tensor([prompt + out])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(out)]


def _assert_logprobs_are(out, processed: torch.Tensor, greedy: bool = True) -> None:
    """The engine's logprobs (chosen token and alternatives) are those of ``processed``
    (len, V), the logits after the request's processing, before temperature."""
    ref = torch.log_softmax(processed, dim=-1)
    assert len(out.logprobs) == len(out.token_ids) == len(ref)
    for t, e in enumerate(out.logprobs):
        assert e.token_id == out.token_ids[t]
        assert abs(e.logprob - float(ref[t, e.token_id])) < 1e-4, f"token {t}"
        want = ref[t].topk(len(e.top)).values
        for (tid, lp), w in zip(e.top, want):
            assert abs(lp - float(ref[t, tid])) < 1e-4 and abs(lp - float(w)) < 1e-4, f"token {t}"
        if greedy:
            assert out.token_ids[t] == int(ref[t].argmax()), f"token {t}"


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kw",
    [
        dict(presence_penalty=2.5), dict(frequency_penalty=-2.01), dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0), dict(repetition_penalty=math.inf), dict(min_p=1.5), dict(min_p=-0.1),
        dict(logit_bias={5: 100.5}), dict(logit_bias={"x": 1.0}), dict(allowed_token_ids=[]),
        dict(temperature=math.nan),
    ],
)
def test_out_of_range_parameters_are_refused(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name if name != "temperature" else "temperature"):
        SamplingParams(**kw)


def test_parameters_are_normalised():
    p = SamplingParams(logit_bias={"7": 3, 9: -1.5}, allowed_token_ids=(4, 5), bad_words="hello")
    assert p.logit_bias == {7: 3.0, 9: -1.5} and p.allowed_token_ids == [4, 5] and p.bad_words == ["hello"]
    assert p.processes_logits
    assert not SamplingParams(min_p=0.5, temperature=0.7, top_k=5).processes_logits  # the sampler's own


@pytest.mark.parametrize(
    "kw,param",
    [
        (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(allowed_token_ids=[5, VOCAB + 3]), "allowed_token_ids"),
        (dict(allowed_token_ids=[-2]), "allowed_token_ids"),
        (dict(bad_words=["x"] * 200), "bad_words"),
    ],
)
def test_token_ids_are_checked_before_admission(llm, kw, param):
    engine = llm.engine
    with pytest.raises(ValueError, match=param):
        engine.add_request("bad", [5, 6, 7], _p(**kw))
    with pytest.raises(ValueError, match=param):
        engine.check_request([5, 6, 7], _p(**kw))
    assert "bad" not in engine.requests and not engine.scheduler.waiting


# ---------------------------------------------------------------------------- each effect


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_plus_100_makes_every_token_that_token(llm, temperature):
    prompts = random_prompts([5, 30], seed=1)
    outs = _gen(llm, prompts, _p(12, temperature=temperature, seed=3, logit_bias={4321: 100.0}))
    assert all(o.token_ids == [4321] * 12 for o in outs)


def test_logit_bias_shifts_logprobs_by_hand(llm, tiny_llama):
    prompt = random_prompts([12], seed=2)[0]
    bias = {100: 5.0, 2000: -3.0, 31337: 2.5}
    out = _gen(llm, [prompt], _p(10, logit_bias=bias, logprobs=5))[0]
    ref = _raw_logits(tiny_llama, prompt, out.token_ids)
    for tid, b in bias.items():
        ref[:, tid] += b
    _assert_logprobs_are(out, ref)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_token_ids_bound_the_output(llm, temperature):
    allowed = [11, 500, 7000, 12345, 40000]
    outs = _gen(llm, random_prompts([6, 40], seed=4), _p(20, temperature=temperature, seed=5, allowed_token_ids=allowed))
    for o in outs:
        assert set(o.token_ids) <= set(allowed)
    if temperature:
        assert len({t for o in outs for t in o.token_ids}) > 1  # sampled among them, not stuck on one


def test_allowed_token_ids_with_logit_bias(llm):
    """A bias never lets a token outside allowed_token_ids through."""
    out = _gen(llm, [[5, 6, 7]], _p(8, allowed_token_ids=[11, 12], logit_bias={13: 100.0, 12: 100.0}))[0]
    assert out.token_ids == [12] * 8


def test_min_p_one_at_temperature_one_is_greedy(llm):
    prompts = random_prompts([7, 33], seed=6)
    greedy = [o.token_ids for o in _gen(llm, prompts, _p(16))]
    sampled = [o.token_ids for o in _gen(llm, prompts, _p(16, temperature=1.0, seed=9))]
    min_p = [o.token_ids for o in _gen(llm, prompts, _p(16, temperature=1.0, seed=9, min_p=1.0))]
    assert min_p == greedy != sampled


def test_min_p_keeps_only_tokens_near_the_top(llm):
    """At temperature 1 every token drawn has at least min_p times the top probability."""
    out = _gen(llm, [[9, 8, 7]], _p(40, temperature=1.0, seed=11, min_p=0.3, logprobs=1))[0]
    for e in out.logprobs:
        assert e.logprob >= math.log(0.3) + e.top[0][1] - 1e-5


def test_apply_min_p_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    scaled = torch.randn(4, 300, generator=g) * 3
    min_p = torch.tensor([0.0, 0.05, 0.5, 1.0])
    got = Sampler.apply_min_p(scaled, min_p)
    probs = torch.softmax(scaled, -1)
    for i in range(4):
        keep = probs[i] >= min_p[i] * probs[i].max()
        assert torch.equal(got[i], scaled[i].masked_fill(~keep, float("-inf")))
    assert torch.equal(got[0], scaled[0]) and int(torch.isfinite(got[3]).sum()) == 1


def test_repetition_penalty_changes_a_repeating_greedy_output_as_transformers_does(llm, tiny_llama, repeating):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    prompt, greedy = repeating
    for penalty in (1.8, 0.7):
        out = _gen(llm, [prompt], _p(40, repetition_penalty=penalty, logprobs=5))[0]
        assert out.token_ids != greedy
        raw = _raw_logits(tiny_llama, prompt, out.token_ids)
        proc = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        ref = torch.cat([proc(torch.tensor([prompt + out.token_ids[:t]]), raw[t : t + 1].clone()) for t in range(len(raw))])
        _assert_logprobs_are(out, ref)
    # a strong penalty leaves no repeat (the tiny model always has an unseen token with a positive logit)
    strong = _gen(llm, [prompt], _p(40, repetition_penalty=1e4))[0].token_ids
    assert len(set(strong)) == len(strong) and not set(strong) & set(prompt)


def test_repetition_penalty_covers_the_prompt(llm):
    """A token of the prompt is penalised before the output holds it."""
    prompt = random_prompts([10], seed=12)[0]
    first = _gen(llm, [prompt], _p(1))[0].token_ids[0]
    prompt = prompt + [first] * 3
    assert _gen(llm, [prompt], _p(1, repetition_penalty=1e4))[0].token_ids[0] not in prompt


@pytest.mark.parametrize("presence,frequency", [(0.0, -2.0), (1.5, 0.0), (-0.7, 1.3), (2.0, 2.0)])
def test_presence_and_frequency_penalties_as_openai_defines_them(llm, tiny_llama, repeating, presence, frequency):
    prompt, greedy = repeating
    out = _gen(llm, [prompt], _p(40, presence_penalty=presence, frequency_penalty=frequency, logprobs=5))[0]
    raw = _raw_logits(tiny_llama, prompt, out.token_ids)
    ref = raw.clone()
    for t in range(len(raw)):
        for tok, c in Counter(out.token_ids[:t]).items():  # the output only, never the prompt
            ref[t, tok] -= frequency * c + presence
    _assert_logprobs_are(out, ref)
    if frequency < 0:  # encouraged repeats
        assert out.token_ids != greedy and len(set(out.token_ids)) < len(set(greedy))


def test_bad_words_never_appear(llm):
    """A single-token word is masked always; a two-token word's last token is masked only where
    the output ends with its first: the first still appears."""
    tok = llm.engine.tokenizer
    prompt = random_prompts([9], seed=13)[0]
    greedy = _gen(llm, [prompt], _p(24))[0].token_ids
    # a word that is one token after a space, and a two-token phrase of the greedy output
    single = next(i for i, t in enumerate(greedy) if tok.encode(" " + tok.decode([t]).strip(), add_special_tokens=False) == [t])
    pair = next(
        i for i in range(single + 1, len(greedy) - 1)
        if [greedy[i], greedy[i + 1]] in bad_words_token_ids(tok, [tok.decode(greedy[i : i + 2])])
    )
    for word, at in ((tok.decode([greedy[single]]), single), (tok.decode(greedy[pair : pair + 2]), pair + 1)):
        seqs = bad_words_token_ids(tok, [word])
        out = _gen(llm, [prompt], _p(24, bad_words=[word]))[0].token_ids
        assert out[:at] == greedy[:at] and out[at] != greedy[at]
        for seq in seqs:
            assert not any(out[k : k + len(seq)] == seq for k in range(len(out))), (word, seq)


def test_bad_words_tokenization():
    from transformers import AutoTokenizer

    from batchmax.engine.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    seqs = bad_words_token_ids(tok, ["  cares", "", "   "])
    plain, spaced = tok.encode("cares", add_special_tokens=False), tok.encode(" cares", add_special_tokens=False)
    assert seqs == [plain, spaced] and len(plain) != len(spaced)  # kept although vLLM would drop it


def test_multi_token_bad_words_on_sampled_output(llm):
    """Sampled at temperature 1 among three words, a three-word phrase the unconstrained
    sample holds never appears once it is a bad word."""
    tok = llm.engine.tokenizer
    allowed = [2769, 1836, 8047]  # " farm", " given", " compassion": one token each
    params = dict(temperature=1.0, seed=2, allowed_token_ids=allowed)
    out = _gen(llm, [[5, 6]], _p(60, **params))[0].token_ids
    phrase = out[10:13]
    text = tok.decode(phrase)
    seqs = bad_words_token_ids(tok, [text])
    assert phrase in seqs
    got = _gen(llm, [[5, 6]], _p(60, bad_words=[text], **params))[0].token_ids
    assert set(got) <= set(allowed) and got[:12] == out[:12]
    for seq in seqs:
        assert not any(got[k : k + len(seq)] == seq for k in range(len(got)))


# ---------------------------------------------------------------------------- the device tables


def _fake(rid: str, prompt: list[int], spec: LogitsSpec | None) -> Request:
    return Request(rid, prompt, SamplingParams(), logits_spec=spec)


def _by_hand(raw: torch.Tensor, spec: LogitsSpec | None, prompt: list[int], out: list[int]) -> torch.Tensor:
    x = raw.clone()
    if spec is None:
        return x
    if spec.allowed_token_ids is not None:
        keep = x[spec.allowed_token_ids].clone()
        x.fill_(float("-inf"))
        x[spec.allowed_token_ids] = keep
    for tok, b in spec.logit_bias.items():
        x[tok] += b
    for w in spec.bad_words:
        prefix = w[:-1]
        if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix) :] == prefix):
            x[w[-1]] = float("-inf")
    counts = Counter(out)
    for tok in set(prompt) | set(out):
        r = spec.repetition_penalty
        x[tok] = x[tok] / r if x[tok] > 0 else x[tok] * r
    for tok, c in counts.items():
        x[tok] -= spec.frequency_penalty * c
        x[tok] -= spec.presence_penalty
    return x


def test_processors_match_a_hand_reference_over_steps():
    V = 64
    procs = LogitsProcessors(V, torch.device("cpu"), lambda xs, dtype: torch.tensor(xs, dtype=dtype))
    specs = [
        None,
        LogitsSpec(repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=-0.3),
        LogitsSpec(logit_bias={3: 2.5, 9: -4.0}, bad_words=[[5], [7, 8], [1, 2, 3]]),
        LogitsSpec(allowed_token_ids=list(range(0, 64, 2)), logit_bias={4: 1.0, 5: 50.0}, presence_penalty=1.0),
        LogitsSpec(repetition_penalty=0.6, bad_words=[[2, 4, 6, 8]]),
        # joining later with longer words and more of them: the word tables grow under live tails
        LogitsSpec(presence_penalty=0.5, bad_words=[[9, 7, 7, 2, 4, 6, 8], [3, 3]]),
        LogitsSpec(bad_words=[[6, 1], [6, 2], [6, 3], [6, 4], [4, 6]], frequency_penalty=-1.0),
    ]
    prompts = [[1, 2], [3, 3, 10], [4], [6, 7, 8], [2, 4, 60], [5], [6, 6]]
    joins = [0, 0, 0, 0, 0, 2, 3]  # the step each request first samples in
    reqs = [_fake(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, specs))]
    # forced tokens, so that every word's prefix and the penalties come up
    forced = [[7, 7, 2, 4, 6, 1], [3, 7, 8, 7, 7, 3], [1, 2, 3, 3, 1, 2], [2, 4, 6, 8, 2, 4], [2, 4, 6, 4, 6, 8],
              [9, 7, 7, 2, 4, 6], [6, 4, 6, 1, 6, 2]]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        live = [i for i, j in enumerate(joins) if j <= step]
        batch_reqs = [reqs[i] for i in live]
        raw = torch.randn(len(live), V, generator=g) * 3
        got, batch = procs.apply(raw.clone(), batch_reqs)
        for row, r in enumerate(batch_reqs):
            want = _by_hand(raw[row], r.logits_spec, r.prompt_token_ids, r.output_token_ids)
            torch.testing.assert_close(got[row], want, rtol=1e-6, atol=1e-5, msg=f"step {step}, {r.request_id}")
        tokens = torch.tensor([forced[i][step - joins[i]] for i in live])
        procs.update(batch, tokens)
        for r, t in zip(batch_reqs, tokens.tolist()):
            r.output_token_ids.append(t)
    assert procs.num_slots_used == 6 and procs.words.shape[1:] == (5, 6)
    for r in reqs:
        procs.release(r)
    assert procs.num_slots_used == 0


def test_slots_grow_and_are_rewritten_when_reused():
    """More requests than the first tables hold; a reused slot keeps nothing of its last owner."""
    V = 32
    procs = LogitsProcessors(V, torch.device("cpu"), lambda xs, dtype: torch.tensor(xs, dtype=dtype))
    first = [_fake(f"a{i}", [i], LogitsSpec(frequency_penalty=1.0, logit_bias={i: 3.0}, bad_words=[[1, 2]])) for i in range(11)]
    raw = torch.zeros(11, V)
    _, batch = procs.apply(raw.clone(), first)
    procs.update(batch, torch.arange(11))
    assert procs.capacity == 16 and procs.num_slots_used == 11
    for r in first:
        procs.release(r)
    second = [_fake(f"b{i}", [0], LogitsSpec(presence_penalty=0.5, logit_bias={31: 1.0}, bad_words=[[i, 2], [3, 4, 5]]))
              for i in range(11)]
    got, _ = procs.apply(raw.clone(), second)
    want = torch.zeros(11, V)
    want[:, 31] = 1.0
    assert torch.equal(got, want)  # no counts, bias or tail left behind


def test_unused_processors_cost_nothing(llm):
    """Plain requests: no table, no kernel, the logits tensor handed back as it came."""
    engine = llm.engine
    procs = LogitsProcessors(VOCAB, torch.device("cpu"), engine.cache.stager.to_device)
    logits = torch.randn(3, VOCAB)
    got, batch = procs.apply(logits, [_fake(f"p{i}", [1], None) for i in range(3)])
    assert got is logits and batch is None
    procs.update(batch, torch.zeros(3, dtype=torch.int64))
    assert procs.capacity == 0 and procs.bias is None and procs.counts is None and procs.words is None


# ---------------------------------------------------------------------------- batches and scheduling


def _processed_params() -> list[SamplingParams]:
    return [
        _p(20, repetition_penalty=1.5, logprobs=3),
        _p(20, temperature=0.9, seed=4, frequency_penalty=0.8, presence_penalty=0.5, logprobs=2),
        _p(20, logit_bias={300: 6.0, 301: 6.0}, bad_words=["cares", "Description obligation"]),
        _p(20, temperature=1.0, seed=8, allowed_token_ids=[300, 301, 302, 303], min_p=0.2),
        _p(20, temperature=0.7, seed=1, min_p=0.1, top_k=40, logprobs=1),
    ]


def _plain_params() -> list[SamplingParams]:
    return [_p(20, logprobs=2), _p(20, temperature=0.9, top_p=0.9, seed=21, logprobs=1), _p(20, temperature=1.2, top_k=30, seed=5)]


def _lp(out) -> list[float]:
    return [e.logprob for e in out.logprobs]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-4 for x, y in zip(a, b))


def test_async_scheduling_gives_identical_tokens(llm, llm_async):
    prompts = random_prompts([5, 40, 17, 70, 3, 25, 9, 50], seed=14)
    params = _processed_params() + _plain_params()
    sync = llm.generate(prompts, params)
    asyn = llm_async.generate(prompts, params)
    for s, a in zip(sync, asyn):
        assert s.token_ids == a.token_ids
        assert _close(_lp(s), _lp(a))
    assert llm_async.engine.processors.num_slots_used == 0


def test_plain_requests_in_a_mixed_batch_get_their_solo_tokens(llm):
    plain_prompts = random_prompts([6, 45, 20], seed=15)
    solo = [_gen(llm, [p], sp)[0] for p, sp in zip(plain_prompts, _plain_params())]
    others = random_prompts([30, 8, 60, 12, 3], seed=16)
    mixed = _gen(llm, others + plain_prompts, _processed_params() + _plain_params())[len(others) :]
    for s, m in zip(solo, mixed):
        assert s.token_ids == m.token_ids
        assert _close(_lp(s), _lp(m))


def test_processed_requests_survive_preemption(tiny_llama):
    prompts = random_prompts([120, 110, 100, 90, 80], seed=17)
    params = _processed_params()
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=8192).generate(prompts, params)
    tight = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=16 * 16, decode_reserve_tokens=0)
    outs = tight.generate(prompts, params)
    assert tight.engine.stats().num_preemptions_total > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert tight.engine.processors.num_slots_used == 0


def test_table_bytes_are_what_the_tables_take(llm):
    """``LogitsProcessors.table_bytes`` (what the KV pool's sizing sets aside) is exactly the
    bias, counts, seen-in-prompt and penalty tables a full set of slots allocates."""
    params = [_p(4, logit_bias={5: 1.0}, presence_penalty=0.5, repetition_penalty=1.2, seed=i) for i in range(9)]
    _gen(llm, random_prompts([12] * 9, seed=2), params)  # 9 users at once: past the first 8 slots
    lp = llm.engine.processors
    held = sum(t.numel() * t.element_size() for t in (lp.bias, lp.counts, lp.seen_prompt, lp.penalties))
    assert lp.capacity >= 9 and held == LogitsProcessors.table_bytes(lp.capacity, lp.vocab_size)


def test_pool_sizing_sets_the_sampler_tables_aside(tiny_llama, monkeypatch):
    """With no ``num_tokens`` the pool takes its fraction of free memory less the tables
    ``max_num_seqs`` requests could make the sampler allocate."""
    from batchmax.engine import model_runner

    free = 3 << 30
    monkeypatch.setattr(model_runner, "_available_ram", lambda: free)
    monkeypatch.setattr(model_runner, "_CPU_POOL_CAP", 1 << 40)
    eng = LLM(str(tiny_llama), device="cpu", max_num_seqs=64, max_model_len=1 << 20, skip_tokenizer_init=True).engine
    tables = LogitsProcessors.table_bytes(64, eng.runner.spec.vocab_size)
    expect = (int(free * 0.9) - tables) // eng.runner.kv_bytes_per_token()
    assert eng.cache.capacity_tokens == expect // eng.cache.block_size * eng.cache.block_size

"""Engine core against transformers' generate: token-exact greedy outputs with continuous
batching, chunked prefill, a tight pool, preemption and abort."""
from __future__ import annotations

import pytest
import torch

from batchmax.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from tests.helpers import hf_greedy, random_prompts

LENGTHS = [1, 3, 17, 64, 65, 130, 200, 300]  # chunk 64: most prompts span several chunks
MAX_NEW = 12


def _greedy(n=MAX_NEW, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_llama_mha", "tiny_qwen2", "tiny_mistral", "tiny_qwen3"])
def test_greedy_matches_transformers_batched_and_chunked(family, request):
    path = request.getfixturevalue(family)
    prompts = random_prompts(LENGTHS, seed=hash(family) % 1000)
    llm = LLM(str(path), device="cpu", chunk_size=64, max_num_batched_tokens=160, num_tokens=4096)
    outs = llm.generate(prompts, _greedy())
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, prompt, MAX_NEW), f"prompt of {len(prompt)} tokens"
    assert llm.engine.cache.usage == 0.0


def test_requests_join_while_others_decode(tiny_llama):
    prompts = random_prompts([5, 250, 40, 120, 2, 90, 300, 33, 77], seed=7)
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", chunk_size=48, num_tokens=4096))
    done: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    saw_mixed_step = False
    while pending or engine.has_unfinished_requests():
        # a new request every third step, joining whatever is running
        if pending and steps % 3 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, _greedy())
        running = engine.scheduler.running
        if any(r.num_output_tokens > 0 for r in running) and any(r.num_output_tokens == 0 for r in running):
            saw_mixed_step = True
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        steps += 1
    assert saw_mixed_step, "no step mixed decoding and prefilling requests"
    for i, p in enumerate(prompts):
        assert done[str(i)] == hf_greedy(tiny_llama, p, MAX_NEW)
    assert engine.cache.usage == 0.0 and not engine.cache.seqs


def test_default_model_chat_matches_transformers(default_model_path):
    llm = LLM(None, device="cpu", chunk_size=32)
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    outs = llm.generate(prompts, _greedy(24))
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.token_ids == hf_greedy(default_model_path, ids, 24)
    assert "Paris" in outs[0].text


def test_seeded_sampling_reproducible_and_batch_independent(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", chunk_size=32, num_tokens=4096)
    prompt = random_prompts([20], seed=3)[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate([prompt], sp)[0].token_ids
    again = llm.generate([prompt], sp)[0].token_ids
    others = random_prompts([7, 150, 60], seed=4)
    mixed = llm.generate(
        others[:2] + [prompt] + others[2:],
        [SamplingParams(max_tokens=16, temperature=0.8, seed=1), _greedy(16), sp, SamplingParams(max_tokens=9, temperature=1.3)],
    )[2].token_ids
    assert alone == again == mixed
    other_seed = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=99))[0].token_ids
    assert other_seed != alone


def test_sampler_reads_bf16_logits_as_their_float32_copy():
    """The LM head's logits stay in the model's dtype (no float32 copy of (B, V) per step):
    greedy picks, suppression and seeded sampling give what the float32 copy gives."""
    from batchmax.engine.sampling import Sampler

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 500, generator=g) * 4).to(torch.bfloat16)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie: both take the lower index
    params = [_greedy(), _greedy(), SamplingParams(temperature=0.7, top_p=0.9, seed=5), _greedy(),
              SamplingParams(temperature=1.2, top_k=20, seed=6), _greedy()]
    suppress = [[], [7], [], [int(logits[3].float().argmax())], [], []]
    sampler = Sampler(lambda xs, dtype: torch.tensor(xs, dtype=dtype))

    def run(lg):
        gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
        return sampler(lg, params, gens, [list(x) for x in suppress]), lg

    got, lg16 = run(logits.clone())
    want, lg32 = run(logits.float())
    assert torch.equal(got, want)
    assert got[0] == logits[0].float().argmax() and got[1] == 9 and got[3] != suppress[3][0]
    assert torch.equal(lg16.float(), lg32)  # suppressed in place, as logprobs then read them
    assert lg16[1, 7] == float("-inf")


def test_small_pool_completes_everything_with_same_outputs(tiny_llama):
    prompts = random_prompts([200, 180, 150, 120, 100, 90, 60, 30], seed=11)
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=8192).generate(prompts, _greedy())
    # room for two of the largest requests at once (200 + 12 tokens -> 14 blocks of 16)
    small = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=2 * 14 * 16)
    outs = small.generate(prompts, _greedy())
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    st = small.engine.stats()
    assert st.peak_running_batch_size <= 4
    assert st.num_preemptions_total == 0  # full reservation never preempts
    assert small.engine.cache.usage == 0.0


def test_preemption_by_recompute_keeps_outputs(tiny_llama):
    prompts = random_prompts([120, 110, 100, 90, 80, 70], seed=12)
    ref = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=8192).generate(prompts, _greedy(24))
    # reserve no decode room at admission: decode growth must preempt
    tight = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=20 * 16, decode_reserve_tokens=0)
    outs = tight.generate(prompts, _greedy(24))
    assert tight.engine.stats().num_preemptions_total > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert any(o.num_preemptions > 0 for o in outs)
    assert tight.engine.cache.usage == 0.0


def test_abort_frees_kv_at_once(tiny_llama):
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", chunk_size=32, num_tokens=4096))
    prompts = random_prompts([100, 50, 80], seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy(50))
    for _ in range(6):
        engine.step()
    held = len(engine.cache.seq("r1").blocks)
    assert held > 0
    free_before = engine.cache.num_free_blocks
    engine.abort_request("r1")
    assert "r1" not in engine.cache.seqs
    assert engine.cache.num_free_blocks == free_before + held
    outs = {o.request_id: o for o in engine.step()}
    assert outs["r1"].finished and outs["r1"].finish_reason == "abort"
    # abort a request still waiting, too
    engine.add_request("late", prompts[0], _greedy(5))
    engine.abort_request("late")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.cache.usage == 0.0 and not engine.cache.seqs
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_stop_conditions(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", num_tokens=4096)
    prompt = random_prompts([10], seed=8)[0]
    free = llm.generate([prompt], _greedy(20, ignore_eos=True))[0]
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    # a stop token id ends the request on that token
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    out = llm.generate([prompt], _greedy(20, ignore_eos=True, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens suppresses it until reached
    out = llm.generate([prompt], _greedy(20, ignore_eos=True, stop_token_ids=[stop_tok], min_tokens=first + 2))[0]
    assert stop_tok not in out.token_ids[: first + 2]
    # a stop string spanning tokens cuts the text before it
    text = free.text
    needle = text[len(text) // 3 : len(text) // 3 + 4]
    if needle.strip():
        out = llm.generate([prompt], _greedy(20, ignore_eos=True, stop=[needle]))[0]
        assert out.finish_reason == "stop" and out.stop_reason == needle
        assert out.text == text[: text.find(needle)]


def test_logprobs(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", num_tokens=4096)
    prompt = random_prompts([12], seed=9)[0]
    out = llm.generate([prompt], _greedy(4, logprobs=3, prompt_logprobs=2))[0]
    assert len(out.logprobs) == 4 and len(out.prompt_logprobs) == 12 and out.prompt_logprobs[0] is None
    from tests.helpers import hf_model

    with torch.no_grad():
        logits = hf_model(str(tiny_llama))(torch.tensor([prompt + out.token_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.token_ids):
        ref = lp[len(prompt) - 1 + i]
        assert out.logprobs[i].token_id == t
        assert out.logprobs[i].logprob == pytest.approx(ref[t].item(), abs=1e-4)
        assert [tid for tid, _ in out.logprobs[i].top] == ref.topk(3).indices.tolist()
    for j in range(1, 12):
        assert out.prompt_logprobs[j].logprob == pytest.approx(lp[j - 1, prompt[j]].item(), abs=1e-4)


def test_bad_requests_are_clear_errors(tiny_llama):
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama), device="cpu", num_tokens=1024))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], _greedy())
    with pytest.raises(ValueError, match="maximum context length is 2048.*2000 prompt tokens.*100"):
        engine.add_request("b", [5] * 2000, _greedy(100))
    with pytest.raises(ValueError, match="prompt token id 1000000 is outside the vocabulary"):
        engine.add_request("c", [10**6], _greedy())
    # every token id a request carries: stop ids out of range (negative ones too) would fail
    # the sampler's scatter inside the step, and every request of that step with it
    for bad in (10**9, -(10**6), -1, engine.runner.spec.vocab_size):
        with pytest.raises(ValueError, match=f"stop_token_ids: token id {bad} is outside the vocabulary"):
            engine.check_request([5, 6], _greedy(min_tokens=2, stop_token_ids=[3, bad]))
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.add_request("e", [5, 6], _greedy(stop_token_ids=[bad]))
    assert not engine.requests and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="more than the pool holds"):
        engine.add_request("d", [5] * 1500, _greedy(10))
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_kwargs(chunk=3)


def test_near_zero_temperature_and_tiny_top_p_are_greedy(tiny_llama):
    """Temperature below 1e-5 samples greedily (1e-38 used to overflow float32 and turn every
    token into EOS); a top_p that rounds to 0 in float32 still keeps the top token."""
    llm = LLM(str(tiny_llama), device="cpu", num_tokens=4096)
    prompts = random_prompts([9, 30], seed=13)
    greedy = [o.token_ids for o in llm.generate(prompts, _greedy(16, ignore_eos=True))]
    assert all(len(t) == 16 for t in greedy)
    for kw in ({"temperature": 1e-38}, {"temperature": 1e-6}, {"temperature": 1e-38, "seed": 3},
               {"temperature": 1.0, "top_p": 1e-46, "seed": 3}, {"temperature": 1.0, "top_p": 1e-46}):
        sp = SamplingParams(max_tokens=16, ignore_eos=True, **kw)
        assert [o.token_ids for o in llm.generate(prompts, sp)] == greedy, kw
    # just above the threshold it samples (a random model's distribution is nearly flat)
    assert SamplingParams(temperature=1e-5).greedy is False and SamplingParams(temperature=9.9e-6).greedy is True


class ScriptedSampler:
    """Stands in for the engine's sampler: one request, these tokens in turn."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.i = 0

    def __call__(self, logits, params, generators, suppress):
        out = torch.tensor([self.script[min(self.i, len(self.script) - 1)]] * logits.shape[0])
        self.i += 1
        return out


def test_detokenizer_options_in_the_engine(tiny_llama):
    """skip_special_tokens, spaces_between_special_tokens and include_stop_str_in_output reach
    the text; a stop token's own text (EOS here) is left out unless include_stop_str_in_output."""
    llm = LLM(str(tiny_llama), device="cpu", num_tokens=4096, async_scheduling=False)
    tok = llm.tokenizer
    hi, there = tok.encode("hi", add_special_tokens=False), tok.encode(" there", add_special_tokens=False)
    script = hi + [1] + there + [2]  # <|im_start|> in the middle, EOS (<|im_end|>) at the end

    def text(**kw):
        llm.engine.sampler = ScriptedSampler(script)
        out = llm.generate([[500, 600, 700]], _greedy(20, **kw))[0]
        assert out.token_ids == script and out.finish_reason == "stop"
        # the front end of ``batchmax serve`` (engine/output_processor.py) decodes the core's
        # deltas, in two messages here, to the same text
        from batchmax.engine.core_messages import Delta
        from batchmax.engine.output_processor import RequestState

        state = RequestState("r", [500, 600, 700], _greedy(20, **kw), tok)
        state.apply(Delta("r", script[:2]))
        front, _ = state.apply(Delta("r", script[2:], finished=True, finish_reason="stop"))
        assert front.text == out.text
        return out.text

    assert text() == "hi there"
    assert text(skip_special_tokens=False) == "hi <|im_start|>  there"
    assert text(skip_special_tokens=False, spaces_between_special_tokens=False) == "hi<|im_start|> there"
    assert text(skip_special_tokens=False, include_stop_str_in_output=True) == "hi <|im_start|>  there <|im_end|>"
    assert text(include_stop_str_in_output=True) == "hi there"  # EOS is special: skipped anyway


def test_stop_token_and_stop_string_text_with_include_stop_str_in_output(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", num_tokens=4096)
    prompt = random_prompts([10], seed=8)[0]
    free = llm.generate([prompt], _greedy(20, ignore_eos=True))[0]
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    before = llm.generate([prompt], _greedy(first, ignore_eos=True))[0].text if first else ""
    through = llm.generate([prompt], _greedy(first + 1, ignore_eos=True))[0].text
    out = llm.generate([prompt], _greedy(20, ignore_eos=True, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.text == before  # the stop token's text is not the request's
    out = llm.generate([prompt], _greedy(20, ignore_eos=True, stop_token_ids=[stop_tok], include_stop_str_in_output=True))[0]
    assert out.finish_reason == "stop" and out.text == through
    text = free.text
    needle = text[len(text) // 3 : len(text) // 3 + 4]
    if needle.strip():
        out = llm.generate([prompt], _greedy(20, ignore_eos=True, stop=[needle], include_stop_str_in_output=True))[0]
        assert out.stop_reason == needle and out.text == text[: text.find(needle) + len(needle)]


def test_logprob_ranks(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", num_tokens=4096)
    prompt = random_prompts([12], seed=9)[0]
    out = llm.generate([prompt], _greedy(4, logprobs=2, prompt_logprobs=2))[0]
    assert all(e.rank == 1 for e in out.logprobs)  # greedy picks the most likely
    from tests.helpers import hf_model

    with torch.no_grad():
        lp = torch.log_softmax(hf_model(str(tiny_llama))(torch.tensor([prompt])).logits[0].float(), -1)
    for j in range(1, 12):
        assert out.prompt_logprobs[j].rank == int((lp[j - 1] > lp[j - 1, prompt[j]]).sum()) + 1

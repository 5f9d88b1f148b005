"""Structured outputs (``engine/structured_output.py``): JSON schemas, regex, choice, JSON
objects and grammars, on the default model and on a random-weight one (whose outputs are
valid only because decoding is constrained); greedy and seeded sampling; token-exact with
async scheduling on and off, with eviction, and through the engine-core process; requests
without a grammar unaffected; padded vocabularies; logprobs of the masked distribution."""
from __future__ import annotations

import asyncio
import json
import math
import re
import threading

import jsonschema
import pytest

from batchmax.engine import LLM, SamplingParams
from batchmax.engine.sampling import StructuredOutputsParams as SO
from tests.helpers import random_prompts, stream_all
from tests.tiny_models import build_tiny_model

KW = dict(device="cpu", num_tokens=16384, chunk_size=32, max_num_batched_tokens=256, max_num_seqs=64)
S = {"type": "string", "maxLength": 8}
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]},
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"n": {"type": "null"}}, "required": ["n"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                                             "minItems": 2, "maxItems": 4}}, "required": ["xs"]},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                                  "y": {"type": "boolean"}},
                                                "required": ["x", "y"], "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "boolean"}, {"enum": ["x", "y"]}]}}, "required": ["v"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}}, "required": ["id"]},
    {"type": "object", "properties": {"status": {"const": "done"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}},
     "required": ["status", "code"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "minItems": 1,
                                                 "items": {"type": "object", "properties": {"n": S, "k": {"type": "boolean"}},
                                                           "required": ["n", "k"], "additionalProperties": False}}},
     "required": ["people"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"enum": [1, 2]}},
                                                                                     "required": ["c"], "additionalProperties": False}},
                                            "required": ["b"], "additionalProperties": False}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"first": S, "last": S, "admin": {"type": "boolean"}}, "required": ["first", "last", "admin"],
     "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": ["low", "mid", "high"]}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                                                          "maxItems": 2}},
     "required": ["level", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"k": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["k"], "additionalProperties": False},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}],
                                               "minItems": 2, "maxItems": 2, "items": False}},
     "required": ["pair"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": 10, "maximum": 20}, "y": {"type": "integer", "minimum": -3, "maximum": -1}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "object", "properties": {"e": {"enum": ["a", 1, None, True]}}, "required": ["e"], "additionalProperties": False},
    {"type": "object", "properties": {"opt": {"type": "boolean"}, "req": {"type": "null"}}, "required": ["req"], "additionalProperties": False},
]
assert len(SCHEMAS) >= 20


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return LLM(str(tiny_llama), async_scheduling=False, **KW)


@pytest.fixture(scope="module")
def tiny_async(tiny_llama):
    return LLM(str(tiny_llama), async_scheduling=True, **KW)


@pytest.fixture(scope="module")
def smol(default_model_path):
    return LLM(None, async_scheduling=False, **KW)


def _p(so: SO, n: int = 128, temperature: float = 0.0, seed: int | None = None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=temperature, seed=seed, structured_outputs=so, **kw)


def _schema_params() -> list[SamplingParams]:
    """Every schema greedy and sampled (temperature 1, seeded)."""
    return [_p(SO(json=s)) for s in SCHEMAS] + [_p(SO(json=s), temperature=1.0, seed=i) for i, s in enumerate(SCHEMAS)]


def _check_schemas(outs) -> None:
    for i, out in enumerate(outs):
        schema = SCHEMAS[i % len(SCHEMAS)]
        assert out.finish_reason == "stop", (i, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def _settled(llm) -> None:
    st = llm.engine.structured
    assert st.num_active == 0
    assert llm.engine.cache.usage == 0.0


# ---------------------------------------------------------------------------- kinds


@pytest.mark.parametrize("model", ["tiny", "smol"])
def test_schemas_validate_greedy_and_sampled(model, request):
    llm = request.getfixturevalue(model)
    if model == "smol":
        prompt = llm.apply_chat_template([{"role": "user", "content": "Reply with a JSON document."}])
    else:
        prompt = random_prompts([12], seed=3)[0]
    params = _schema_params()
    outs = llm.generate([prompt] * len(params), params)
    _check_schemas(outs)
    # the output ends where the grammar does: EOS (with the sampled token the grammar allowed)
    assert all(o.token_ids[-1] in llm.engine.eos_token_ids for o in outs)
    _settled(llm)


def test_regex_choice_json_object_and_grammars(tiny):
    prompts = random_prompts([5, 9, 14, 20], seed=11)
    regex = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
    choices = ["yes", "no", "maybe so", "n/a"]
    ebnf = 'root ::= "(" expr ")"\nexpr ::= num | num "+" num\nnum ::= [0-9] | [1-9] [0-9]'
    lark = 'start: WORD ("," WORD)~0..2\nWORD: /[a-z]{1,5}/'
    # (json_object has unbounded strings: a random-weight model never closes them; see the next test)
    cases = [("regex", SO(regex=regex)), ("choice", SO(choice=choices)), ("ebnf", SO(grammar=ebnf)), ("lark", SO(grammar=lark))]
    params, kinds = [], []
    for kind, so in cases:
        for j in range(len(prompts)):
            params.append(_p(so, n=160, temperature=0.0 if j % 2 == 0 else 1.0, seed=j))
            kinds.append(kind)
    outs = tiny.generate(prompts * len(cases), params)  # case by case, each over every prompt
    for kind, out in zip(kinds, outs):
        assert out.finish_reason == "stop", (kind, out.text)
        text = out.text
        if kind == "regex":
            assert re.fullmatch(regex, text), text
        elif kind == "choice":
            assert text in choices
        elif kind == "ebnf":
            assert re.fullmatch(r"\(([0-9]|[1-9][0-9])(\+([0-9]|[1-9][0-9]))?\)", text), text
        else:
            assert re.fullmatch(r"[a-z]{1,5}(,[a-z]{1,5}){0,2}", text), text
    _settled(tiny)


def test_json_object_on_the_default_model(smol):
    qs = ('Reply with a JSON object with one key "name".', 'Give the capital of France as JSON: {"capital": ...}', "Return a JSON object with keys a and b.")
    prompts = [smol.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    outs = smol.generate(prompts * 2, [_p(SO(json_object=True), n=120)] * 3 + [_p(SO(json_object=True), n=120, temperature=1.0, seed=5)] * 3)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        assert isinstance(json.loads(o.text), dict), o.text
    _settled(smol)


def test_max_tokens_first_is_length_and_ignore_eos_ends_at_the_grammar(tiny):
    so = SO(json=SCHEMAS[1])
    cut, whole = tiny.generate([[5, 6, 7]] * 2, [_p(so, n=3), _p(SO(choice=["alpha", "beta"]), n=40, ignore_eos=True)])
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3
    # under ignore_eos the matcher terminates on the EOS the grammar allows, and the request ends
    assert whole.finish_reason == "stop" and whole.text in ("alpha", "beta") and len(whole.token_ids) < 40
    _settled(tiny)


def test_each_sequence_has_its_own_matcher_and_the_grammar_is_compiled_once(tiny):
    schema = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 6}, "z": {"type": "integer", "minimum": 0, "maximum": 50}},
              "required": ["w", "z"], "additionalProperties": False}
    st = tiny.engine.structured
    before = st.num_compiled
    params = SamplingParams(max_tokens=64, temperature=1.0, structured_outputs=SO(json=schema))  # one object, as n > 1 shares it
    outs = tiny.generate([[9, 10, 11]] * 6, params)
    for o in outs:
        jsonschema.validate(json.loads(o.text), schema)
    assert len({o.text for o in outs}) > 1  # independent sequences
    assert st.num_compiled - before == 1
    tiny.generate([[9, 10, 11]], SamplingParams(max_tokens=64, temperature=0, structured_outputs=SO(json=dict(schema))))
    assert st.num_compiled - before == 1  # an equal schema is an LRU hit


def test_invalid_constraints_are_client_errors(tiny):
    e = tiny.engine
    cases = [
        (SO(json={"type": "nope"}), r"structured_outputs\.json: invalid JSON schema"),
        (SO(json="{not json"), r"structured_outputs\.json: invalid JSON schema"),
        (SO(regex="a(b"), r"structured_outputs\.regex: invalid regex"),
        (SO(grammar='root ::= "a" |'), r"structured_outputs\.grammar: invalid grammar"),
        (SO(json={"type": "object"}, whitespace_pattern=r"[ ]?"), r"structured_outputs\.whitespace_pattern is not supported"),
    ]
    for so, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            e.check_request([1, 2, 3], SamplingParams(structured_outputs=so))
        assert "/project/" not in str(info.value) and ".cc:" not in str(info.value)  # no C++ log prefix
    with pytest.raises(ValueError, match="min_tokens cannot be combined"):
        e.check_request([1, 2], SamplingParams(min_tokens=2, structured_outputs=SO(regex="a+")))
    assert e.structured.num_active == 0 and not e.requests


def test_logprobs_are_the_masked_distribution(tiny):
    so = SO(choice=["red", "green", "blue"])
    out = tiny.generate([[20, 21, 22]], _p(so, n=10, logprobs=20))[0]
    first = out.logprobs[0]
    finite = [(t, lp) for t, lp in first.top if lp > -math.inf]
    tok = tiny.tokenizer
    allowed_first = {tok.encode(c, add_special_tokens=False)[0] for c in ("red", "green", "blue")}
    # every token with mass is one the grammar allows, and their mass is all of it
    assert {t for t, _ in finite} <= {t for t in range(len(tok)) if any(c.startswith(tok.decode([t])) for c in ("red", "green", "blue"))}
    assert allowed_first <= {t for t, _ in finite}
    assert abs(sum(math.exp(lp) for _, lp in finite) - 1.0) < 1e-4


# ---------------------------------------------------------------------------- exactness


def _mixed_batch():
    """Constrained requests (greedy and sampled) and unconstrained ones, prompts long enough
    that snapkv with a small budget evicts during prefill."""
    prompts = random_prompts([70, 5, 90, 40, 120, 12], seed=21)
    params = [
        _p(SO(json=SCHEMAS[5])),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        _p(SO(json=SCHEMAS[14]), temperature=1.0, seed=4),
        SamplingParams(max_tokens=20, temperature=0.9, seed=8, ignore_eos=True),
        _p(SO(regex=r"[0-9]{3}-[a-z]{2,4}"), temperature=1.0, seed=1),
        _p(SO(choice=["left", "right"]), logprobs=2),
    ]
    return prompts, params


def _fields(out):
    lp = [(e.token_id, round(e.logprob, 4)) for e in out.logprobs]
    return out.token_ids, out.finish_reason, lp


@pytest.mark.parametrize("evict", [False, True], ids=["full", "snapkv"])
def test_async_scheduling_is_token_exact(tiny, tiny_async, evict):
    prompts, params = _mixed_batch()
    if evict:
        params = [SamplingParams(**{**vars(p), "kv_policy": "snapkv", "kv_budget": 24}) for p in params]
    sync = tiny.generate(prompts, params)
    asy = tiny_async.generate(prompts, params)
    for i, (a, b) in enumerate(zip(sync, asy)):
        assert _fields(a) == _fields(b), f"request {i}"
    for i in (0, 2):
        jsonschema.validate(json.loads(sync[i].text), params[i].structured_outputs.json)
    assert tiny_async.engine.structured.num_token_waits > 0 and tiny.engine.structured.num_token_waits == 0
    if evict:
        assert tiny.engine.stats().kv_tokens_evicted_total > 0
    _settled(tiny)
    _settled(tiny_async)


def test_unconstrained_requests_get_what_they_get_alone(tiny, tiny_async):
    prompts, params = _mixed_batch()
    mixed = tiny_async.generate(prompts, params)
    for i, p in enumerate(params):
        if p.structured_outputs is None:
            alone = tiny_async.generate([prompts[i]], p)[0]
            assert alone.token_ids == mixed[i].token_ids, f"request {i}"


def test_unused_costs_nothing(tiny_llama):
    llm = LLM(str(tiny_llama), async_scheduling=True, **KW)
    llm.generate(random_prompts([8, 30], seed=2), SamplingParams(max_tokens=8, temperature=0.0))
    st = llm.engine.structured
    assert st._compiler is None and st._host_mask is None and st._bits is None and st.num_compiled == 0


def test_padded_vocabulary_never_samples_padding(tmp_path_factory, default_model_path):
    # an lm_head 64 rows larger than the tokenizer's 49152 tokens (as checkpoints pad to a multiple of 64/128)
    path = build_tiny_model(tmp_path_factory.mktemp("tiny_padded"), "llama", default_model_path, vocab_size=49216, seed=9)
    llm = LLM(str(path), **KW)
    pad = {49152: 100.0, 49215: 100.0}  # push two padding rows to the top
    free = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias=pad))[0]
    assert set(free.token_ids) <= {49152, 49215}  # unconstrained, the padding rows win
    so = SO(json=SCHEMAS[16])
    outs = llm.generate([[7, 8, 9]] * 4, [_p(so, temperature=1.0 if s else 0.0, seed=s, logit_bias=pad) for s in range(4)])
    for o in outs:
        assert all(t < 49152 for t in o.token_ids)
        jsonschema.validate(json.loads(o.text), SCHEMAS[16])


def test_engine_core_process_matches_in_process(tiny_llama, tiny):
    from batchmax.engine import EngineConfig
    from batchmax.engine.core_client import EngineCoreClient

    prompts, params = _mixed_batch()
    ref = tiny.generate(prompts, params)
    core = EngineCoreClient(EngineConfig.from_kwargs(model=str(tiny_llama), async_scheduling=False, **KW))
    try:
        got = stream_all(core, prompts, params, "so")

        async def bad():
            with pytest.raises(ValueError, match="invalid regex"):
                await core.add([("bad", [1, 2, 3], SamplingParams(structured_outputs=SO(regex="a(")))])

        asyncio.run(bad())
    finally:
        core.shutdown()
    for i, (a, b) in enumerate(zip(ref, got)):
        assert _fields(a) == _fields(b) and a.text == b.text, f"request {i}"


def test_throughput_bench_structured_path_on_cpu(tiny_llama):
    """``bench/throughput.py --structured-schema builtin`` (W1 constrained on the GPU), its
    batchmax runner on the tiny model: every request constrained, exactly the output length."""
    from bench.throughput import build_parser, parse_config, run_batchmax

    a = build_parser().parse_args(["--structured-schema", "builtin", "--chunk", "32", "--max-num-seqs", "8", "--max-num-batched-tokens", "128"])
    r = run_batchmax(parse_config("full"), random_prompts([40] * 4, seed=5), 24, a, model=str(tiny_llama))
    assert r["out_tokens"] == 4 * 24 and r["structured_schema"] == "builtin" and r["config"] == "full +json:builtin"
    plain = run_batchmax(parse_config("full"), random_prompts([40] * 4, seed=5), 24, build_parser().parse_args(["--chunk", "32"]),
                         model=str(tiny_llama))
    assert plain["structured_schema"] is None and plain["config"] == "full"


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_preemption_keeps_the_matcher(tiny_llama, tiny, asy):
    """A preempted request is recomputed from prompt + output; its matcher, on the request,
    carries on where it was."""
    prompts = random_prompts([120, 110, 100, 90, 80, 70], seed=12)
    long = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 16, "maxItems": 16}  # 30+ tokens
    params = [_p(SO(json=long), n=96, temperature=1.0 if i % 2 else 0.0, seed=i) for i in range(6)]
    ref = tiny.generate(prompts, params)
    tight = LLM(str(tiny_llama), device="cpu", chunk_size=64, num_tokens=20 * 16, decode_reserve_tokens=0, async_scheduling=asy)
    outs = tight.generate(prompts, params)
    assert tight.engine.stats().num_preemptions_total > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    for o in outs:
        jsonschema.validate(json.loads(o.text), long)
    _settled(tight)


def test_the_compile_runs_while_the_request_prefills(tiny_llama):
    """Admission only parses the grammar; the compile (xgrammar's costly part) runs on a
    background thread while the request's prompt is prefilled, and its first sampling step
    waits for whatever is left."""
    llm = LLM(str(tiny_llama), async_scheduling=False, **KW)
    eng, st = llm.engine, llm.engine.structured
    gate = threading.Event()
    compiler = st._compiler_()
    real = compiler.compile_grammar
    compiler.compile_grammar = lambda g: (gate.wait(30), real(g))[1]  # held until the prefill has run
    prompt = random_prompts([200], seed=4)[0]  # 7 chunks of 32
    eng.add_request("c", prompt, _p(SO(json=SCHEMAS[1])))
    for _ in range(4):
        eng.step()
    req = eng.requests["c"]
    assert req.num_computed_tokens == 4 * 32 and not req.grammar.compiled.done()
    gate.set()
    out = None
    while eng.has_unfinished_requests():
        out = next((o for o in eng.step() if o.finished), out)
    jsonschema.validate(json.loads(out.text), SCHEMAS[1])
    assert st.compile_wait_s < 30


@pytest.mark.parametrize("any_ws", [False, True])
def test_json_whitespace_setting(tiny, any_ws):
    """``json_any_whitespace`` (``--json-any-whitespace``): compact JSON (", " and ": ") by
    default, any whitespace between tokens (vLLM's default) when set."""
    import xgrammar as xgr

    from batchmax.engine.config import StructuredOutputsConfig
    from batchmax.engine.structured_output import StructuredOutputs

    e = tiny.engine
    st = StructuredOutputs(StructuredOutputsConfig(json_any_whitespace=any_ws), e.tokenizer, e.runner.spec.vocab_size,
                           e.eos_token_ids, lambda t, d: t)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}, "required": ["a", "b"]}
    compiled = st.compile(SO(json=schema)).result()
    for text, compact in (('{"a": 1, "b": true}', True), ('{ "a":1,\n  "b" : true }', False)):
        m = xgr.GrammarMatcher(compiled)
        assert (m.accept_string(text) and m.is_completed()) == (compact or any_ws), text


def test_length_bounded_strings_are_one_character_class_without_control_characters():
    """xgrammar's bounded-string rule lets raw control characters through (invalid JSON); the
    rewrite refuses them with a plain character class: an escape alternative there made each
    bitmask fill ~7x slower. Inside the bound any other character goes, and the bound holds."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from batchmax.engine.default_model import resolve_model
    from batchmax.engine.structured_output import json_schema_ebnf

    schema = json.dumps({"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}}, "required": ["k"]})
    ebnf = json_schema_ebnf(schema, False)
    (rule,) = [line for line in ebnf.splitlines() if line.split(" ::= ")[0].endswith("_characters")]
    assert rule.split(" ::= ")[1] == r'(([^\0-\x1f\"\\]))'
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok)).compile_grammar(xgr.Grammar.from_ebnf(ebnf))

    def accepts(text: str) -> bool:
        m = xgr.GrammarMatcher(compiled)
        return m.accept_string(text) and (not text.endswith("}") or m.accept_token(tok.eos_token_id))

    assert accepts('{"k": "a b"}') and accepts('{"k": "é!"}') and accepts('{"k": ""}')
    assert not accepts('{"k": "a\x01')  # a raw control character
    assert not accepts('{"k": "abcd')  # past maxLength

"""The model's own sampling defaults (``--generation-config auto``, as vLLM's): temperature,
top_p, top_k, min_p and repetition_penalty from the model folder's generation_config.json
apply to requests that do not set them; a request's own values win; ``none`` turns it off."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import httpx
import pytest

from batchmax.engine import LLM, SamplingParams
from batchmax.server.app import build_app
from batchmax.server.serving import SAMPLING_DEFAULTS, model_sampling_defaults
from batchmax.server.settings import ServerSettings
from tests.helpers import random_prompts
from tests.server.conftest import start_server
from tests.server.fake_engine import FakeEngine
from tests.server.test_app_fake_engine import ThreadServer

DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
OPENAI = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _model_dir(tmp_path, tiny_llama, gen: dict | None, weights: bool = False):
    d = tmp_path / "model"
    d.mkdir()
    for f in tiny_llama.iterdir():
        if f.name == "config.json" or f.name.startswith("tokenizer") or f.name == "chat_template.jinja" or weights:
            shutil.copy(f, d / f.name)
    (d / "generation_config.json").unlink(missing_ok=True)
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def test_reads_only_the_sampling_fields_it_knows(tmp_path, tiny_llama):
    d = _model_dir(tmp_path, tiny_llama, {**DEFAULTS, "do_sample": True, "max_new_tokens": 7, "bos_token_id": 1})
    assert model_sampling_defaults(d) == DEFAULTS
    assert set(SAMPLING_DEFAULTS) == set(DEFAULTS)


def test_no_file_and_unset_fields_give_nothing(tmp_path, tiny_llama):
    assert model_sampling_defaults(_model_dir(tmp_path, tiny_llama, None)) == {}
    # what save_pretrained writes for a model config: no sampling field
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert model_sampling_defaults(tmp_path / "model") == {}


def test_values_the_engine_would_refuse_are_left_out(tmp_path, tiny_llama):
    d = _model_dir(tmp_path, tiny_llama, {"temperature": "hot", "top_p": 0.0, "top_k": 2.5, "min_p": 3, "repetition_penalty": 1.3})
    assert model_sampling_defaults(d) == {"repetition_penalty": 1.3}
    d2 = tmp_path / "m2"
    shutil.copytree(d, d2)
    (d2 / "generation_config.json").write_text("{not json")
    assert model_sampling_defaults(d2) == {}


class RecordingEngine(FakeEngine):
    """FakeEngine with a model folder in its config; remembers the params it was given."""

    def __init__(self, tokenizer, model_dir) -> None:
        super().__init__(tokenizer)
        self.config = SimpleNamespace(model=str(model_dir))
        self.seen: list[SamplingParams] = []

    def add_request(self, request_id, prompt, params) -> None:
        self.seen.append(params)
        super().add_request(request_id, prompt, params)


def _sampling(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in SAMPLING_DEFAULTS}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_request_values_override_the_models_defaults(tmp_path, tiny_llama, tokenizer, mode):
    engine = RecordingEngine(tokenizer, _model_dir(tmp_path, tiny_llama, {**DEFAULTS, "do_sample": True}))
    base = DEFAULTS if mode == "auto" else OPENAI
    with ThreadServer(build_app(engine, ServerSettings(generation_config=mode))) as srv:
        def send(path, **body):
            body.setdefault("prompt" if path == "/v1/completions" else "messages",
                            "hi" if path == "/v1/completions" else [{"role": "user", "content": "hi"}])
            r = httpx.post(srv.url + path, json={"max_tokens": 2, **body}, timeout=30)
            assert r.status_code == 200, r.text
            return _sampling(engine.seen[-1])

        for path in ("/v1/completions", "/v1/chat/completions"):
            assert send(path) == base
            own = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
            assert send(path, **own) == own
            assert send(path, temperature=1.3, min_p=0.5) == {**base, "temperature": 1.3, "min_p": 0.5}
            assert send(path, temperature=None) == base  # null: not set
        assert engine.seen[-1].max_tokens == 2  # max_new_tokens of the file is not read


def test_generation_config_cli_flag():
    from batchmax.server.cli import build_parser

    assert build_parser().parse_args(["serve"]).generation_config == "auto"
    assert build_parser().parse_args(["serve", "--generation-config", "none"]).generation_config == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--generation-config", "vllm"])
    with pytest.raises(ValueError, match="generation_config"):
        ServerSettings(generation_config="off")


@pytest.fixture(scope="module")
def gen_model(tmp_path_factory, tiny_llama):
    """The tiny Llama with sampling defaults that make its output deterministic: top_k 1."""
    d = _model_dir(tmp_path_factory.mktemp("gen"), tiny_llama,
                   {"do_sample": True, "temperature": 0.7, "top_k": 1, "repetition_penalty": 1.8}, weights=True)
    return d


def test_real_server_auto_and_none(gen_model, tmp_path_factory):
    prompt = random_prompts([8] * 16, seed=7)[10]
    llm = LLM(str(gen_model), device="cpu", num_tokens=4096)

    def offline(**kw) -> str:
        return llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, **kw))[0].text

    defaults = offline(temperature=0.0, repetition_penalty=1.8)  # top_k 1: the argmax
    plain = offline(temperature=0.0)
    sampled = offline(temperature=1.0, seed=5)
    assert len({defaults, plain, sampled}) == 3
    body = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True, "seed": 5}
    for mode, want_default in (("auto", defaults), ("none", sampled)):
        srv = start_server(gen_model, tmp_path_factory, "--generation-config", mode)
        try:
            assert _text(srv, body) == want_default, mode
            assert _text(srv, {**body, "temperature": 0, "top_k": 0, "repetition_penalty": 1.0}) == plain, mode
        finally:
            srv.stop()


def _text(srv, body: dict) -> str:
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]

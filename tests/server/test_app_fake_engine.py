"""The app under uvicorn in a thread, with FakeEngine: loading state, load failure, and an
engine that fails mid-request."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from batchmax.server.app import build_app
from batchmax.server.settings import ServerSettings
from tests.server.conftest import ThreadServer
from tests.server.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_health_is_503_until_the_model_is_loaded(tokenizer):
    gate = threading.Event()

    def load():
        gate.wait(30)
        return FakeEngine(tokenizer)

    with ThreadServer(build_app(load, ServerSettings())) as srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and "retry-after" in r.headers
        assert httpx.get(srv.url + "/v1/models").status_code == 503
        assert httpx.get(srv.url + "/metrics").status_code == 200  # scrapeable while loading
        gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "fake-model" and r.json()["usage"]["completion_tokens"] == 3


def test_load_failure_is_reported(tokenizer):
    def load():
        raise RuntimeError("weights are corrupt")

    app = build_app(load, ServerSettings())
    fatal = threading.Event()
    app.state.bm.on_fatal = fatal.set
    with ThreadServer(app) as srv:
        assert fatal.wait(10)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "corrupt" in r.json()["error"]


def test_engine_failure_ends_requests_with_errors_and_the_server_survives(tokenizer):
    fake = FakeEngine(tokenizer, step_delay=0.01)
    with ThreadServer(build_app(fake, ServerSettings(served_model_name="served-name"))) as srv:
        results = {}

        def non_stream():
            results["plain"] = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 300}, timeout=30)

        t = threading.Thread(target=non_stream)
        t.start()
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                          json={"model": "served-name", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "stream": True}) as r:
            lines = r.iter_lines()
            for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break
            fake.fail_steps = 1
            rest = [x for x in lines if x]
        t.join(30)
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["type"] == "server_error" and "simulated device failure" in err["message"]
        plain = results["plain"]
        assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_error"
        # still serving
        assert httpx.get(srv.url + "/health").status_code == 200
        ok = httpx.post(srv.url + "/v1/completions", json={"model": "served-name", "prompt": "again", "max_tokens": 4}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "served-name"


def test_tokenizer_less_engine_serves_token_ids_only():
    with ThreadServer(build_app(FakeEngine(None), ServerSettings())) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "logprobs": 1, "echo": True})
        assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        for path, body in [("/v1/completions", {"prompt": "text"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                           ("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})]:
            r = httpx.post(srv.url + path, json=body)
            assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"], (path, r.text)


def test_tokenisation_runs_off_the_event_loop(tokenizer, monkeypatch):
    """A prompt that takes long to tokenise (held here until released) does not stall the
    server: /health and token-id requests are answered meanwhile; text is encoded in the
    tokenizer threads."""
    entered, release, threads = threading.Event(), threading.Event(), []
    encode = type(tokenizer).encode

    def held_encode(self, text, **kw):
        threads.append(threading.current_thread().name)
        if text == "slow":
            entered.set()
            release.wait(30)
        return encode(self, text, **kw)

    # every copy of the tokenizer (the pool's threads each use one)
    monkeypatch.setattr(type(tokenizer), "encode", held_encode)
    with ThreadServer(build_app(FakeEngine(tokenizer), ServerSettings())) as srv:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(srv.url + "/v1/completions", json={"prompt": "slow", "max_tokens": 2}, timeout=60)))
        t.start()
        try:
            assert entered.wait(10)
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=5)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            assert "r" not in result  # still held
        finally:
            release.set()
        t.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 2
        r = httpx.post(srv.url + "/tokenize", json={"prompt": "hello there"}, timeout=10)
        names = list(threads)
        assert r.status_code == 200 and r.json()["tokens"] == tokenizer.encode("hello there")
        assert names and all(name.startswith("batchmax-tokenize") for name in names), names

"""One request must never hurt another: whatever a request carries is checked before it is
admitted, so a bad one is refused with a 400 and the requests running beside it finish
exactly as they would alone; stop strings are bounded; admission counts every sequence a
call makes (prompts x n)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from batchmax.server.serving import _bytes_to_unicode
from tests.server.test_http import assert_error, events, post
from tests.server.test_lifecycle import first_tokens

VOCAB = 49152  # the tiny models borrow SmolLM2's tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def token_ids(tokenizer, content: list[dict]) -> list[int]:
    """Generated token ids from chat logprobs: a byte-level BPE token's bytes name it exactly."""
    enc = _bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids(["".join(enc[b] for b in e["bytes"]) for e in content])


# ----------------------------------------------------------------------------- token ids
@pytest.mark.parametrize("ids", [[10**9], [-(10**6)], [-1], [VOCAB], [5, VOCAB + 7]])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stop_token_ids_outside_the_vocabulary_are_400(server, path, ids):
    body = {"stop_token_ids": ids, "min_tokens": 2, "max_tokens": 4}
    body |= {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    err = assert_error(post(server, path, body), 400, param="stop_token_ids", code="invalid_value")
    bad = next(t for t in ids if not 0 <= t < VOCAB)
    assert err["message"] == f"stop_token_ids: token id {bad} is outside the vocabulary (0..{VOCAB - 1})"
    assert err["type"] == "invalid_request_error"


def test_prompt_token_ids_outside_the_vocabulary_are_400_naming_prompt(server):
    for prompt in ([1, 2, 10**9], [[1, 2], [-3]], [VOCAB]):
        err = assert_error(post(server, "/v1/completions", {"prompt": prompt, "stop_token_ids": [3]}), 400,
                           param="prompt", code="invalid_value")
        assert "prompt token id" in err["message"] and "vocabulary" in err["message"]


# (field, a value out of its range): the sampling fields of /v1/completions (a max_tokens past
# the context is context_length_exceeded on the prompt, as OpenAI answers; test_http has it)
OUT_OF_RANGE = [
    ("temperature", -1.0), ("temperature", 1e6), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -5),
    ("min_p", 1.5), ("min_p", -0.1), ("presence_penalty", 3.0), ("frequency_penalty", -3.0),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("logit_bias", {str(10**9): 1.0}), ("logit_bias", {"5": 1000.0}), ("logit_bias", {"-1": 1.0}),
    ("allowed_token_ids", [10**9]), ("allowed_token_ids", [-1]), ("allowed_token_ids", []),
    ("stop_token_ids", [10**9]), ("stop_token_ids", [-5]), ("min_tokens", -1), ("min_tokens", 10**6),
    ("max_tokens", -1), ("seed", 2**70), ("n", 0), ("n", 10**6),
    ("logprobs", 100), ("logprobs", -1), ("prompt_logprobs", 100), ("kv_budget", -1), ("kv_budget", 10**30),
    ("kv_policy", "no-such-policy"), ("bad_words", ["x" * 100000]),
]


def test_bad_requests_beside_20_streams_leave_their_tokens_unchanged(server, model_id, tokenizer):
    """20 greedy streams run while requests with out-of-range stop ids (the sampler's scatter
    used to raise inside the step, failing all 20) and bad prompt ids are refused: each stream
    ends with exactly the tokens it gets alone."""
    n, max_tokens = 20, 96

    def body(i: int) -> dict:
        return {"model": model_id, "messages": [{"role": "user", "content": f"stream number {i}"}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "logprobs": True}

    alone = []
    for i in range(n):
        r = post(server, "/v1/chat/completions", body(i))
        assert r.status_code == 200, r.text
        alone.append(token_ids(tokenizer, r.json()["choices"][0]["logprobs"]["content"]))
    assert all(len(t) == max_tokens for t in alone)

    started = [threading.Event() for _ in range(n)]
    results: list[dict] = [{} for _ in range(n)]

    def stream(i: int) -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                              json={**body(i), "stream": True, "stream_options": {"include_usage": True}}) as r:
                raw = b""
                for chunk in r.iter_raw():
                    raw += chunk
                    if b'"logprobs":{"content"' in raw:
                        started[i].set()
                results[i]["raw"] = raw
        except Exception as exc:  # reported below
            results[i]["error"] = exc
        finally:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60)
    bad = [
        ("/v1/completions", {"prompt": "bad", "stop_token_ids": [10**9], "min_tokens": 2, "max_tokens": 8}, "stop_token_ids"),
        ("/v1/completions", {"prompt": [7, 8, 9], "stop_token_ids": [-(10**6)], "min_tokens": 2, "max_tokens": 8}, "stop_token_ids"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "bad"}], "stop_token_ids": [-1], "min_tokens": 3},
         "stop_token_ids"),
        ("/v1/completions", {"prompt": [[5, 6], [5, VOCAB]], "max_tokens": 8}, "prompt"),
        ("/v1/completions", {"prompt": [3, 10**12], "max_tokens": 8}, "prompt"),
    ]
    for _ in range(3):
        for path, b, param in bad:
            assert_error(post(server, path, {"model": model_id, **b}), 400, param=param, code="invalid_value")
    # every sampling field, out of range, beside the same 20 streams: each a 400 naming it
    for field, value in OUT_OF_RANGE:
        r = post(server, "/v1/completions", {"model": model_id, "prompt": [7, 8, 9], "max_tokens": 8, field: value})
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"].split(".")[0] == field, (field, r.json())
    for t in threads:
        t.join(120)
    for i, res in enumerate(results):
        assert "error" not in res, res["error"]
        evs = events(res["raw"])
        assert evs[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in evs[:-1]]
        assert all("error" not in c for c in chunks), [c for c in chunks if "error" in c]
        content = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
        assert token_ids(tokenizer, content) == alone[i], f"stream {i}"
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
        assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["length"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# ----------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stop_strings_are_bounded_by_default(server, path):
    """16 stop strings of at most 256 characters: one more, or one character longer, is a 400
    naming ``stop`` (every string is checked after every token)."""
    base = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    base |= {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    many = [f"never {i}" for i in range(17)]
    err = assert_error(post(server, path, {**base, "stop": many}), 400, param="stop", code="invalid_value")
    assert err["message"] == "'stop' may hold at most 16 sequences, got 17."
    err = assert_error(post(server, path, {**base, "stop": ["a", "z" * 257]}), 400, param="stop", code="invalid_value")
    assert err["message"] == "Stop sequences may be at most 256 characters long; stop sequence 1 has 257."
    assert_error(post(server, path, {**base, "stop": "q" * 257}), 400, param="stop", code="invalid_value")
    r = post(server, path, {**base, "stop": many[:15] + ["z" * 256]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def limits_server(tiny_llama, tmp_path_factory):
    """One request running at a time, three waiting at most, three per call; tight stop bounds."""
    from tests.server.conftest import start_server

    srv = start_server(tiny_llama, tmp_path_factory, "--max-num-seqs", "1", "--max-queued", "3", "--max-sequences-per-call", "3",
                       "--max-stop-sequences", "2", "--max-stop-length", "8")
    yield srv
    srv.stop()


def test_stop_bounds_follow_the_options(limits_server):
    base = {"prompt": "x", "max_tokens": 2}
    err = assert_error(post(limits_server, "/v1/completions", {**base, "stop": ["a", "b", "c"]}), 400, param="stop", code="invalid_value")
    assert "at most 2" in err["message"]
    err = assert_error(post(limits_server, "/v1/completions", {**base, "stop": "123456789"}), 400, param="stop", code="invalid_value")
    assert "at most 8 characters" in err["message"]
    assert post(limits_server, "/v1/completions", {**base, "stop": ["12345678", "abcdefgh"]}).status_code == 200


# ----------------------------------------------------------------------------- admission
def test_a_call_is_capped_in_sequences_not_in_requests(server):
    """prompts x n, at most 256 by default: one call of 100 prompts x n=128 used to queue
    12,800 sequences."""
    err = assert_error(post(server, "/v1/completions", {"prompt": [[5, 6]] * 100, "n": 128, "max_tokens": 1}), 400,
                       param="n", code="invalid_value")
    assert err["message"] == "This call asks for 12800 sequences (100 prompt(s) x n=128); the server accepts at most 256 per call."
    assert_error(post(server, "/v1/completions", {"prompt": [[5]] * 257, "max_tokens": 1}), 400, param="prompt", code="invalid_value")
    assert_error(post(server, "/v1/completions", {"prompt": ["a"] * 300, "max_tokens": 1}), 400, param="prompt", code="invalid_value")
    assert_error(post(server, "/v1/completions", {"prompt": [[5]] * 3, "n": 86, "max_tokens": 1}), 400, param="n", code="invalid_value")
    r = post(server, "/v1/completions", {"prompt": [[5]] * 4, "n": 64, "max_tokens": 1, "temperature": 0})  # 256: allowed
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 256


def test_per_call_cap_follows_the_option(limits_server):
    url = limits_server.url
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 4}), 400, param="n", code="invalid_value")
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": [[1], [2], [3], [4]]}), 400, param="prompt", code="invalid_value")
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": [[1], [2]], "n": 2}), 400, param="n", code="invalid_value")
    assert_error(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 4}), 400,
                 param="n", code="invalid_value")
    r = httpx.post(url + "/v1/completions", json={"prompt": [[1], [2], [3]], "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_the_queue_counts_every_sequence_of_a_call(limits_server):
    """--max-num-seqs 1 --max-queued 3: A runs, B's two prompts wait; a call of two more
    sequences would make four waiting (503), a call of one makes three (admitted)."""
    url = limits_server.url
    long = {"max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/completions", json={**long, "prompt": "hold the line"}) as a:
            a_lines = first_tokens(a)  # noqa: F841 - keeps the stream open
            with c.stream("POST", url + "/v1/completions", json={**long, "prompt": ["wait one", "wait two"]}) as b:
                assert b.status_code == 200
                deadline = time.monotonic() + 10
                while limits_server.metrics()["batchmax:num_requests_waiting"] != 2:
                    assert time.monotonic() < deadline, "B's prompts never queued"
                    time.sleep(0.02)
                before = limits_server.metrics()
                refused = [
                    c.post(url + "/v1/completions", json={"prompt": "two", "n": 2, "max_tokens": 2}),
                    c.post(url + "/v1/completions", json={"prompt": [[1, 2], [3, 4]], "max_tokens": 2}),
                    c.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 2}),
                ]
                for r in refused:
                    err = assert_error(r, 503, code="queue_full")
                    assert err["type"] == "server_error" and int(r.headers["retry-after"]) >= 1
                    assert "2 requests are already queued and this call would add 2 (at most 3 may wait)" in err["message"]
                after = limits_server.metrics()
                rejected = "batchmax:num_requests_rejected_total{reason=queue_full}"
                assert after[rejected] - before[rejected] == 3
                with c.stream("POST", url + "/v1/completions", json={**long, "prompt": "one more fits"}) as d:
                    assert d.status_code == 200  # 2 + 1 = 3 may wait
                assert limits_server.metrics()["batchmax:num_requests_running"] == 1  # A was never disturbed
    m = limits_server.wait_idle(timeout=20)
    assert m["batchmax:num_requests_running"] == 0 and m["batchmax:kv_cache_usage_perc"] == 0
    r = httpx.post(url + "/v1/completions", json={"prompt": [[1], [2], [3]], "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_admitted_calls_still_tokenizing_count_against_the_queue():
    """Many calls arriving at once each pass admission before any reaches the engine (they
    tokenize first): the sequences admitted but not yet submitted count too."""
    from batchmax.server.context import ServerContext
    from batchmax.server.protocol import APIError
    from batchmax.server.settings import ServerSettings

    class Idle:  # an engine with nothing queued
        num_waiting = 0
        model_name = "idle"

    ctx = ServerContext(ServerSettings(max_queued=4))
    ctx.engine, ctx.ready = Idle(), True
    first = ctx.admit(1, 3)
    with pytest.raises(APIError) as e:
        ctx.admit(1, 2)  # 3 pending + 2 > 4, although the engine has nothing waiting
    assert e.value.status == 503 and e.value.code == "queue_full"
    first.submitted()  # now the engine's to count (Idle says 0 waiting)
    second = ctx.admit(1, 2)
    assert ctx.pending_sequences == 2
    second.release()
    first.release()
    assert ctx.pending_sequences == 0 and ctx.inflight == 0

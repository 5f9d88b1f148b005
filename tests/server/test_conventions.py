"""A server's conventions: X-Request-Id on every response, CORS behind --allowed-origins, one
access-log line per request (streams: when they end), the periodic engine stats line, and
the options that control them."""
from __future__ import annotations

import json
import logging
import re
import threading
import time

import httpx
import pytest

from batchmax.engine.stats import EngineStats
from batchmax.server.app import build_app
from batchmax.server.cli import build_parser
from batchmax.server.settings import ServerSettings
from batchmax.server.stats_log import StatsLine
from tests.server.conftest import ThreadServer, wait_access
from tests.server.fake_engine import FakeEngine

CMPL = {"prompt": "hello there", "max_tokens": 3}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def srv(tokenizer):
    with ThreadServer(build_app(FakeEngine(tokenizer), ServerSettings(api_key="k", log_stats_interval=0))) as s:
        yield s


AUTH = {"Authorization": "Bearer k"}


# ----------------------------------------------------------------------------- X-Request-Id
def test_request_id_is_taken_or_made_and_returned_on_every_response(srv):
    r = httpx.post(srv.url + "/v1/completions", json=CMPL, headers={**AUTH, "X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"
    r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "X-Request-Id": "chat-9"})
    assert r.headers["x-request-id"] == "chat-9" and r.json()["id"] == "chatcmpl-chat-9"
    with httpx.stream("POST", srv.url + "/v1/completions", json={**CMPL, "stream": True}, headers={**AUTH, "X-Request-Id": "s1"}) as r:
        assert r.headers["x-request-id"] == "s1"
        ids = {json.loads(e[6:])["id"] for e in r.read().decode().split("\n\n") if e.startswith("data: {")}
    assert ids == {"cmpl-s1"}
    made = httpx.post(srv.url + "/v1/completions", json=CMPL, headers=AUTH)
    rid = made.headers["x-request-id"]
    assert HEX_ID.match(rid) and made.json()["id"] == f"cmpl-{rid}"
    # errors, every kind, carry it too
    for r in [
        httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "top_p": 0}, headers={**AUTH, "X-Request-Id": "e1"}),  # 400
        httpx.post(srv.url + "/v1/completions", json=CMPL, headers={"X-Request-Id": "e1"}),  # 401
        httpx.get(srv.url + "/nowhere", headers={"X-Request-Id": "e1"}),  # 404
        httpx.get(srv.url + "/v1/completions", headers={**AUTH, "X-Request-Id": "e1"}),  # 405
        httpx.get(srv.url + "/health", headers={"X-Request-Id": "e1"}),
        httpx.get(srv.url + "/metrics", headers={"X-Request-Id": "e1"}),
    ]:
        assert r.headers["x-request-id"] == "e1", (r.status_code, r.headers)
    # the same id twice at once is fine: engine requests have ids of their own
    results = []
    threads = [threading.Thread(target=lambda: results.append(httpx.post(srv.url + "/v1/completions", json=CMPL,
                                                                         headers={**AUTH, "X-Request-Id": "dup"})))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 3


def test_a_bad_request_id_is_replaced(srv):
    for bad in ["has space", "x" * 129, "tab\there", "é"]:
        r = httpx.get(srv.url + "/health", headers={"X-Request-Id": bad.encode("utf-8")})
        assert HEX_ID.match(r.headers["x-request-id"]), bad


def test_an_unexpected_error_is_a_500_with_the_request_id(tokenizer, monkeypatch):
    def broken(self, *a, **kw):
        raise RuntimeError("tokenizer exploded")

    with ThreadServer(build_app(FakeEngine(tokenizer), ServerSettings(log_stats_interval=0))) as s:
        # every tokenizer thread has its own copy (server/tokenizing.py): break them all
        monkeypatch.setattr(type(tokenizer), "encode", broken)
        r = httpx.post(s.url + "/tokenize", json={"prompt": "x"}, headers={"X-Request-Id": "boom"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "boom"
        assert r.json() == {"error": {"message": "Internal server error (RuntimeError).", "type": "server_error", "param": None, "code": None}}
        assert httpx.get(s.url + "/health").status_code == 200


# ----------------------------------------------------------------------------- CORS
def test_cors_is_off_by_default(srv):
    r = httpx.get(srv.url + "/health", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(srv.url + "/v1/completions", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


def test_cors_with_allowed_origins(tokenizer):
    settings = ServerSettings(api_key="k", allowed_origins=["http://app.example"], log_stats_interval=0)
    with ThreadServer(build_app(FakeEngine(tokenizer), settings)) as s:
        # a preflight needs no API key, and is answered for the allowed origin only
        pre = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in pre.headers["access-control-allow-methods"] and "x-request-id" in pre.headers
        r = httpx.post(s.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "Origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()  # readable by the page
        other = httpx.post(s.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        bad = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert bad.status_code == 400


def test_cors_methods_and_headers(tokenizer):
    settings = ServerSettings(allowed_origins=["*"], allowed_methods=["GET", "POST"], allowed_headers=["content-type"], log_stats_interval=0)
    with ThreadServer(build_app(FakeEngine(tokenizer), settings)) as s:
        pre = httpx.options(s.url + "/v1/completions", headers={"Origin": "http://a.example", "Access-Control-Request-Method": "DELETE"})
        assert pre.status_code == 400
        pre = httpx.options(s.url + "/v1/completions", headers={"Origin": "http://a.example", "Access-Control-Request-Method": "POST",
                                                                "Access-Control-Request-Headers": "x-custom"})
        assert pre.status_code == 400
        pre = httpx.options(s.url + "/v1/completions", headers={"Origin": "http://a.example", "Access-Control-Request-Method": "POST",
                                                                "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"


# ----------------------------------------------------------------------------- access log
LINE = re.compile(r"^(?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d+) (?P<ms>\d+\.\d)ms request_id=(?P<rid>\S+) "
                  r"client=127\.0\.0\.1:\d+(?: prompt_tokens=(?P<p>\d+) completion_tokens=(?P<c>\d+))?(?: user=\"(?P<user>[^\"]*)\")?$")


def _access(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "batchmax.access"]


def test_access_log_line_per_request(srv, caplog):
    caplog.set_level(logging.INFO, logger="batchmax.access")
    r = httpx.post(srv.url + "/v1/completions", json={**CMPL, "user": "bob"}, headers={**AUTH, "X-Request-Id": "log-1"})
    c = httpx.post(srv.url + "/v1/chat/completions", json={**CHAT, "n": 2}, headers={**AUTH, "X-Request-Id": "log-2"})
    httpx.get(srv.url + "/health", headers={"X-Request-Id": "log-3"})
    httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "top_p": 0}, headers={**AUTH, "X-Request-Id": "log-4"})
    recs = wait_access(caplog, "log-1", "log-2", "log-3", "log-4")
    assert set(recs) == {"log-1", "log-2", "log-3", "log-4"}
    one = recs["log-1"]
    m = LINE.match(one.getMessage())
    assert m, one.getMessage()
    u = r.json()["usage"]
    assert m.group("method", "path", "status", "rid", "p", "c", "user") == (
        "POST", "/v1/completions", "200", "log-1", str(u["prompt_tokens"]), str(u["completion_tokens"]), "bob")
    assert (one.method, one.path, one.status, one.prompt_tokens, one.completion_tokens, one.user) == (
        "POST", "/v1/completions", 200, u["prompt_tokens"], u["completion_tokens"], "bob")
    assert one.levelno == logging.INFO and 0 <= one.duration_ms < 30_000 and float(m.group("ms")) == one.duration_ms
    chat = recs["log-2"]
    cu = c.json()["usage"]
    assert (chat.prompt_tokens, chat.completion_tokens) == (cu["prompt_tokens"], cu["completion_tokens"]) == (cu["prompt_tokens"], 6)
    for rid, path, status in [("log-3", "/health", 200), ("log-4", "/v1/completions", 400)]:
        m = LINE.match(recs[rid].getMessage())
        assert m and m.group("path", "status") == (path, str(status)) and m.group("p") is None and m.group("user") is None


def test_access_log_of_a_stream_is_written_when_it_ends(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="batchmax.access")
    with ThreadServer(build_app(FakeEngine(tokenizer, step_delay=0.02), ServerSettings(log_stats_interval=0))) as s:
        body = {**CMPL, "max_tokens": 20, "stream": True, "n": 2}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers={"X-Request-Id": "st-1"}) as r:
            lines = r.iter_lines()
            next(x for x in lines if x.startswith("data: {"))
            assert not [rec for rec in _access(caplog) if rec.request_id == "st-1"]  # still streaming
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        rec = wait_access(caplog, "st-1")["st-1"]
        assert (rec.status, rec.completion_tokens) == (200, 40) and rec.duration_ms >= 20 * 20 * 0.9
        # a client that leaves: logged with what was generated until then
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "max_tokens": 500}, headers={"X-Request-Id": "st-2"}) as r:
            for x in r.iter_lines():
                if x.startswith("data: {"):
                    break
        rec = wait_access(caplog, "st-2")["st-2"]
        assert rec.status == 200 and 0 < rec.completion_tokens < 1000


def test_disable_access_log(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="batchmax.access")
    with ThreadServer(build_app(FakeEngine(tokenizer), ServerSettings(access_log=False, log_stats_interval=0))) as s:
        r = httpx.post(s.url + "/v1/completions", json=CMPL, headers={"X-Request-Id": "quiet"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "quiet"
        assert not wait_access(caplog, "quiet", timeout=1.0)


# ----------------------------------------------------------------------------- stats line
def test_stats_line_fields():
    samples = []
    st = StatsLine(lambda: samples[-1])
    samples.append((EngineStats(), 0))
    assert st.tick(100.0) is None  # the first sample is the baseline
    samples.append((EngineStats(num_running=3, kv_usage=0.125, prompt_tokens_total=800, generation_tokens_total=96,
                                num_steps_total=40, step_seconds_total=0.992), 2))
    line, fields = st.tick(110.0)
    assert line == ("engine: running 3 reqs, waiting 2 reqs, KV cache 12.5%, prompt 80.0 tok/s, generation 9.6 tok/s, "
                    "40 steps of 24.8 ms")
    assert fields == {"running": 3, "waiting": 2, "kv_usage": 0.125, "prompt_tps": 80.0, "generation_tps": 9.6,
                      "steps": 40, "step_ms": 24.8}
    # the interval in which the work ended still had tokens: logged (its own steps only)
    samples.append((EngineStats(prompt_tokens_total=800, generation_tokens_total=146, num_steps_total=90, step_seconds_total=1.992), 0))
    assert st.tick(120.0)[0] == ("engine: running 0 reqs, waiting 0 reqs, KV cache 0.0%, prompt 0.0 tok/s, generation 5.0 tok/s, "
                                 "50 steps of 20.0 ms")
    # idle: nothing
    assert st.tick(130.0) is None and st.tick(140.0) is None
    # requests waiting without progress are activity
    samples.append((EngineStats(prompt_tokens_total=800, generation_tokens_total=146, num_steps_total=90, step_seconds_total=1.992), 4))
    fields = st.tick(150.0)[1]
    assert fields["waiting"] == 4 and fields["steps"] == 0 and fields["step_ms"] == 0.0
    # no engine yet (loading): nothing; once loaded, its first interval counts from the tick
    # before (its counters started at 0), so a request served right after loading is seen
    samples = [None]
    st = StatsLine(lambda: samples[-1])
    assert st.tick(10.0) is None
    samples.append((EngineStats(num_running=1, prompt_tokens_total=50, generation_tokens_total=10), 0))
    assert st.tick(20.0)[1] == {"running": 1, "waiting": 0, "kv_usage": 0.0, "prompt_tps": 5.0, "generation_tps": 1.0,
                                "steps": 0, "step_ms": 0.0}


def test_stats_line_is_logged_only_while_busy(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="batchmax.stats")
    interval = 0.2
    with ThreadServer(build_app(FakeEngine(tokenizer, step_delay=0.01), ServerSettings(log_stats_interval=interval))) as s:
        time.sleep(3 * interval)
        assert not [r for r in caplog.records if r.name == "batchmax.stats"]  # idle
        r = httpx.post(s.url + "/v1/completions", json={**CMPL, "max_tokens": 100}, timeout=30)
        assert r.status_code == 200
        time.sleep(2 * interval)
        busy = [r for r in caplog.records if r.name == "batchmax.stats"]
        assert busy, "no stats line while generating"
        assert sum(r.generation_tps for r in busy) > 0 and max(r.running for r in busy) == 1
        for rec in busy:
            assert re.match(r"^engine: running \d+ reqs, waiting \d+ reqs, KV cache \d+\.\d%, prompt \d+\.\d tok/s, "
                            r"generation \d+\.\d tok/s, \d+ steps of \d+\.\d ms$", rec.getMessage()), rec.getMessage()
        n = len(busy)
        time.sleep(4 * interval)
        assert len([r for r in caplog.records if r.name == "batchmax.stats"]) == n  # quiet once idle


def test_log_stats_interval_zero_starts_no_task(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="batchmax.stats")
    with ThreadServer(build_app(FakeEngine(tokenizer, step_delay=0.01), ServerSettings(log_stats_interval=0))) as s:
        httpx.post(s.url + "/v1/completions", json={**CMPL, "max_tokens": 50}, timeout=30)
    assert not [r for r in caplog.records if r.name == "batchmax.stats"]


# ----------------------------------------------------------------------------- options
def test_serve_options():
    p = build_parser()
    a = p.parse_args(["serve"])
    assert (a.host, a.allowed_origins, a.allowed_methods, a.allowed_headers) == ("127.0.0.1", [], ["*"], ["*"])
    assert (a.strict_request_fields, a.disable_access_log, a.log_stats_interval) == (False, False, 10.0)
    a = p.parse_args(["serve", "--allowed-origins", '["http://a.example", "http://b.example"]', "--allowed-methods", "GET, POST",
                      "--allowed-headers", "authorization,content-type", "--strict-request-fields", "--disable-access-log",
                      "--log-stats-interval", "0"])
    assert a.allowed_origins == ["http://a.example", "http://b.example"] and a.allowed_methods == ["GET", "POST"]
    assert a.allowed_headers == ["authorization", "content-type"]
    assert (a.strict_request_fields, a.disable_access_log, a.log_stats_interval) == (True, True, 0.0)
    assert p.parse_args(["serve", "--allowed-origins", "http://a.example"]).allowed_origins == ["http://a.example"]
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--allowed-origins", '["unclosed"'])
    with pytest.raises(ValueError, match="log_stats_interval"):
        ServerSettings(log_stats_interval=-1)

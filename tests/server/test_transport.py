"""Connection bounds of a real ``batchmax serve`` (``server/transport.py``,
``server/request_body.py``): slow, partial and idle sockets are closed after their deadlines
and never keep ``/health`` or a completion from being answered; beyond the connection limit
a request is answered 503 in OpenAI's format; a client gone mid-body is a debug line, not a
traceback. Short timeouts (seconds) keep the module under a minute; only 127.0.0.1."""
from __future__ import annotations

import contextlib
import json
import random
import resource
import selectors
import socket
import threading
import time

import httpx
import pytest

from batchmax.server.settings import ServerSettings
from batchmax.server.transport import FD_HEADROOM, ensure_open_files
from tests.server.conftest import start_server
from tests.server.test_http import ERROR_KEYS

HEADER_S, BODY_S, CHUNK_S = 2.0, 3.0, 1.5
LIMIT = 320
COMPLETION = b'{"prompt": "hello", "max_tokens": 4}'


@pytest.fixture(scope="module")
def bounded_server(tiny_llama, tmp_path_factory):
    srv = start_server(tiny_llama, tmp_path_factory, "--timeout-header", str(HEADER_S), "--timeout-body", str(BODY_S),
                       "--timeout-body-chunk", str(CHUNK_S), "--timeout-keep-alive", "1",
                       "--limit-concurrency", str(LIMIT), "--log-level", "debug")
    yield srv
    srv.stop()


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=5)


def head(path: str = "/v1/completions", length: int = len(COMPLETION), method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


@contextlib.contextmanager
def dripping(socks: list[socket.socket], every: float = 0.4):
    """Sends each socket one more body byte every ``every`` seconds (never stalls, never ends)."""
    stop = threading.Event()

    def run():
        while not stop.wait(every):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b" ")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)


def read_until_closed(socks, timeout: float) -> dict:
    """Everything each socket receives until the server closes it (or ``timeout``), and when."""
    sel = selectors.DefaultSelector()
    got = {s: b"" for s in socks}
    closed_at: dict[socket.socket, float] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    start = time.monotonic()
    while len(closed_at) < len(got) and time.monotonic() < start + timeout:
        for key, _ in sel.select(0.05):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if data:
                got[s] += data
            else:
                closed_at[s] = time.monotonic()
                sel.unregister(s)
    sel.close()
    return {"got": got, "closed_at": closed_at}


def error_of(raw: bytes) -> tuple[int, dict]:
    head_, _, body = raw.partition(b"\r\n\r\n")
    status = int(head_.split(b" ", 2)[1])
    err = json.loads(body)
    assert set(err) == {"error"} and set(err["error"]) == ERROR_KEYS, err
    assert b"connection: close" in head_.lower(), head_
    return status, err["error"]


@pytest.mark.timeout(120)
def test_300_slow_sockets_neither_starve_the_server_nor_stay_open(bounded_server):
    srv = bounded_server
    kinds_in_order = ["idle"] * 90 + ["partial_head"] * 90 + ["partial_body"] * 60 + ["trickle"] * 60
    random.Random(0).shuffle(kinds_in_order)
    opened = time.monotonic()
    kinds: dict[socket.socket, str] = {}
    for kind in kinds_in_order:
        s = connect(srv)
        if kind == "partial_head":
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len")
        elif kind in ("partial_body", "trickle"):
            s.sendall(head() + COMPLETION[:10])
        kinds[s] = kind
    with dripping([s for s, k in kinds.items() if k == "trickle"]):
        _check_300(srv, kinds, opened)
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200


def _check_300(srv, kinds: dict[socket.socket, str], opened: float) -> None:
    # the server answers beside them at once
    t = time.monotonic()
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
    r = httpx.post(srv.url + "/v1/completions", content=COMPLETION, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    answered = time.monotonic() - t
    assert answered < 5, answered

    out = read_until_closed(kinds, timeout=BODY_S + 8)
    still_open = [k for s, k in kinds.items() if s not in out["closed_at"]]
    assert not still_open, f"{len(still_open)} sockets still open: {sorted(set(still_open))}"
    assert min(out["closed_at"].values()) - opened > 1.0  # held until their deadlines, not refused
    for s, kind in kinds.items():
        raw, after = out["got"][s], out["closed_at"][s] - opened
        if kind == "idle":  # nothing was asked: closed without a word
            assert raw == b"" and HEADER_S - 0.5 < after < HEADER_S + 4, (kind, raw, after)
            continue
        status, err = error_of(raw)
        assert status == 408 and err["code"] == "request_timeout" and err["type"] == "invalid_request_error", err
        if kind == "partial_head":
            assert "headers" in err["message"] and HEADER_S - 0.5 < after < HEADER_S + 4, (err, after)
        elif kind == "partial_body":  # stalled: the gap between pieces ran out first
            assert "stalled" in err["message"] and CHUNK_S - 0.5 < after < CHUNK_S + 4, (err, after)
        else:  # a byte every 0.4 s never stalls, but the whole body is late
            assert "did not arrive within" in err["message"] and BODY_S - 0.5 < after < BODY_S + 4, (err, after)
        s.close()


def test_a_kept_alive_connection_has_a_header_deadline_for_each_request(bounded_server):
    with connect(bounded_server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.3)
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        s.sendall(b"GET /heal")  # the next request starts, and stops: no keep-alive timer runs now
        t = time.monotonic()
        out = read_until_closed([s], timeout=HEADER_S + 5)
        assert s in out["closed_at"] and HEADER_S - 0.5 < out["closed_at"][s] - t < HEADER_S + 3
        status, err = error_of(out["got"][s])
        assert status == 408 and err["code"] == "request_timeout"


def test_a_body_nobody_reads_is_discarded_only_until_its_deadline(bounded_server):
    """A route that answers without reading the body (405 here, 401 or 413 elsewhere): the
    client may go on sending it, but not for longer than the body's deadline."""
    with connect(bounded_server) as s:
        t = time.monotonic()
        s.sendall(head("/health", length=10_000) + b"x" * 100)
        with dripping([s]):
            out = read_until_closed([s], timeout=BODY_S + 6)
        assert s in out["closed_at"] and BODY_S - 0.5 < out["closed_at"][s] - t < BODY_S + 3
        assert out["got"][s].startswith(b"HTTP/1.1 405 "), out["got"][s][:200]


def test_over_the_connection_limit_a_request_is_503_in_openai_format(bounded_server):
    srv = bounded_server
    idle = [connect(srv) for _ in range(LIMIT)]
    try:
        time.sleep(0.5)  # accepted by the server
        with connect(srv) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            out = read_until_closed([s], timeout=5)
            assert s in out["closed_at"]
            status, err = error_of(out["got"][s])
            assert status == 503 and err["code"] == "too_many_connections" and err["type"] == "server_error", err
            assert b"retry-after: 1" in out["got"][s].lower()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the closed ones leave the count as the server notices them
        r = httpx.get(srv.url + "/health", timeout=5)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_a_client_gone_mid_body_is_a_debug_line_not_a_traceback(bounded_server):
    srv = bounded_server
    for _ in range(5):
        with connect(srv) as s:
            s.sendall(head() + COMPLETION[:10])
            time.sleep(0.2)  # the route is reading the body
    time.sleep(0.5)
    log = srv.log_path.read_text(errors="replace")
    assert log.count("disconnected before sending the whole body of POST /v1/completions") >= 5, log[-3000:]
    for bad in ("Traceback", "ClientDisconnect", "Exception in ASGI application", "unhandled error"):
        assert bad not in log, log[-5000:]


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("field", ["timeout_header", "timeout_body", "timeout_body_chunk", "timeout_keep_alive"])
def test_timeouts_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        ServerSettings(**{field: 0})


def test_limit_concurrency_must_be_positive():
    with pytest.raises(ValueError, match="limit_concurrency"):
        ServerSettings(limit_concurrency=0)


def test_bad_timeout_flag_fails_before_the_port_opens(capsys):
    from batchmax.server.cli import main

    assert main(["serve", "--timeout-header", "0"]) == 2
    assert "timeout_header must be > 0" in capsys.readouterr().err


def test_the_open_file_limit_is_raised_to_fit_the_connections():
    """A 256-file soft limit (what made 249 slow sockets starve /health) is raised to what
    1024 connections need, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024 + FD_HEADROOM:
        pytest.skip(f"the hard open-file limit ({hard}) is too low to test raising")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert ensure_open_files(1024) == 1024 + FD_HEADROOM == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert ensure_open_files(10) == 1024 + FD_HEADROOM  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_open_file_limit_that_cannot_fit_the_connections_is_warned_about(monkeypatch, caplog):
    limits = {"now": (256, 300)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.update(now=value))
    with caplog.at_level("WARNING", logger="batchmax.server"):
        assert ensure_open_files(1024) == 300
    assert limits["now"] == (300, 300)
    assert "open-file limit (300) is below --limit-concurrency (1024)" in caplog.text


def test_the_schema_documents_the_408():
    from batchmax.server.app import build_app

    paths = build_app(lambda: None).openapi()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert "408" in paths[path]["post"]["responses"], path
    assert "408" not in paths["/v1/models"]["get"]["responses"]

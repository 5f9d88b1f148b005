"""A client that reads its stream a few bytes at a time must not grow the server's memory
with the square of its output: the stream keeps only the newest output of each request
(coalesced on put, engine/async_engine.py ``OutputStream``), and the front end's socket
writes wait for the client (uvicorn's flow control), so what one connection holds is bounded
by its output's size, not by how many steps ran while it did not read."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.server.conftest import start_server


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
def test_slow_reader_keeps_server_memory_bounded(tiny_llama, tmp_path_factory):
    srv = start_server(tiny_llama, tmp_path_factory, "--max-num-seqs", "32")
    try:
        body = json.dumps({"model": "tiny_llama0", "prompt": [5, 6, 7, 8], "max_tokens": 1500, "n": 24, "logprobs": 20,
                           "ignore_eos": True, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(2.0)  # generation under way, the client reading nothing yet
        base = _rss_mb(srv.proc.pid)
        got = b""
        t_end = time.monotonic() + 25
        while time.monotonic() < t_end:  # a few bytes a second, while the engine generates
            got += sock.recv(16)
            time.sleep(0.1)
        growth = _rss_mb(srv.proc.pid) - base
        # 24 sequences x 1,500 tokens with 20 alternatives each make a few MB of output; a
        # backlog of cumulative outputs (one per step per sequence) would be gigabytes
        assert growth < 150, f"front end RSS grew by {growth:.0f} MB while the client read {len(got)} bytes"
        assert got.startswith(b"HTTP/1.1 200")
        sock.close()
        m = srv.wait_idle(60)  # the hang-up aborted the 24 requests and freed their KV
        assert m["batchmax:num_requests_running"] == 0 and m["batchmax:kv_cache_usage_perc"] == 0
    finally:
        srv.stop()

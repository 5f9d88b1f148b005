"""A real ``batchmax serve`` in a subprocess on a free port, serving the tiny Llama."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, model: Path | None, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        model_args = [] if model is None else ["--model", str(model)]  # None: the default model
        cmd = [sys.executable, "-m", "batchmax.server.cli", "serve", *model_args, "--device", "cpu",
               "--port", str(self.port), "--log-level", "warning", *extra]
        env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_ready(self, timeout: float = 120.0) -> "ServerProc":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    # ---- helpers used by many tests
    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label=value,...}': value} (model_name dropped)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once nothing runs, waits or holds KV."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["batchmax:num_requests_running"] == 0 and m["batchmax:num_requests_waiting"] == 0 and m["batchmax:kv_cache_usage_perc"] == 0
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


class ThreadServer:
    """The app under uvicorn in a thread of this process (for FakeEngine tests)."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def wait_access(caplog, *request_ids: str, timeout: float = 10.0) -> dict[str, logging.LogRecord]:
    """The access-log records of these requests. A line is written once the response has
    ended, which may be just after the client has read all of it: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        recs = {r.request_id: r for r in caplog.records if r.name == "batchmax.access" and r.request_id in request_ids}
        if len(recs) == len(request_ids) or time.monotonic() > deadline:
            return recs
        time.sleep(0.01)


def child_pids(pid: int) -> list[int]:
    """The children of process ``pid`` (from /proc)."""
    return [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]


def stream_and_kill(url: str, pid: int, timeout: float) -> list[str]:
    """A long streamed completion on the tiny model; process ``pid`` is SIGKILLed at its third
    event. Returns the data of every event."""
    body = {"model": "tiny_llama0", "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:
                os.kill(pid, signal.SIGKILL)
    return events


def wait_unhealthy(url: str, within_s: float, why: str) -> None:
    """Poll /health until it stops answering 200, failing after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while httpx.get(url + "/health").status_code == 200:
        assert time.monotonic() < deadline, f"/health still 200 after {why}"
        time.sleep(0.1)


def start_server(tiny_llama, tmp_path_factory, *extra: str) -> ServerProc:
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProc(tiny_llama, log, *extra)
    try:
        return srv.wait_ready()
    except Exception:
        srv.stop()
        raise


@pytest.fixture(scope="session")
def server(tiny_llama, tmp_path_factory):
    """The shared server: default options."""
    srv = start_server(tiny_llama, tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def small_server(tiny_llama, tmp_path_factory):
    """One request running at a time, one waiting at most, an API key, and a server-wide
    evicting policy with small prefill chunks."""
    srv = start_server(tiny_llama, tmp_path_factory, "--max-num-seqs", "1", "--max-queued", "1", "--api-key", "sekrit",
                       "--kv-policy", "snapkv", "--kv-budget", "48", "--chunk", "32")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model_id(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]

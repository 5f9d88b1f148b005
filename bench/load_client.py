"""Streaming clients against any OpenAI-compatible server: ``run_load(config, workload)``.

Each request is a streaming completion (or chat completion) with
``stream_options.include_usage``, timed on the client's clock: time to first token (first
chunk carrying text), the gaps between later chunks (inter-token latency; a chunk may carry
more than one token when the server coalesces), end to end. At most ``concurrency`` requests
are in flight; with a finite ``request_rate`` they arrive as a Poisson process, otherwise
all at once (a closed loop of ``concurrency`` clients). A request that fails (HTTP error, an
error event in the stream, no ``[DONE]``, a broken connection) is recorded, never raised.

``disconnect_after_chunks`` makes every client hang up after that many text chunks (a
disconnect storm): the server must then abort those requests and free their KV.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx

from bench.workload import LoadRequest


@dataclass
class LoadConfig:
    url: str
    """The server's base URL (``http://host:port``; ``/v1`` is added)."""
    endpoint: str = "completions"
    """``completions`` or ``chat``."""
    model: str | None = None
    """The model id to send; ``None``: the first of ``/v1/models``."""
    api_key: str | None = None
    concurrency: int = 64
    request_rate: float = math.inf
    """Requests per second (Poisson arrivals); ``inf``: all at once."""
    temperature: float = 0.0
    ignore_eos: bool = True
    """Send vLLM's ``ignore_eos`` so every request generates exactly ``max_tokens``."""
    disconnect_after_chunks: int | None = None
    timeout: float = 600.0
    seed: int = 0
    progress: bool = True
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    """Completed with ``[DONE]`` and no error (or hung up on purpose)."""
    disconnected: bool = False
    """The client hung up on purpose (``disconnect_after_chunks``)."""
    status: int | None = None
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)
    num_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration: float
    """Seconds from the first request sent to the last one ended."""
    model: str


def request_body(cfg: LoadConfig, model: str, req: LoadRequest) -> dict:
    body: dict = {"model": model, "max_tokens": req.max_tokens, "temperature": cfg.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts (--prompt-format text)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def _chunk_text(cfg: LoadConfig, choice: dict) -> str:
    if cfg.endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def stream_one(client: httpx.AsyncClient, cfg: LoadConfig, model: str, index: int, req: LoadRequest) -> RequestResult:
    """One streaming request, timed; never raises (but for cancellation)."""
    res = RequestResult(index)
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    res.start = t0 = time.perf_counter()
    last = None
    done = False
    texts: list[str] = []
    try:
        async with client.stream("POST", cfg.url + path, json=request_body(cfg, model, req), headers=cfg.headers) as r:
            res.status = r.status_code
            if r.status_code != 200:
                raw = (await r.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {r.status_code}: {raw[:500]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"error event: {json.dumps(obj['error'])[:500]}"
                    break
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"].get("prompt_tokens")
                    res.completion_tokens = obj["usage"].get("completion_tokens")
                for choice in obj.get("choices") or []:
                    text = _chunk_text(cfg, choice)
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                    if not text:
                        continue
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.chunk_gaps.append(now - last)
                    last = now
                    texts.append(text)
                    res.num_chunks += 1
                if cfg.disconnect_after_chunks is not None and res.num_chunks >= cfg.disconnect_after_chunks:
                    res.disconnected = True
                    break  # leaving the ``async with`` closes the connection: the hang-up
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.e2e = time.perf_counter() - t0
    res.text = "".join(texts)
    if res.error is None and not done and not res.disconnected:
        res.error = "the stream ended without [DONE]"
    res.ok = res.error is None
    return res


async def resolve_model(client: httpx.AsyncClient, cfg: LoadConfig) -> str:
    if cfg.model:
        return cfg.model
    r = await client.get(cfg.url + "/v1/models", headers=cfg.headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_load(cfg: LoadConfig, workload: list[LoadRequest]) -> LoadRun:
    """Send the workload; see the module docstring."""
    limits = httpx.Limits(max_connections=cfg.concurrency + 1, max_keepalive_connections=cfg.concurrency + 1)
    timeout = httpx.Timeout(cfg.timeout, connect=60.0)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(workload), desc=f"{cfg.concurrency} clients", unit="req")
    rng = random.Random(cfg.seed)
    sem = asyncio.Semaphore(cfg.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, cfg)

        failed = 0

        async def one(i: int, req: LoadRequest) -> RequestResult:
            nonlocal failed
            async with sem:
                res = await stream_one(client, cfg, model, i, req)
            if bar is not None:
                if not res.ok:
                    failed += 1
                    bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)
            return res

        t0 = time.perf_counter()
        tasks: list[asyncio.Task] = []
        for i, req in enumerate(workload):
            if tasks and math.isfinite(cfg.request_rate):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
            tasks.append(asyncio.create_task(one(i, req)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return LoadRun(results, duration, model)

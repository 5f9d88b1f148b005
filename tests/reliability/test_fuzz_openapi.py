"""Property-based fuzzing of every endpoint from the server's own OpenAPI schema
(schemathesis on hypothesis): schema-valid and schema-violating requests, bodies, paths and
headers. The server must never answer 5xx, every error must be OpenAI's
``{"error": {"message", "type", "param", "code"}}``, and answers must match the schema."""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from tests.server.conftest import start_server

ERROR_KEYS = {"message", "type", "param", "code"}
BODY_LIMIT = 1 << 16  # far above anything the fuzzer sends

schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama, tmp_path_factory):
    """A short context keeps every generation the fuzzer can ask for small (64 tokens)."""
    srv = start_server(tiny_llama, tmp_path_factory, "--max-model-len", "64", "--max-num-seqs", "32", "--max-body-bytes", str(BODY_LIMIT))
    yield srv
    srv.stop()


@pytest.fixture
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def check_answer(case, fuzz_server) -> None:
    response = case.call(timeout=120)
    what = f"{case.method} {case.path} {case.body!r:.500} -> {response.status_code} {response.text[:500]}"
    assert response.status_code < 500, what
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, what
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], what
        assert isinstance(body["error"]["type"], str), what
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance])


FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, print_blob=True)


@schema.parametrize()
@settings(FUZZ, max_examples=30)
@pytest.mark.timeout(300)
def test_fuzz_every_endpoint(case, fuzz_server):
    check_answer(case, fuzz_server)


@schema.parametrize()
@settings(FUZZ, max_examples=1000, derandomize=False)
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_fuzz_every_endpoint_heavy(case, fuzz_server):
    check_answer(case, fuzz_server)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.timeout(60)
def test_oversized_body_is_413(fuzz_server, chunked):
    """Refused from Content-Length, or while reading a chunked body (no length given)."""
    body = json.dumps({"prompt": "x " * BODY_LIMIT, "max_tokens": 1}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        # an iterator makes httpx send Transfer-Encoding: chunked
        content = iter([body[i:i + 4096] for i in range(0, len(body), 4096)]) if chunked else body
        r = httpx.post(fuzz_server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large" and set(r.json()["error"]) == ERROR_KEYS
    r = httpx.post(fuzz_server.url + "/v1/completions", json={"prompt": "still fine", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text

"""Tokenizing never blocks other requests behind one large prompt (``server/tokenizing.py``):
a prompt that cannot fit the context is refused from its byte length before it is tokenized;
the bound on bytes per token holds for the tokenizer, and is withheld from tokenizers that can
delete text; tokenizing runs in a pool of threads, each with a tokenizer copy of its own, so a
small request is answered while a large prompt is still being encoded."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest

from batchmax.server.tokenizing import TokenizerPool, bytes_per_token_bound, bytes_to_unicode, utf8_len
from tests.server.conftest import start_server
from tests.server.test_http import assert_error

LONGEST = 81  # SmolLM2's longest token: a newline and 80 spaces


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


# ----------------------------------------------------------------------------- the byte bound
def test_the_bound_is_the_longest_token_in_bytes(tokenizer):
    assert bytes_per_token_bound(tokenizer) == LONGEST
    dec = {c: b for b, c in bytes_to_unicode().items()}
    assert max(len(p) for p in tokenizer.get_vocab() if all(c in dec for c in p)) == LONGEST


@pytest.mark.parametrize("seed", range(3))
def test_no_text_takes_fewer_tokens_than_its_bytes_over_the_bound(tokenizer, seed):
    """Texts built to be cheap in tokens: runs of whitespace (the longest tokens), special
    tokens' text, long words, multi-byte characters."""
    rng = random.Random(seed)
    pieces = ["\n" + " " * 80, " " * 200, "<|im_start|>", "<|endoftext|>", "the", " the", "é", "日本語", "🙂",
              "a" * 300, "\t\t\t", "0123456789", "=" * 64]
    for _ in range(50):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) * LONGEST >= utf8_len(text), (text[:80], len(ids))


def _fast(model, normalizer=None, pre_tokenizer=None):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(model)
    if normalizer is not None:
        t.normalizer = normalizer
    if pre_tokenizer is not None:
        t.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=t)


def test_tokenizers_that_may_delete_text_give_no_bound():
    from tokenizers import Regex, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "ab": 2, "b": 3}
    bpe = lambda **kw: models.BPE(vocab, [("a", "b")], **kw)  # noqa: E731
    none = {
        "wordpiece (one [UNK] per word)": _fast(models.WordPiece(vocab, unk_token="[UNK]")),
        "BERT normalizer (drops control characters)": _fast(bpe(unk_token="[UNK]"), normalizers.BertNormalizer()),
        "strip": _fast(bpe(unk_token="[UNK]"), normalizers.Strip()),
        "whitespace pre-tokenizer (drops spaces)": _fast(bpe(unk_token="[UNK]"), None, pre_tokenizers.Whitespace()),
        "BPE that drops unknown characters": _fast(bpe()),
        "BPE that fuses unknown characters": _fast(bpe(unk_token="[UNK]", fuse_unk=True)),
        "regex replace": _fast(bpe(unk_token="[UNK]"), normalizers.Replace(Regex(r"\s+"), " ")),
    }
    for what, tok in none.items():
        assert bytes_per_token_bound(tok) is None, what
    # an unknown token per character bounds (4 bytes), shrinking normalizers multiply
    assert bytes_per_token_bound(_fast(bpe(unk_token="[UNK]"))) == 5  # "[UNK]"
    assert bytes_per_token_bound(_fast(bpe(unk_token="[UNK]"), normalizers.NFKC())) == 20
    assert bytes_per_token_bound(_fast(bpe(unk_token="[UNK]"), normalizers.Replace("  ", " "))) == 10
    assert bytes_per_token_bound(_fast(bpe(byte_fallback=True), normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]))) == 5  # Llama 2's


# ----------------------------------------------------------------------------- the pool
def test_large_jobs_leave_a_thread_to_small_ones(tokenizer):
    """Pool of 2: two large jobs run one at a time, while small jobs run beside the large
    one, each job with a tokenizer copy no running job shares."""

    async def main():
        pool = TokenizerPool(tokenizer, size=2, large_chars=10)
        release = threading.Event()
        running: list[int] = []
        log: list[str] = []

        def job(tok, name, hold):
            running.append(id(tok))
            assert len(set(running)) == len(running), "two running jobs share a tokenizer"
            log.append(f"start {name}")
            if hold:
                release.wait(10)
            log.append(f"end {name}")
            running.remove(id(tok))
            return tok

        try:
            big1 = asyncio.ensure_future(pool.run(job, "big1", True, chars=100))
            big2 = asyncio.ensure_future(pool.run(job, "big2", True, chars=100))
            await asyncio.sleep(0.2)
            small = [await asyncio.wait_for(pool.run(job, f"small{i}", False, chars=5), 5) for i in range(3)]
            assert log[0] == "start big1" and "start big2" not in log  # the second large one waits
            release.set()
            toks = [await big1, await big2, *small]
            assert log.index("start big2") > log.index("end small2")
            assert all(t is not tokenizer for t in toks) and len({id(t) for t in toks}) == 2  # two copies
        finally:
            release.set()
            pool.close()

    asyncio.run(main())


# ----------------------------------------------------------------------------- a real server
def test_a_prompt_too_large_for_any_context_is_refused_before_tokenizing(server):
    """30 MB of text (the body limit is 32 MiB) cannot fit 2048 tokens of at most 81 bytes:
    400 at once, where tokenizing it took ~25 s."""
    big = "hello world " * (30_000_000 // 12)
    for path, body, param in [("/v1/completions", {"prompt": big, "max_tokens": 1}, "prompt"),
                              ("/v1/completions", {"prompt": ["fine", big], "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}, "messages"),
                              ("/v1/chat/completions", {"messages": [{"role": "system", "content": big[:100_000]},
                                                                     {"role": "user", "content": big[:100_000]}]}, "messages")]:
        t = time.monotonic()
        r = httpx.post(server.url + path, json=body, timeout=60)
        took = time.monotonic() - t
        err = assert_error(r, 400, param=param, code="context_length_exceeded")
        assert "2048 tokens" in err["message"] and f"{LONGEST} bytes" in err["message"], err
        assert took < 8, took  # parsing 30 MB of JSON, not tokenizing it
    # just under the bound it is tokenized, and refused by its token count
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * (2048 * LONGEST), "max_tokens": 1}, timeout=60)
    err = assert_error(r, 400, param="prompt", code="context_length_exceeded")
    assert "However, you requested" in err["message"], err  # its token count


@pytest.fixture(scope="module")
def long_context_server(tiny_llama, tmp_path_factory):
    """A context long enough (300k tokens x 81 bytes) that megabytes of text are admissible
    and take seconds to tokenize."""
    srv = start_server(tiny_llama, tmp_path_factory, "--max-model-len", "300000", "--kv-tokens", "8192")
    yield srv
    srv.stop()


@pytest.mark.timeout(180)
def test_a_small_chat_is_answered_while_a_large_prompt_is_tokenized(long_context_server):
    srv = long_context_server
    big = "hello world, this is a test. " * 150_000  # 4.4 MB, ~1.2M tokens: seconds to encode
    result: dict = {}

    def large():
        t = time.monotonic()
        result["large"] = httpx.post(srv.url + "/v1/completions", json={"prompt": big, "max_tokens": 1}, timeout=120)
        result["large_s"] = time.monotonic() - t
        result["large_done"] = time.monotonic()

    th = threading.Thread(target=large)
    th.start()
    time.sleep(1.0)  # the large prompt is in a tokenizer thread by now
    small = []
    while "large_done" not in result and len(small) < 5:
        t = time.monotonic()
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        small.append((time.monotonic() - t, time.monotonic()))
    th.join(120)
    # the large one was tokenized (it is refused for its 1.2M tokens, not its bytes)
    err = assert_error(result["large"], 400, param="prompt", code="context_length_exceeded")
    assert "However, you requested" in err["message"], err  # its token count
    assert small, f"the large prompt took only {result['large_s']:.2f} s"
    assert small[0][1] < result["large_done"], "the small chat waited for the large prompt"
    assert small[0][0] < result["large_s"] / 3, (small, result["large_s"])

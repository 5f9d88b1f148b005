"""Completion and chat handlers: OpenAI request -> engine requests -> OpenAI response or SSE.

One API call becomes ``len(prompts) * n`` engine requests added together (all accepted or
none); choice ``i * n + j`` is prompt ``i``'s ``j``-th sample, seeded ``seed + j`` when a seed
is given. The engine's text is cumulative and already safe to show (no incomplete UTF-8, stop
strings held back until decided), so a streaming delta is just the new suffix.

Disconnects: a non-streaming call races its generation against the client's
``http.disconnect``; a streaming call runs in ``SSEResponse``, which does the same. Either way
the losing generation is cancelled and its ``OutputStream`` closed, which aborts the engine
requests and frees their KV before the engine's next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse

from batchmax.engine.async_engine import EngineDeadError, OutputStream
from batchmax.engine.default_model import resolve_model
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.request import TokenLogprob
from batchmax.engine.sampling import SamplingParams, StructuredOutputsParams
from batchmax.server.chat_output import ChatOutputParser
from batchmax.server.metrics import RequestTracker
from batchmax.server.protocol import (
    APIError,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprobs,
    TopLogprob,
    UsageInfo,
    bad_request,
    validation_error_to_api,
)
from batchmax.server.reasoning_parsers import ReasoningParser, get_reasoning_parser
from batchmax.server.structured import request_constraint
from batchmax.server.tokenizing import TokenizerPool, bytes_per_token_bound, utf8_len
from batchmax.server.tokenizing import bytes_to_unicode as _bytes_to_unicode
from batchmax.server.tool_calling import ToolPlan, plan_tools, template_messages_tool_calls
from batchmax.server.tool_parsers import ToolParser, detect_tool_parser, get_tool_parser

if TYPE_CHECKING:
    from batchmax.server.context import ServerContext

logger = logging.getLogger("batchmax.server")

DONE = "data: [DONE]\n\n"
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")  # OpenAI's, less "function" (deprecated)
MIN_LOGPROB = -9999.0  # what OpenAI sends for -inf (JSON has no infinity)


# ----------------------------------------------------------------------------- wire helpers
def sse(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Validate a JSON body; every failure is an OpenAI-style 400 (never FastAPI's 422)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            raise bad_request(
                "We could not parse the JSON body of your request. The body must be a JSON object.",
                code="invalid_json",
            ) from None
        raise validation_error_to_api(exc) from None


async def wait_disconnect(receive: Callable) -> None:
    """Returns when the client has gone (the request body must already be consumed)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


async def until_disconnect(request: Request, coro) -> Any:
    """Run ``coro`` unless the client disconnects first (then cancel it, raise ClientGone)."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class SSEResponse(StreamingResponse):
    """``text/event-stream`` from an async generator of already framed events.

    Unlike a plain StreamingResponse it always closes its generator when it ends, however it
    ends (finished, client gone, server shutting down), so the generator's ``finally`` can
    abort the engine requests at once; and it listens for the client's disconnect itself
    (uvicorn silently drops writes to a closed connection, so writing cannot tell)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close: list[Callable[[], None]] = []

    async def _pump(self, send) -> None:
        async for event in self.events:
            # each event goes out in one piece: a client never sees half an event (or half
            # a UTF-8 character)
            await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(wait_disconnect(receive))
            try:
                await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (pump, watch):
                    if not t.done():
                        t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            if not pump.cancelled() and pump.exception() is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif not pump.cancelled():
                logger.error("SSE stream failed", exc_info=pump.exception())
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()
            for cb in self.on_close:
                cb()


# ----------------------------------------------------------------------------- token strings
class TokenStrings:
    """A token's text and raw bytes, as OpenAI shows them in logprobs (cached)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        byte_level = False
        with contextlib.suppress(Exception):
            byte_level = type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel"
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else None

    def text(self, tid: int) -> str:
        s = self._text.get(tid)
        if s is None:
            s = self._text[tid] = self.tok.decode([tid], skip_special_tokens=False) if self.tok is not None else f"token_id:{tid}"
        return s

    def bytes(self, tid: int) -> list[int]:
        b = self._bytes.get(tid)
        if b is None:
            piece = self.tok.convert_ids_to_tokens(tid) if self._byte_decoder is not None else None  # byte-level only
            if piece is not None and all(c in self._byte_decoder for c in piece):
                b = [self._byte_decoder[c] for c in piece]  # exact, even for part of a character
            else:
                b = list(self.text(tid).encode("utf-8"))
            self._bytes[tid] = b
        return b


def _lp(v: float) -> float:
    return max(float(v), MIN_LOGPROB)


# ----------------------------------------------------------------------------- serving
@dataclass
class _Choice:
    index: int
    prompt_idx: int
    request_id: str
    tracker: RequestTracker
    sent_text: str = ""
    sent_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    sent_prompt_logprobs: bool = False
    final: RequestOutput | None = None
    last: RequestOutput | None = None
    """The newest output received (``final`` once finished)."""


# the request parameter an engine message is about: (pattern, parameter)
_PARAM_HINTS = [(r"\bkv[_ ]policy\b|\bpolicy\b", "kv_policy"), (r"\bkv[_ ]budget\b|\bbudget\b", "kv_budget")] + [
    (rf"\b{name}\b", name)
    for name in ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "logprobs", "prompt_logprobs",
                 "stop_token_ids", "stop", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty")
]
# parameters that carry token ids: their messages say "token id" too, so they come before the prompt's
_TOKEN_ID_PARAMS = ("stop_token_ids", "logit_bias", "allowed_token_ids", "bad_words")


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The sampling parameters a model's generation_config.json may give defaults for (vLLM's set,
less max_new_tokens)."""


def model_sampling_defaults(model_path) -> dict[str, float | int]:
    """The values of ``SAMPLING_DEFAULTS`` that ``model_path``'s generation_config.json sets
    (transformers' ``GenerationConfig``; unset fields are None). A value ``SamplingParams``
    would refuse is left out with a warning, so a bad file cannot make every request a 400.
    As in vLLM, ``do_sample`` is not read: a temperature given there applies."""
    from transformers import GenerationConfig

    if not (Path(model_path) / "generation_config.json").is_file():
        return {}
    try:
        cfg = GenerationConfig.from_pretrained(model_path)
    except Exception as exc:
        logger.warning("could not read the generation config of %s (%s); no sampling defaults", model_path, exc)
        return {}
    out: dict[str, float | int] = {}
    for name in SAMPLING_DEFAULTS:
        v = getattr(cfg, name, None)
        if v is None:
            continue
        try:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{type(v).__name__} is not a number")
            if name == "top_k":
                if v != int(v):
                    raise ValueError("top_k must be an integer")
                v = int(v)
            SamplingParams(**{name: v})
        except (TypeError, ValueError) as exc:
            logger.warning("generation_config.json of %s: ignoring %s=%r (%s)", model_path, name, v, exc)
            continue
        out[name] = v
    return out


def engine_error(exc: ValueError, prompt_param: str) -> APIError:
    """The engine's (or SamplingParams') ValueError as a 400 naming the parameter."""
    msg = str(exc)
    low = msg.lower()
    if "context length" in low:
        return bad_request(msg, param=prompt_param, code="context_length_exceeded")
    for name in _TOKEN_ID_PARAMS:  # before the prompt's: their messages say "token id" too
        if re.search(rf"\b{name}\b", low):
            return bad_request(msg, param=name, code="invalid_value")
    if "token id" in low or "prompt" in low:
        return bad_request(msg, param=prompt_param, code="invalid_value")
    # the parameter named first (messages read "min_tokens (9) must not exceed max_tokens (4)")
    found = [(m.start(), name) for pattern, name in _PARAM_HINTS if (m := re.search(pattern, msg, re.IGNORECASE))]
    return bad_request(msg, param=min(found)[1] if found else None, code="invalid_value")


class OpenAIServing:
    def __init__(self, ctx: "ServerContext") -> None:
        self.ctx = ctx
        self.tokens = TokenStrings(ctx.tokenizer)
        # Tokenising and chat templating run in a pool of threads, each with a tokenizer copy
        # of its own, not on the event loop: a prompt of megabytes takes seconds to encode,
        # and on the loop that would stall every stream (server/tokenizing.py). The loop
        # keeps ctx.tokenizer for the little it decodes itself (logprobs, echo).
        self.tokenizer_pool = TokenizerPool(ctx.tokenizer)
        # a prompt of more bytes than this cannot fit the context whatever its text: refused
        # before it is tokenized (None: this tokenizer gives no bound)
        bound = bytes_per_token_bound(ctx.tokenizer) if ctx.tokenizer is not None else None
        self.bytes_per_token = bound
        self.max_prompt_bytes = ctx.max_model_len * bound if bound else None
        self.sampling_defaults = self._sampling_defaults()
        """What the model's generation_config.json sets (``--generation-config auto``)."""
        self.tool_parser = self._tool_parser()
        """The family parser for ``tool_choice: auto`` (None: auto is refused)."""
        name = ctx.settings.reasoning_parser
        self.reasoning_parser: type[ReasoningParser] | None = get_reasoning_parser(name) if name else None

    def _tool_parser(self) -> type[ToolParser] | None:
        name = self.ctx.settings.tool_call_parser
        if name is not None:
            return get_tool_parser(name)
        template = getattr(self.ctx.tokenizer, "chat_template", None)
        detected = detect_tool_parser(template if isinstance(template, str) else None)
        if detected is not None:
            logger.info("tool call parser %r (detected from the chat template; --tool-call-parser overrides it)", detected)
            return get_tool_parser(detected)
        return None

    async def off_loop(self, fn: Callable, *args, chars: int = 0, **kwargs) -> Any:
        """``fn(tokenizer, *args, **kwargs)`` in a tokenizer thread, with a tokenizer copy of
        its own (its exceptions, 400s included, propagate); ``chars``: the text it holds, so
        that large jobs leave a thread to small ones."""
        return await self.tokenizer_pool.run(fn, *args, chars=chars, **kwargs)

    def close(self) -> None:
        self.tokenizer_pool.close()

    def _sampling_defaults(self) -> dict[str, float | int]:
        if self.ctx.settings.generation_config == "none":
            return {}
        config = getattr(self.ctx.engine, "config", None)  # EngineConfig (core client or in-process engine)
        if not hasattr(config, "model"):
            return {}
        try:
            path = resolve_model(config.model)
        except OSError:
            return {}
        defaults = model_sampling_defaults(path)
        if defaults:
            logger.info("sampling defaults from %s/generation_config.json: %s (a request's own values override them)",
                        path, ", ".join(f"{k}={v}" for k, v in defaults.items()))
        return defaults

    @property
    def model_name(self) -> str:
        return self.ctx.model_name

    @staticmethod
    def response_id(prefix: str, request: Request) -> str:
        """The call's id, ``<prefix>-<X-Request-Id>`` (the client's or the one made for it,
        ``middleware.py``), as vLLM does. Engine requests get ids of their own, always unique."""
        rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        return f"{prefix}-{rid}"

    def tokenizer(self, param: str):
        """The event loop's tokenizer (only for use on the loop: work in threads goes through
        ``off_loop``, which hands each job a copy of its own), or a 400 when the engine runs
        without one (shape-only benchmark models): then only token-id prompts are served."""
        if self.ctx.tokenizer is None:
            raise bad_request("This server runs without a tokenizer: send token ids to /v1/completions.", param=param,
                              code="unsupported_value")
        return self.ctx.tokenizer

    # ---------------------------------------------------------------- shared
    def _context_check(self, prompt_len: int, max_tokens: int, param: str) -> None:
        limit = self.ctx.max_model_len
        if prompt_len + max_tokens > limit:
            where = "messages" if param == "messages" else "prompt"
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {where}, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or the completion.",
                param=param,
                code="context_length_exceeded",
            )

    def _bytes_check(self, texts: list[str], param: str, strip: bool = False) -> None:
        """Refuse, before tokenizing, a prompt whose text (``texts`` together; ``strip``: each
        stripped) has more bytes than the context can hold at the vocabulary's longest token."""
        limit = self.max_prompt_bytes
        if limit is None or sum(map(len, texts)) * 4 <= limit:  # a character is at most 4 bytes
            return
        nbytes = sum(utf8_len(t.strip() if strip else t) for t in texts)
        if nbytes > limit:
            where = "messages" if param == "messages" else "prompt"
            raise bad_request(
                f"This model's maximum context length is {self.ctx.max_model_len} tokens, and none of its tokens "
                f"covers more than {self.bytes_per_token} bytes of text: the {nbytes} bytes in the {where} cannot fit "
                f"(at most {limit}). Please reduce the length of the {where}.",
                param=param,
                code="context_length_exceeded",
            )

    def _params(
        self, body, max_tokens: int, j: int, logprobs: int | None, prompt_logprobs: int | None, param: str,
        structured: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        defaults = self.sampling_defaults

        def pick(name: str, fallback):  # the request's value, else the model's default, else OpenAI's
            v = getattr(body, name)
            return v if v is not None else defaults.get(name, fallback)

        try:
            return SamplingParams(
                max_tokens=max_tokens,
                min_tokens=body.min_tokens,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                repetition_penalty=pick("repetition_penalty", 1.0),
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
                allowed_token_ids=body.allowed_token_ids,
                bad_words=list(body.bad_words or []),
                seed=None if body.seed is None else body.seed + j,
                stop_token_ids=list(body.stop_token_ids or []),
                stop=body.stop_list,
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=body.skip_special_tokens,
                spaces_between_special_tokens=body.spaces_between_special_tokens,
                include_stop_str_in_output=body.include_stop_str_in_output,
                kv_policy=body.kv_policy,
                kv_budget=body.kv_budget,
                kv_recall=body.kv_recall,
                structured_outputs=structured,
            )
        except ValueError as exc:
            raise engine_error(exc, param) from None

    def _check_common(self, body) -> tuple[str, StructuredOutputsParams] | None:
        """400 on what the request may not ask; returns its output constraint (the field it
        came from, the engine's params) or None."""
        problem = body.unsupported()
        if problem:
            raise bad_request(problem[1], param=problem[0], code="unsupported_parameter")
        constraint = request_constraint(body)
        if body.stream_options is not None and not body.stream:
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options", code="invalid_value")
        settings = self.ctx.settings
        if body.n > settings.max_n:
            raise bad_request(f"n must be at most {settings.max_n}, got {body.n}", param="n", code="invalid_value")
        # every stop string is checked after every token: bound how many and how long
        stops = body.stop_list
        if len(stops) > settings.max_stop_sequences:
            raise bad_request(f"'stop' may hold at most {settings.max_stop_sequences} sequences, got {len(stops)}.",
                              param="stop", code="invalid_value")
        i = next((i for i, s in enumerate(stops) if len(s) > settings.max_stop_length), None)
        if i is not None:
            raise bad_request(f"Stop sequences may be at most {settings.max_stop_length} characters long; "
                              f"stop sequence {i} has {len(stops[i])}.", param="stop", code="invalid_value")
        # bad words are tokenized in the engine core: the same length bound as stop strings
        words = body.bad_words or []
        i = next((i for i, w in enumerate(words) if len(w) > settings.max_stop_length), None)
        if i is not None:
            raise bad_request(f"Bad words may be at most {settings.max_stop_length} characters long; "
                              f"bad word {i} has {len(words[i])}.", param="bad_words", code="invalid_value")
        return constraint

    async def _submit(
        self, subs: list[tuple[str, list[int], SamplingParams]], param: str, request: Request,
        constraint: tuple[str, StructuredOutputsParams] | None = None,
    ) -> OutputStream:
        try:
            return await self.ctx.engine.add(subs)
        except ValueError as exc:
            err = engine_error(exc, param)
            msg = str(exc)
            if constraint is not None and msg.startswith("structured_outputs"):
                # the grammar did not compile: name the field the client sent it in
                # (structured_outputs.json, response_format.json_schema.schema, ...)
                src, _ = constraint
                err.param = src if src.startswith(("response_format", "tools")) else msg.split(":", 1)[0].split(" ", 1)[0]
            raise err from None
        except EngineDeadError:
            raise APIError(503, "The engine is not running.", "server_error", code="engine_unavailable") from None
        finally:
            ticket = getattr(request.state, "ticket", None)  # set by the route (admission)
            if ticket is not None:
                ticket.submitted()

    def _choices(self, request_id: str, num_prompts: int, n: int, start: float) -> list[_Choice]:
        return [
            _Choice(i * n + j, i, f"{request_id}-{i}-{j}", self.ctx.metrics.tracker(start))
            for i in range(num_prompts)
            for j in range(n)
        ]

    @staticmethod
    def _failure(out: RequestOutput) -> APIError | None:
        if out.finish_reason == "abort":
            return APIError(503, "The request was aborted: the server is shutting down.", "server_error", code="aborted")
        if out.finish_reason == "error":
            return APIError(500, f"The engine failed while running the request ({out.error or 'unknown error'}).", "server_error", code="engine_error")
        return None

    async def _collect(self, stream: OutputStream, by_rid: dict[str, _Choice]) -> None:
        while not stream.finished:
            for out, t in await stream.next_batch():
                ch = by_rid[out.request_id]
                ch.tracker.observe(out, t)
                ch.last = out
                if out.finished:
                    ch.final = out

    async def _run_to_end(self, request: Request, stream: OutputStream, choices: list[_Choice]) -> None:
        """Non-streaming: wait for every choice, unless the client leaves first."""
        by_rid = {c.request_id: c for c in choices}
        try:
            await until_disconnect(request, self._collect(stream, by_rid))
        finally:
            stream.close()
            for c in choices:
                c.tracker.finish("abort")  # no-op for those that finished
        for c in choices:
            err = self._failure(c.final)
            if err:
                raise err

    async def _events(self, stream: OutputStream, choices: list[_Choice], render: Callable[[_Choice, RequestOutput], list[str]], head: list[str], usage: Callable[[], str | None], on_end: Callable[[], None] | None = None) -> AsyncGenerator[str, None]:
        """The SSE body shared by completions and chat: ``render`` turns an output into
        events; failures end the stream with an error event, as vLLM does. ``on_end`` runs
        when the stream ends, however it ends."""
        by_rid = {c.request_id: c for c in choices}
        try:
            for event in head:
                yield event
            while not stream.finished:
                for out, t in await stream.next_batch():
                    ch = by_rid[out.request_id]
                    ch.tracker.observe(out, t)
                    ch.last = out
                    err = self._failure(out) if out.finished else None
                    if err:
                        yield sse(err.body())
                        yield DONE
                        return
                    if out.finished:
                        ch.final = out
                    for event in render(ch, out):
                        yield event
            tail = usage()
            if tail:
                yield tail
            yield DONE
        except Exception as exc:  # a bug must not hang the client: end the stream with an error
            logger.exception("streaming failed")
            yield sse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body())
            yield DONE
        finally:
            stream.close()
            for c in choices:
                c.tracker.finish("abort")
            if on_end is not None:
                on_end()

    @staticmethod
    def _record_usage(request: Request, body, prompt_tokens: int, completion_tokens: int) -> None:
        """What the access-log line reports for this call (``middleware.py``)."""
        request.state.usage = (prompt_tokens, completion_tokens)
        request.state.user = body.user

    def prompt_logprobs(self, out: RequestOutput | None, prompt: list[int], k: int) -> PromptLogprobs:
        """vLLM's ``prompt_logprobs``: None for the first token, then per position
        {token id: {logprob, rank, decoded_token}}, the prompt's own token first and then its
        ``k`` most likely alternatives."""
        ts = self.tokens
        plp = out.prompt_logprobs if out is not None else []
        res: PromptLogprobs = [None]
        for pos in range(1, len(prompt)):
            e = plp[pos] if pos < len(plp) else None
            if e is None:
                res.append(None)
                continue
            d = {str(e.token_id): {"logprob": _lp(e.logprob), "rank": e.rank, "decoded_token": ts.text(e.token_id)}}
            for rank, (tid, v) in enumerate(e.top[:k], 1):
                d.setdefault(str(tid), {"logprob": _lp(v), "rank": rank, "decoded_token": ts.text(tid)})
            res.append(d)
        return res

    # ---------------------------------------------------------------- completions
    @staticmethod
    def _prompt_items(body: CompletionRequest) -> list:
        """The call's prompts, each a string or a list of token ids."""
        p = body.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    def _tokenize_prompts(self, tok, body: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
        ids, texts = [], []
        for item in self._prompt_items(body):
            if isinstance(item, str):
                ids.append(tok.encode(item, add_special_tokens=body.add_special_tokens))
                texts.append(item)
            else:
                ids.append(list(item))
                texts.append(None)  # decoded lazily, only for echo
        return ids, texts

    async def create_completion(self, body: CompletionRequest, request: Request) -> Response:
        start = time.monotonic()
        constraint = self._check_common(body)
        if body.suffix:
            raise bad_request("'suffix' is not supported by this server.", param="suffix", code="unsupported_parameter")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("'best_of' other than n is not supported by this server.", param="best_of", code="unsupported_parameter")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo).", param="max_tokens", code="invalid_value")
        # max_tokens 0 with echo scores the prompt: generate one token, show none
        score_only = max_tokens == 0
        strings = [x for x in self._prompt_items(body) if isinstance(x, str)]
        if strings:
            self.tokenizer("prompt")  # 400 without one
            for text in strings:  # each prompt must fit on its own
                self._bytes_check([text], "prompt")
            prompts, texts = await self.off_loop(self._tokenize_prompts, body, chars=sum(map(len, strings)))
        else:  # token-id prompts need no tokenizer: they do not queue behind another request's text
            prompts, texts = self._tokenize_prompts(None, body)
        for ids in prompts:
            if not ids:
                raise bad_request("The prompt is empty.", param="prompt", code="invalid_value")
            self._context_check(len(ids), max_tokens, "prompt")
        # echo's logprobs and prompt_logprobs come from the same engine rows
        wanted = [k for k in (body.logprobs if body.echo else None, body.prompt_logprobs) if k is not None]
        prompt_lp = max(wanted) if wanted else None
        request_id = self.response_id("cmpl", request)
        choices = self._choices(f"cmpl-{uuid.uuid4().hex}", len(prompts), body.n, start)
        so = constraint[1] if constraint else None
        subs = [(c.request_id, prompts[c.prompt_idx], self._params(body, max(1, max_tokens), c.index % body.n, body.logprobs, prompt_lp, "prompt", so))
                for c in choices]
        stream = await self._submit(subs, "prompt", request, constraint)
        created = int(time.time())
        view = _CompletionView(self, body, prompts, texts, score_only)

        def usage_info() -> UsageInfo:
            completion = sum(len(view.gen_ids(c.last)) for c in choices if c.last is not None)
            prompt = sum(len(p) for p in prompts)
            return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

        def record() -> None:
            u = usage_info()
            self._record_usage(request, body, u.prompt_tokens, u.completion_tokens)

        if body.stream:
            def chunk(ch: _Choice, out: RequestOutput, text: str, logprobs, finish_reason) -> str:
                choice = {"index": ch.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
                if body.prompt_logprobs is not None and not ch.sent_prompt_logprobs:  # on the choice's first chunk
                    choice["prompt_logprobs"] = self.prompt_logprobs(out, prompts[ch.prompt_idx], body.prompt_logprobs)
                    ch.sent_prompt_logprobs = True
                obj = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                       "choices": [choice]}
                if body.continuous_usage:
                    p, g = len(prompts[ch.prompt_idx]), len(view.gen_ids(out))
                    obj["usage"] = {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}
                elif body.include_usage:
                    obj["usage"] = None
                return sse(obj)

            def render(ch: _Choice, out: RequestOutput) -> list[str]:
                text, lp = view.delta(ch, out)
                if not text and lp is None and not out.finished:
                    return []
                return [chunk(ch, out, text, lp, view.finish_reason(out) if out.finished else None)]

            def usage() -> str | None:
                if not body.include_usage:
                    return None
                return sse({"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                            "choices": [], "usage": usage_info().model_dump()})

            return SSEResponse(self._events(stream, choices, render, [], usage, record))

        try:
            await self._run_to_end(request, stream, choices)
        finally:
            record()
        plp = body.prompt_logprobs
        resp = CompletionResponse(
            id=request_id, created=created, model=self.model_name,
            choices=[
                CompletionChoice(
                    index=c.index, text=view.full_text(c), logprobs=view.full_logprobs(c), finish_reason=view.finish_reason(c.final),
                    prompt_logprobs=None if plp is None else self.prompt_logprobs(c.final, prompts[c.prompt_idx], plp),
                )
                for c in choices
            ],
            usage=usage_info(),
        )
        # prompt_logprobs is in the body only when asked for
        return JSONResponse(resp.model_dump(exclude=None if plp is not None else {"choices": {"__all__": {"prompt_logprobs"}}}))

    # ---------------------------------------------------------------- chat
    def chat_prompt(self, tok, messages: list[dict], body, tools: list[dict] | None = None) -> list[int]:
        if not getattr(tok, "chat_template", None):
            raise bad_request("This model has no chat template; use /v1/completions.", param="messages", code="unsupported_value")
        cont = getattr(body, "continue_final_message", False)
        extra = dict(getattr(body, "chat_template_kwargs", None) or {})
        effort = getattr(body, "reasoning_effort", None)
        if effort is not None:
            extra["reasoning_effort"] = effort  # a template variable, as vLLM passes it
        try:
            text = tok.apply_chat_template(
                messages, tokenize=False,
                add_generation_prompt=getattr(body, "add_generation_prompt", True) and not cont,
                **({"continue_final_message": True} if cont else {}),
                **({"tools": tools} if tools else {}),
                **extra,
            )
        except Exception as exc:  # jinja errors: the messages do not fit the template
            raise bad_request(f"The messages could not be formatted with the chat template: {exc}", param="messages",
                              code="invalid_value") from None
        # the template already holds the special tokens
        return tok.encode(text, add_special_tokens=False)

    async def chat_tokens(self, messages: list[dict], body, tools: list[dict] | None = None) -> list[int]:
        """The chat prompt's token ids, tokenized off the loop; refused at once (400) when
        the messages' text alone cannot fit the context."""
        self.tokenizer("messages")  # 400 without one
        contents = [m["content"] for m in messages]
        contents += [json.dumps(m["tool_calls"], ensure_ascii=False) for m in messages if m.get("tool_calls")]
        # templates may trim the content (``| trim``): only what is left counts
        self._bytes_check(contents, "messages", strip=True)
        chars = sum(map(len, contents)) + (len(json.dumps(tools)) if tools else 0)
        return await self.off_loop(self.chat_prompt, messages, body, tools, chars=chars)

    @staticmethod
    def chat_messages(body) -> list[dict]:
        out = []
        for i, m in enumerate(body.messages):
            for name in m.REFUSED:
                if getattr(m, name) not in (None, []):
                    raise bad_request(f"'{name}' in messages is not supported by this server.",
                                      param=f"messages.{i}.{name}", code="unsupported_parameter")
            if m.role not in CHAT_ROLES:
                raise bad_request(
                    f"Invalid value: {m.role!r}. Supported values are: {', '.join(repr(r) for r in CHAT_ROLES)}.",
                    param=f"messages.{i}.role", code="invalid_value",
                )
            # a tool's answer names the call it answers; only assistants make calls
            if m.role == "tool" and not m.tool_call_id:
                raise bad_request("Messages with role 'tool' must have a 'tool_call_id'.",
                                  param=f"messages.{i}.tool_call_id", code="missing_required_parameter")
            if m.role != "tool" and m.tool_call_id is not None:
                raise bad_request("'tool_call_id' is only allowed in messages with role 'tool'.",
                                  param=f"messages.{i}.tool_call_id", code="invalid_value")
            if m.tool_calls and m.role != "assistant":
                raise bad_request("'tool_calls' is only allowed in messages with role 'assistant'.",
                                  param=f"messages.{i}.tool_calls", code="invalid_value")
            try:
                msg = {"role": m.role, "content": m.text()}
            except ValueError as exc:
                raise bad_request(str(exc), param=f"messages.{i}.content", code="invalid_value") from None
            if m.name:
                msg["name"] = m.name
            if m.tool_calls:
                msg["tool_calls"] = template_messages_tool_calls(m.tool_calls, f"messages.{i}.tool_calls")
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out

    def _tool_plan(self, body: ChatCompletionRequest, constraint: tuple[str, StructuredOutputsParams] | None) -> ToolPlan:
        s = self.ctx.settings
        plan = plan_tools(body, self.tool_parser, s.enable_auto_tool_choice, s.exclude_tools_when_tool_choice_none)
        if plan.constrained and constraint is not None:
            field = constraint[0].split(".", 1)[0]
            raise bad_request(f"'{field}' cannot be combined with tool_choice 'required' or a named function "
                              "(both constrain the output).", param=field, code="invalid_value")
        return plan

    def _reasoning_enabled(self, body: ChatCompletionRequest, plan: ToolPlan) -> bool:
        """Whether this request's output is parsed for thinking. Not when the engine constrains
        it to the calls' JSON (there is no thinking in it to take out), nor for a parser that
        honours ``enable_thinking: false`` when the request sends that."""
        cls = self.reasoning_parser
        if cls is None or plan.constrained:
            return False
        kwargs = body.chat_template_kwargs or {}
        return not (cls.honours_enable_thinking and kwargs.get("enable_thinking") is False)

    def _check_reasoning_effort(self, body: ChatCompletionRequest) -> None:
        if body.reasoning_effort is None:
            return
        template = getattr(self.ctx.tokenizer, "chat_template", None)
        if not (isinstance(template, str) and "reasoning_effort" in template):
            raise bad_request("'reasoning_effort' is passed to the chat template, and this model's template does not "
                              "read it.", param="reasoning_effort", code="unsupported_parameter")

    def _output_parser(self, plan: ToolPlan, reasoning: bool) -> ChatOutputParser | None:
        if plan.parser is None and not reasoning:
            return None
        return ChatOutputParser(self.reasoning_parser() if reasoning else None,
                                plan.parser() if plan.parser is not None else None, plan.max_calls)

    @staticmethod
    def _finish_reason(plan: ToolPlan, message: dict, engine_reason: str | None) -> str | None:
        """OpenAI's: ``tool_calls`` when the model chose to call (auto, required) and stopped by
        itself; a named function's call ends with ``stop``, as on OpenAI and vLLM; ``length``
        stays ``length`` (the calls may be cut short)."""
        if plan.mode in ("auto", "required") and message.get("tool_calls") and engine_reason == "stop":
            return "tool_calls"
        return engine_reason

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        start = time.monotonic()
        constraint = self._check_common(body)
        plan = self._tool_plan(body, constraint)
        if plan.constrained:  # the calls' schema is the constraint (a grammar error names 'tools')
            constraint = ("tools", plan.structured)
        self._check_reasoning_effort(body)
        reasoning = self._reasoning_enabled(body, plan)
        messages = self.chat_messages(body)
        prompt_ids = await self.chat_tokens(messages, body, plan.template_tools)
        if not prompt_ids:
            raise bad_request("The messages are empty.", param="messages", code="invalid_value")
        max_tokens = body.max_new_tokens
        if max_tokens is None:  # OpenAI's default: whatever the context leaves
            max_tokens = self.ctx.max_model_len - len(prompt_ids)
            if max_tokens < 1:
                self._context_check(len(prompt_ids), 1, "messages")
        self._context_check(len(prompt_ids), max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        plp = body.prompt_logprobs
        request_id = self.response_id("chatcmpl", request)
        choices = self._choices(f"chatcmpl-{uuid.uuid4().hex}", 1, body.n, start)
        so = constraint[1] if constraint else None
        subs = [(c.request_id, prompt_ids, self._tool_params(self._params(body, max_tokens, c.index, top, plp, "messages", so), plan))
                for c in choices]
        stream = await self._submit(subs, "messages", request, constraint)
        created = int(time.time())
        # vLLM's echo: the reply begins with the message it continues
        last = body.messages[-1]
        echoed = last.text() if body.echo and last.role == "assistant" else ""
        # per choice: reasoning and tool calls parsed out of the text (None: the text is content)
        parsers = {c.index: self._output_parser(plan, reasoning) for c in choices}

        def usage_info() -> UsageInfo:
            completion = sum(len(c.last.token_ids) for c in choices if c.last is not None)
            return UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion, total_tokens=len(prompt_ids) + completion)

        def record() -> None:
            self._record_usage(request, body, len(prompt_ids), usage_info().completion_tokens)

        if body.stream:
            sent_plp = False

            def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, out: RequestOutput | None = None) -> str:
                nonlocal sent_plp
                obj = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                       "system_fingerprint": None,
                       "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
                if plp is not None and out is not None and not sent_plp:  # on the first chunk after the role chunks
                    obj["prompt_logprobs"] = self.prompt_logprobs(out, prompt_ids, plp)
                    sent_plp = True
                if body.continuous_usage:
                    g = len(out.token_ids) if out is not None else 0
                    obj["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": g, "total_tokens": len(prompt_ids) + g}
                elif body.include_usage:
                    obj["usage"] = None
                return sse(obj)

            def render(ch: _Choice, out: RequestOutput) -> list[str]:
                events = []
                text = _suffix(out.text, ch.sent_text)
                ch.sent_text = out.text if out.text.startswith(ch.sent_text) else ch.sent_text
                lp = None
                if top is not None and len(out.logprobs) > ch.sent_tokens:
                    lp = {"content": [self._chat_lp(e, top).model_dump() for e in out.logprobs[ch.sent_tokens:]], "refusal": None}
                    ch.sent_tokens = len(out.logprobs)
                parser = parsers[ch.index]
                if parser is None:
                    deltas = [{"content": text}] if text else []
                else:
                    deltas = parser.feed(text) if text else []
                    if out.finished:
                        deltas += parser.finish()
                if lp and not deltas:  # text held back by a parser: its tokens' logprobs still go out
                    deltas = [{}]
                for k, delta in enumerate(deltas):
                    events.append(chunk(ch.index, delta, lp if k == 0 else None, out=out))
                if out.finished:
                    reason = out.finish_reason if parser is None else self._finish_reason(plan, parser.message(), out.finish_reason)
                    events.append(chunk(ch.index, {}, None, reason, out=out))
                return events

            def usage() -> str | None:
                if not body.include_usage:
                    return None
                return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                            "system_fingerprint": None, "choices": [], "usage": usage_info().model_dump()})

            head = [chunk(c.index, {"role": "assistant", "content": ""}) for c in choices]
            if echoed:
                head += [chunk(c.index, {"content": echoed}) for c in choices]
            return SSEResponse(self._events(stream, choices, render, head, usage, record))

        try:
            await self._run_to_end(request, stream, choices)
        finally:
            record()
        resp = ChatCompletionResponse(
            id=request_id, created=created, model=self.model_name,
            prompt_logprobs=None if plp is None else self.prompt_logprobs(choices[0].final, prompt_ids, plp),
            choices=[
                self._chat_choice(c, parsers[c.index], plan, echoed, top)
                for c in choices
            ],
            usage=usage_info(),
        )
        return JSONResponse(resp.model_dump(exclude=None if plp is not None else {"prompt_logprobs"}))

    def _chat_choice(self, c: _Choice, parser: ChatOutputParser | None, plan: ToolPlan, echoed: str, top: int | None) -> ChatChoice:
        if parser is None:
            message, reason = ChatResponseMessage(content=echoed + c.final.text), c.final.finish_reason
        else:
            parser.feed(c.final.text)
            parser.finish()
            fields = parser.message()
            if echoed:
                fields["content"] = echoed + (fields["content"] or "")
            message, reason = ChatResponseMessage(**fields), self._finish_reason(plan, fields, c.final.finish_reason)
        return ChatChoice(
            index=c.index, message=message, finish_reason=reason,
            logprobs=ChatChoiceLogprobs(content=[self._chat_lp(e, top) for e in c.final.logprobs]) if top is not None else None,
        )

    @staticmethod
    def _tool_params(params: SamplingParams, plan: ToolPlan) -> SamplingParams:
        """The engine request's parameters as the tool plan needs them: the constraint of
        required / named calls, and special tokens kept where the family's call marker is
        one (Mistral's ``[TOOL_CALLS]``)."""
        changes: dict[str, Any] = {}
        if plan.structured is not None:
            changes["structured_outputs"] = plan.structured
        if plan.keep_special_tokens and params.skip_special_tokens:
            changes["skip_special_tokens"] = False
        return dataclasses.replace(params, **changes) if changes else params

    def _chat_lp(self, e: TokenLogprob, top: int) -> ChatTokenLogprob:
        ts = self.tokens
        return ChatTokenLogprob(
            token=ts.text(e.token_id), logprob=_lp(e.logprob), bytes=ts.bytes(e.token_id),
            top_logprobs=[TopLogprob(token=ts.text(i), logprob=_lp(v), bytes=ts.bytes(i)) for i, v in e.top[:top]],
        )


def _suffix(text: str, sent: str) -> str:
    """What ``text`` adds to what was already sent. The engine's text only grows (it holds
    back what it might retract), so this is a plain suffix; if it ever did not, nothing is
    re-sent rather than sending text that contradicts what the client has."""
    if text.startswith(sent):
        return text[len(sent):]
    logger.warning("engine text is not an extension of what was streamed; dropping the difference")
    return ""


class _CompletionView:
    """Text and logprobs of completion choices, including echo and score-only requests."""

    def __init__(self, serving: OpenAIServing, body: CompletionRequest, prompts: list[list[int]], texts: list[str | None], score_only: bool) -> None:
        self.s = serving
        self.body = body
        self.prompts = prompts
        self.texts = texts
        self.score_only = score_only

    def prompt_text(self, i: int) -> str:
        if self.texts[i] is None:
            tok = self.s.ctx.tokenizer
            self.texts[i] = tok.decode(self.prompts[i], skip_special_tokens=False) if tok is not None else ""
        return self.texts[i]

    def gen_ids(self, out: RequestOutput) -> list[int]:
        return [] if self.score_only else out.token_ids

    def gen_text(self, out: RequestOutput) -> str:
        return "" if self.score_only else out.text

    def finish_reason(self, out: RequestOutput) -> str:
        return "length" if self.score_only else out.finish_reason

    def _entries(self, ch: _Choice, out: RequestOutput, start: int, echo: bool) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        entries = []
        if echo:
            plp = out.prompt_logprobs
            for k, tid in enumerate(self.prompts[ch.prompt_idx]):
                e = plp[k] if k < len(plp) else None
                # the engine's rows may hold more alternatives, for prompt_logprobs
                entries.append((tid, None, None) if e is None else (tid, e.logprob, e.top[: self.body.logprobs]))
        if not self.score_only:
            for e in out.logprobs[start:]:
                entries.append((e.token_id, e.logprob, e.top))
        return entries

    def _logprobs(self, ch: _Choice, entries) -> CompletionLogProbs:
        ts = self.s.tokens
        lp = CompletionLogProbs()
        for tid, logprob, top in entries:
            s = ts.text(tid)
            lp.tokens.append(s)
            lp.text_offset.append(ch.text_offset)
            ch.text_offset += len(s)
            if logprob is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(_lp(logprob))
            alts = {ts.text(i): _lp(v) for i, v in top or []}
            alts.setdefault(s, _lp(logprob))  # the chosen token is always listed, as in vLLM
            lp.top_logprobs.append(alts)
        return lp

    def full_text(self, ch: _Choice) -> str:
        return (self.prompt_text(ch.prompt_idx) if self.body.echo else "") + self.gen_text(ch.final)

    def full_logprobs(self, ch: _Choice) -> CompletionLogProbs | None:
        if self.body.logprobs is None:
            return None
        return self._logprobs(ch, self._entries(ch, ch.final, 0, self.body.echo))

    def delta(self, ch: _Choice, out: RequestOutput) -> tuple[str, dict | None]:
        """Text and logprobs this output adds for the client (streaming)."""
        echo = self.body.echo and not ch.started
        ch.started = True
        gen = self.gen_text(out)
        text = _suffix(gen, ch.sent_text)
        if gen.startswith(ch.sent_text):
            ch.sent_text = gen
        if echo:
            text = self.prompt_text(ch.prompt_idx) + text
        lp = None
        if self.body.logprobs is not None:
            entries = self._entries(ch, out, ch.sent_tokens, echo)
            ch.sent_tokens = len(out.logprobs)
            if entries:
                lp = self._logprobs(ch, entries).model_dump()
        return text, lp

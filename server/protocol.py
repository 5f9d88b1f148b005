"""OpenAI wire format: request models (validated), response and chunk models, errors.

Field sets follow OpenAI's API and vLLM's ``entrypoints/openai`` protocol. Requests are
validated strictly (``"max_tokens": "5"`` is a type error, as on OpenAI). No field is accepted
without an effect: every declared field either changes the request or is refused
(``unsupported()``, a 400 ``unsupported_parameter``); unknown fields are kept
(``extra="allow"``) so that ``unknown_fields`` can name them: the server logs a warning and
ignores them, as vLLM does, or with ``--strict-request-fields`` answers 400 as OpenAI does.
Range checks that pydantic can express live here; checks that need the model (context length,
vocabulary, policy names) happen later.
"""
from __future__ import annotations

import re
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchmax.engine.logits_processors import MAX_BAD_WORDS


# ----------------------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400; it always carries a ``code`` (clients branch on it), ``invalid_value`` unless told."""
    return APIError(400, message, "invalid_request_error", param, code or "invalid_value")


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def validation_error_to_api(err: ValidationError) -> APIError:
    """The first pydantic error as an OpenAI 400, naming the offending field in ``param``."""
    first = err.errors(include_url=False)[0]
    # drop the union-member tags pydantic puts in ``loc`` ("prompt.list[int].0" -> "prompt.0")
    loc = [str(p) for p in first.get("loc", ()) if not _UNION_TAG.match(str(p))]
    field = loc[0] if loc else None
    where = ".".join(loc)
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{where}'.", param=field, code="missing_required_parameter")
    text = f"Invalid value for '{where}': {msg}." if where else f"Invalid request body: {msg}."
    return bad_request(text, param=field, code="invalid_value" if where else "invalid_request_body")


# ----------------------------------------------------------------------------- requests
INT64 = (-(2**63), 2**63 - 1)
TokenId = Annotated[int, Field(ge=INT64[0], le=INT64[1])]
"""A token id as the engine core's wire carries it (int64); the vocabulary check is the engine's.
A larger integer would fail to encode and turn a client's mistake into a 500."""
_INT64 = {"ge": INT64[0], "le": INT64[1]}


class _Request(BaseModel):
    # unknown fields are kept in ``model_extra`` to be named (``unknown_fields``), never used
    model_config = ConfigDict(extra="allow", strict=True)


def unknown_fields(obj: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields of a request, at any depth, that its models do not declare
    (``messages.0.foo`` for one inside a message). Content parts are left out: their extra
    fields belong to part types that are refused anyway (images, audio)."""
    if isinstance(obj, ContentPart):
        return []
    out = [prefix + k for k in (obj.model_extra or {})]
    for name in type(obj).model_fields:
        v = getattr(obj, name)
        if isinstance(v, BaseModel):
            out += unknown_fields(v, f"{prefix}{name}.")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, BaseModel):
                    out += unknown_fields(x, f"{prefix}{name}.{i}.")
    return out


class StreamOptions(_Request):
    include_usage: bool = False
    """A last chunk with the whole call's usage (and ``"usage": null`` in the others)."""
    continuous_usage_stats: bool = False
    """vLLM's: every chunk carries its choice's usage so far."""


class ResponseFormat(_Request):
    type: str = "text"
    """``text``, ``json_object`` or ``json_schema`` (``server/structured.py``)."""
    json_schema: dict[str, Any] | None = None
    """``{"name": ..., "description": ..., "schema": {...}, "strict": bool}``."""


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "guided_whitespace_pattern": "whitespace_pattern"}
"""vLLM's legacy fields, removed in vLLM 0.12 (ignored by vLLM since): refused, naming their
``structured_outputs`` key."""


class _SamplingFields(_Request):
    """Fields shared by completions and chat."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])  # int64, as OpenAI
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (a string, as JSON keys are) -> bias in -100..100, added to its logit."""
    # vLLM's sampling extensions
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    allowed_token_ids: list[TokenId] | None = Field(default=None, min_length=1)
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    # vLLM's extensions: prompt logprobs and the detokenizer's options
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    """Log-probabilities of the prompt tokens with this many alternatives (``prompt_logprobs``
    in vLLM's shape: on each choice for completions, on the response for chat)."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    """``text`` (the default), ``json_object`` or ``json_schema``: constrained decoding."""
    # vLLM's structured outputs (``server/structured.py``); the guided_* fields are refused
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None
    priority: int = 0
    """vLLM's priority scheduling; batchmax schedules in arrival order, so only 0 is accepted."""
    # batchmax's extensions: the eviction policy, budget and recall of this request
    kv_policy: str | None = None
    kv_budget: int | None = Field(default=None, gt=0, le=2**63 - 1)
    kv_recall: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not re.fullmatch(r"-?\d+", key.strip()) or not INT64[0] <= int(key) <= INT64[1]:
                raise ValueError(f"keys must be token ids (integers as strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must be between -100 and 100, got {bias}")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of a known OpenAI or vLLM feature batchmax cannot honour, else
        None. Silently ignoring these would change results, so they are rejected."""
        for name, key in _GUIDED.items():
            if getattr(self, name) is not None:
                return name, (f"'{name}' was removed in vLLM 0.12 and is not accepted; send "
                              f"\"structured_outputs\": {{\"{key}\": ...}} instead.")
        if self.guided_decoding_backend is not None:
            return "guided_decoding_backend", ("'guided_decoding_backend' was removed in vLLM 0.12 and is not accepted "
                                               "(this server's grammar engine is xgrammar).")
        if self.structural_tag is not None:
            return "structural_tag", "'structural_tag' is not supported by this server (send response_format or structured_outputs)."
        if self.priority != 0:
            return "priority", "'priority' is not supported by this server: requests are scheduled in arrival order (send 0 or omit it)."
        return None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def num_prompts(self) -> int:
        """Prompts in the call; it makes ``num_prompts * n`` engine requests."""
        return 1

    prompt_param: ClassVar[str] = "messages"
    """The parameter that holds the prompt(s)."""


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=0)
    """OpenAI's default is 16; 0 is allowed only with ``echo`` (scoring the prompt)."""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    add_special_tokens: bool = True

    prompt_param: ClassVar[str] = "prompt"

    @property
    def num_prompts(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (len(v) == 0 or any(isinstance(x, list) and not x for x in v)):
            raise ValueError("prompt must not be empty")
        return v


class ContentPart(_Request):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class MessageFunctionCall(_Request):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it (templates get it parsed, ``serving.chat_messages``)."""


class MessageToolCall(_Request):
    """A call of an earlier assistant reply, sent back in the history."""

    id: str
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    """An assistant message's calls; rendered through the chat template."""
    tool_call_id: str | None = None
    """A ``tool`` message's answer to this call id (required there, refused elsewhere)."""
    # OpenAI's message fields that the prompt cannot carry (the deprecated function_call,
    # audio, an assistant's refusal or annotations): declared so that they are refused,
    # never dropped; null or empty is accepted (clients echo earlier replies with them unset)
    function_call: Any = None
    audio: Any = None
    refusal: Any = None
    annotations: Any = None

    REFUSED: ClassVar[tuple[str, ...]] = ("function_call", "audio", "refusal", "annotations")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"content parts of type {p.type!r} are not supported (text only)")
            parts.append(p.text)
        return "\n".join(parts)


# ----------------------------------------------------------------------------- tools
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""OpenAI's rule for function names."""


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of an object (the arguments); None: no arguments."""
    strict: bool | None = None
    """OpenAI's strict mode: the arguments must match ``parameters``. Honoured where the
    output is constrained (``tool_choice`` required or named); refused with ``auto``."""

    @field_validator("parameters")
    @classmethod
    def _a_json_schema_of_an_object(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        import jsonschema

        try:
            jsonschema.validators.validator_for(v, default=jsonschema.Draft202012Validator).check_schema(v)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON schema: {exc.message}") from None
        if v.get("type", "object") != "object":
            raise ValueError(f"the schema must be of type 'object', got {v.get('type')!r}")
        return v


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """``{"type": "function", "function": {"name": ...}}``: this function must be called."""

    type: Literal["function"]
    function: NamedFunction


# transformers' apply_chat_template parameters (5.x), which chat_template_kwargs must not set
_TEMPLATE_PARAMETERS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    """Functions the model may call; they go to the chat template (``tools=``)."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """None: ``auto`` when there are tools (OpenAI's default), else ``none``."""
    parallel_tool_calls: bool | None = None
    """False: at most one call (``required``: the schema allows one; ``auto``: the first)."""
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    """Passed to the chat template as the variable ``reasoning_effort`` (as vLLM does);
    refused when the template does not read it."""
    echo: bool = False
    """vLLM's: the reply starts with the last message's content when that is the assistant's
    (the message the reply continues)."""
    # chat-template controls (vLLM's extensions)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # These are extra variables for the template; a key naming one of
        # apply_chat_template's own parameters would instead change how it runs:
        # ``chat_template`` would run the client's own Jinja code on the server's event
        # loop (a loop can stall every other request), ``tokenize``/``return_dict`` change
        # what it returns.
        bad = sorted(set(v or ()) & _TEMPLATE_PARAMETERS)
        if bad:
            raise ValueError(f"{bad[0]!r} cannot be set through chat_template_kwargs (only template variables can)")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        base = super().unsupported()
        if base:
            return base
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "'top_logprobs' requires 'logprobs' to be true."
        return None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- responses
def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    """The legacy completions format: parallel lists, ``top_logprobs`` as {token: logprob}."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one entry of ``prompt_logprobs``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]
"""Per prompt position (the first is None), {token id: its logprob, rank and text}: the prompt's
own token first, then the top alternatives."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    """Only with ``prompt_logprobs`` in the request (left out of the body otherwise)."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """JSON text of the arguments."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None
    """The thinking, with ``--reasoning-parser`` (vLLM's field)."""
    reasoning_content: str | None = None
    """The same, under the name vLLM used first (deprecated there, still sent)."""


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    """Only with ``prompt_logprobs`` in the request (left out of the body otherwise)."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "batchmax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

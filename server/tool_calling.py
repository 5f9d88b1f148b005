"""What a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` ask for, as
vLLM serves them:

* ``none``: the tools still go to the chat template (vLLM's default; with
  ``--exclude-tools-when-tool-choice-none`` they do not) and the output is not parsed;
* ``auto`` (the default when tools are given): the model's output is parsed by the family's
  parser (``--tool-call-parser``, or detected from the chat template); without one, or with
  ``--no-enable-auto-tool-choice``, a 400;
* ``required``: the engine constrains the output to a JSON array of
  ``{"name": <one of the tools>, "parameters": <its schema>}`` (``maxItems`` 1 when
  ``parallel_tool_calls`` is false), which becomes the calls;
* a named function: the output is constrained to that function's parameters schema and is
  its arguments.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable

from batchmax.engine.sampling import StructuredOutputsParams
from batchmax.server.protocol import APIError, ChatCompletionRequest, ChatTool, NamedToolChoice, bad_request
from batchmax.server.tool_parsers import ToolParser
from batchmax.server.tool_parsers.forced import NamedCallParser, RequiredCallsParser

NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    mode: str
    """``none`` (no tools, or tool_choice none), ``auto``, ``required`` or ``named``."""
    template_tools: list[dict[str, Any]] | None = None
    """What the chat template gets as ``tools`` (OpenAI's shape)."""
    structured: StructuredOutputsParams | None = None
    """The engine's constraint (required, named)."""
    parser: Callable[[], ToolParser] | None = None
    """A new parser for each choice (None: no parsing)."""
    max_calls: int | None = None
    keep_special_tokens: bool = False

    @property
    def constrained(self) -> bool:
        return self.structured is not None


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


def required_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for ``tool_choice: required``: an array of at least one (at most one
    when not ``parallel``) ``{"name", "parameters"}`` object, any of the tools. Each tool's
    ``$defs`` move to the top, where its ``#/$defs/...`` references then point."""
    defs: dict[str, Any] = {}
    variants = []
    for i, tool in enumerate(tools):
        params = copy.deepcopy(_parameters(tool))
        for name, d in (params.pop("$defs", None) or {}).items():
            if name in defs and defs[name] != d:
                raise bad_request(f"Tools define different schemas under the same $defs name {name!r}; rename one.",
                                  param=f"tools.{i}.function.parameters", code="invalid_value")
            defs[name] = d
        variants.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def plan_tools(body: ChatCompletionRequest, parser_cls: type[ToolParser] | None, auto_enabled: bool,
               exclude_tools_when_none: bool = False) -> ToolPlan:
    """The request's tool handling, or a 400 naming the parameter at fault."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise bad_request("'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice",
                              code="invalid_value")
        if body.parallel_tool_calls is not None:
            raise bad_request("'parallel_tool_calls' is only allowed when 'tools' are specified.",
                              param="parallel_tool_calls", code="invalid_value")
        return ToolPlan("none")
    names = [t.function.name for t in tools]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise bad_request(f"Tool names must be unique; {dup!r} is given twice.", param="tools", code="invalid_value")
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    parallel = body.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan("none", None if exclude_tools_when_none else template_tools)
    if isinstance(choice, NamedToolChoice):
        by_name = {t.function.name: t for t in tools}
        tool = by_name.get(choice.function.name)
        if tool is None:
            raise bad_request(f"Tool choice names {choice.function.name!r}, which is not one of the 'tools' "
                              f"({', '.join(names)}).", param="tool_choice", code="invalid_value")
        name = tool.function.name
        return ToolPlan("named", template_tools, StructuredOutputsParams(json=_parameters(tool)),
                        lambda: NamedCallParser(name), max_calls=1)
    if choice == "required":
        schema = required_schema(tools, parallel)
        return ToolPlan("required", template_tools, StructuredOutputsParams(json=schema), RequiredCallsParser,
                        max_calls=None if parallel else 1)
    # auto
    if parser_cls is None or not auto_enabled:
        why = ("auto tool choice is switched off on this server (--no-enable-auto-tool-choice)" if parser_cls is not None
               else "the server has no tool call parser for this model (start it with --tool-call-parser NAME)")
        raise APIError(400, f"tool_choice 'auto' is not available: {why}; use tool_choice 'required' or a named "
                            "function, which need no parser.", param="tool_choice", code="unsupported_value")
    strict = next((i for i, t in enumerate(tools) if t.function.strict), None)
    if strict is not None:
        raise bad_request("'strict': true needs constrained output, which tool_choice 'auto' does not use; send "
                          "tool_choice 'required' or a named function, or strict false.",
                          param=f"tools.{strict}.function.strict", code="unsupported_value")
    return ToolPlan("auto", template_tools, None, parser_cls, max_calls=None if parallel else 1,
                    keep_special_tokens=parser_cls.keep_special_tokens)


def template_messages_tool_calls(calls: list, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` as templates expect them: arguments parsed into
    objects (what transformers' templates iterate over; vLLM converts them the same way)."""
    out = []
    for j, c in enumerate(calls):
        try:
            args = json.loads(c.function.arguments) if c.function.arguments.strip() else {}
        except ValueError:
            raise bad_request(f"The arguments of a tool call in the history are not JSON: {c.function.arguments[:80]!r}",
                              param=f"{where}.{j}.function.arguments", code="invalid_value") from None
        out.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
    return out

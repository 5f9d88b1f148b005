"""Tool-call and reasoning parsers on texts: what each family's output becomes, and that a
stream cut anywhere (character by character, random pieces) reassembles exactly to the
whole text's parse. Malformed calls are content, never an error."""
from __future__ import annotations

import json
import random

import pytest

from batchmax.server.chat_output import ChatOutputParser
from batchmax.server.reasoning_parsers import REASONING_PARSERS
from batchmax.server.tool_parsers import TOOL_PARSERS, detect_tool_parser
from batchmax.server.tool_parsers.forced import NamedCallParser, RequiredCallsParser
from batchmax.server.tool_parsers.json_scan import JsonEnd

HERMES, LLAMA, MISTRAL = TOOL_PARSERS["hermes"], TOOL_PARSERS["llama3_json"], TOOL_PARSERS["mistral"]
QWEN3, R1 = REASONING_PARSERS["qwen3"], REASONING_PARSERS["deepseek_r1"]


def parse(tools, text: str, reasoning=None, max_calls=None, cuts=None):
    """(message, deltas) of ``text`` fed in the pieces ``cuts`` gives (None: at once)."""
    counter = iter(range(10**6))
    p = ChatOutputParser(reasoning() if reasoning else None, tools() if tools else None, max_calls,
                         call_id=lambda: f"call_{next(counter)}")
    pieces = [text] if cuts is None else cuts(text)
    deltas = []
    for piece in pieces:
        deltas += p.feed(piece)
    deltas += p.finish()
    return p.message(), deltas


def reassemble(deltas) -> dict:
    """A client's view of a stream's deltas (as the openai client accumulates them)."""
    content, reasoning, reasoning_content, calls = "", "", "", {}
    for d in deltas:
        content += d.get("content") or ""
        reasoning += d.get("reasoning") or ""
        reasoning_content += d.get("reasoning_content") or ""
        for tc in d.get("tool_calls") or []:
            if tc["index"] not in calls:
                assert set(tc) == {"index", "id", "type", "function"} and tc["type"] == "function", tc
                assert tc["function"]["name"], tc
                calls[tc["index"]] = {"id": tc["id"], "type": "function", "function": {"name": tc["function"]["name"], "arguments": ""}}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}, tc
            calls[tc["index"]]["function"]["arguments"] += tc["function"].get("arguments", "")
    assert reasoning == reasoning_content
    assert sorted(calls) == list(range(len(calls)))
    return {"content": content, "reasoning": reasoning or None, "tool_calls": [calls[i] for i in sorted(calls)] or None}


def chars(text):
    return list(text)


def random_pieces(seed):
    def cut(text):
        rng = random.Random(seed)
        out, i = [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            out.append(text[i:i + n])
            i += n
        return out
    return cut


CUTS = [chars, random_pieces(0), random_pieces(1), random_pieces(2)]


def check_stream_matches(tools, text, reasoning=None, max_calls=None):
    whole, _ = parse(tools, text, reasoning, max_calls)
    for cut in CUTS:
        _, deltas = parse(tools, text, reasoning, max_calls, cut)
        got = reassemble(deltas)
        assert got["content"] == (whole["content"] or ""), (cut, text)
        assert got["reasoning"] == whole["reasoning"], (cut, text)
        assert got["tool_calls"] == whole["tool_calls"], (cut, text)
    return whole


def calls(msg):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"] or []]


# ----------------------------------------------------------------------------- hermes
HERMES_CASES = [
    # (text, content, calls)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
     "Let me look.", [("a", {"x": 1}), ("b", {})]),
    ('Plain answer, no call. 1 < 2 and <tool is not a tag.', "Plain answer, no call. 1 < 2 and <tool is not a tag.", []),
    # braces and tags inside strings
    ('<tool_call>{"name": "echo", "arguments": {"s": "}</tool_call> {\\"q\\": 1}"}}</tool_call>', None, None),
    ('<tool_call>{"name": "u", "arguments": {"s": "héllo ✓ 日本"}}</tool_call>', None, [("u", {"s": "héllo ✓ 日本"})]),
    # the output ends inside a block whose JSON is complete (vLLM's parser accepts it)
    ('<tool_call>\n{"name": "a", "arguments": {"x": [1, 2]}}\n', None, [("a", {"x": [1, 2]})]),
    # arguments as a JSON string, as some models write them
    ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>', None, [("a", {"x": 1})]),
]


@pytest.mark.parametrize("text, content, expected", HERMES_CASES)
def test_hermes(text, content, expected):
    msg = check_stream_matches(HERMES, text)
    if expected is None:  # the tag in a string ends the block early: the block is malformed
        assert msg["tool_calls"] is None and msg["content"] == text.strip()
        return
    assert msg["content"] == content
    assert calls(msg) == expected
    for c in msg["tool_calls"] or []:
        assert c["id"].startswith("call_") and c["type"] == "function"


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "a", "arguments": {"x": }</tool_call>',  # malformed JSON
    '<tool_call>not json at all</tool_call>',
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "a", "arguments": {"x": 1',  # cut short
    '<tool_call>',
])
def test_hermes_malformed_is_content(text):
    msg = check_stream_matches(HERMES, "Sure. " + text + " done")
    assert msg["tool_calls"] is None
    assert msg["content"] == ("Sure. " + text + " done").strip()


def test_hermes_malformed_block_between_good_ones():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{oops}</tool_call>\n<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    msg = check_stream_matches(HERMES, text)
    assert calls(msg) == [("a", {}), ("b", {})] and msg["content"] == "<tool_call>{oops}</tool_call>"


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"y": 2}}</tool_call>'
    msg = check_stream_matches(HERMES, text, max_calls=1)
    assert calls(msg) == [("a", {})]


# ----------------------------------------------------------------------------- llama3_json
@pytest.mark.parametrize("text, content, expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}', None, [("a", {"x": 1})]),
    ('  {"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', None, [("a", {"x": 1}), ("b", {})]),
    ('{"name": "a", "arguments": {"q": "{}"}}', None, [("a", {"q": "{}"})]),
    ('The weather is nice. {"name": "a", "parameters": {}}', "The weather is nice. {\"name\": \"a\", \"parameters\": {}}", []),
    ('{"name": "a", "parameters": {}} and then some words', "and then some words", [("a", {})]),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ('{"name": "a", "parameters": {"x": 1', '{"name": "a", "parameters": {"x": 1', []),  # cut short
    ('<|python_tag|>{"name": 5}', '<|python_tag|>{"name": 5}', []),
    ('<|python', '<|python', []),
])
def test_llama3_json(text, content, expected):
    msg = check_stream_matches(LLAMA, text)
    assert msg["content"] == content and calls(msg) == expected


# ----------------------------------------------------------------------------- mistral
@pytest.mark.parametrize("text, content, expected", [
    ('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', None, [("a", {"x": 1}), ("b", {})]),
    ('I will check. [TOOL_CALLS] [{"name": "a", "arguments": {"s": "]["}}]', "I will check.", [("a", {"s": "]["})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    ('[TOOL_CALLS]a[ARGS]{"x": {"y": 1}}[TOOL_CALLS]b[ARGS]{}', None, [("a", {"x": {"y": 1}}), ("b", {})]),
    ('[TOOL_CALLS][{"name": "a"', '[TOOL_CALLS][{"name": "a"', []),  # cut short
    ('[TOOL_CALLS]not a name![ARGS]{}', '[TOOL_CALLS]not a name![ARGS]{}', []),
    ('[TOOL_CALLS]a[ARGS]{bad}', '[TOOL_CALLS]a[ARGS]{bad}', []),
    ('No calls [TOOL here', 'No calls [TOOL here', []),
])
def test_mistral(text, content, expected):
    msg = check_stream_matches(MISTRAL, text)
    assert msg["content"] == content and calls(msg) == expected


def test_mistral_ids_are_nine_characters():  # what Mistral's templates accept back
    p = ChatOutputParser(None, MISTRAL())
    p.feed('[TOOL_CALLS]a[ARGS]{}')
    p.finish()
    cid = p.message()["tool_calls"][0]["id"]
    assert len(cid) == 9 and cid.isalnum()


# ----------------------------------------------------------------------------- forced (required, named)
def test_required_array():
    text = '[{"name": "a", "parameters": {"x": "]}"}}, {"name": "b", "parameters": {}}]'
    msg = check_stream_matches(RequiredCallsParser, text)
    assert calls(msg) == [("a", {"x": "]}"}), ("b", {})] and msg["content"] is None


def test_required_cut_short_keeps_complete_calls():
    text = '[{"name": "a", "parameters": {}}, {"name": "b", "param'
    msg = check_stream_matches(RequiredCallsParser, text)
    assert calls(msg) == [("a", {})] and msg["content"] == '{"name": "b", "param'


def test_named_streams_the_arguments_as_generated():
    text = '{"city": "Paris", "days": 3}'
    msg = check_stream_matches(lambda: NamedCallParser("forecast"), text)
    assert calls(msg) == [("forecast", {"city": "Paris", "days": 3})]
    assert msg["tool_calls"][0]["function"]["arguments"] == text  # the output itself, byte for byte
    _, deltas = parse(lambda: NamedCallParser("forecast"), text, cuts=chars)
    assert len(deltas) == 1 + len(text)  # the header, then every piece as it comes


# ----------------------------------------------------------------------------- reasoning
@pytest.mark.parametrize("parser, text, reasoning, content", [
    (QWEN3, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "\nLet me think.\n", "\n\nThe answer is 4."),
    (QWEN3, "The answer is 4.", None, "The answer is 4."),  # no thinking
    (QWEN3, "<think>cut short", "cut short", None),
    (QWEN3, "<thi", None, "<thi"),
    (R1, "Thinking in the prompt's block.</think>Answer.", "Thinking in the prompt's block.", "Answer."),
    (R1, "<think>own tag</think>Answer.", "own tag", "Answer."),
    (R1, "all thinking, never closed", "all thinking, never closed", None),
    (R1, "a < b </thin and more</think>x", "a < b </thin and more", "x"),
])
def test_reasoning(parser, text, reasoning, content):
    msg = check_stream_matches(None, text, reasoning=parser)
    assert msg["reasoning"] == reasoning and msg["content"] == content
    assert msg["reasoning_content"] == reasoning


def test_tool_calls_are_parsed_after_the_reasoning():
    text = '<think>I should call a. <tool_call>{"name": "x", "arguments": {}}</tool_call></think>\n<tool_call>{"name": "a", "arguments": {"k": true}}</tool_call>'
    msg = check_stream_matches(HERMES, text, reasoning=QWEN3)
    assert calls(msg) == [("a", {"k": True})]  # the call inside the thinking is thinking
    assert "<tool_call>" in msg["reasoning"] and msg["content"] is None


# ----------------------------------------------------------------------------- pieces
def test_json_end_finds_the_end_across_pieces():
    text = '{"a": "}\\"{", "b": [1, {"c": 2}]} tail'
    for cut in CUTS:
        scan, pos, end = JsonEnd(), 0, None
        for piece in cut(text):
            end = scan.feed(piece)
            pos += len(piece)
            if end is not None:
                break
        assert end == text.index(" tail")


def test_detect_from_chat_templates():
    assert detect_tool_parser('{% for t in tools %}<tool_call>{{ t | tojson }}</tool_call>{% endfor %}') == "hermes"
    assert detect_tool_parser('{{ "[TOOL_CALLS]" + tool_calls | tojson }}') == "mistral"
    assert detect_tool_parser('{{- "<|python_tag|>" + tool_call.name }}') == "llama3_json"
    assert detect_tool_parser("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_tool_parser(None) is None

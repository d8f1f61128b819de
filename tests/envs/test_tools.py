"""Tool schemas, tool-call parsing in the common formats, and calls that cannot crash the run."""

import pytest

from stagewise.envs.tools import call_tool, parse_tool_calls, tool_schema
from stagewise.errors import ConfigError


def lookup(key: str, default: int = 0) -> int:
    """Look a value up.

    Args:
        key: The name to look up.
        default: Returned when the name is unknown.
    """
    return {"x": 7}.get(key, default)


def boom(n: int) -> int:
    """Always fails.

    Args:
        n: Ignored.
    """
    raise ValueError("no")


def test_schema_from_signature_and_docstring():
    fn = tool_schema(lookup)["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Look a value up."
    assert fn["parameters"]["properties"]["key"] == {"type": "string", "description": "The name to look up."}
    assert fn["parameters"]["required"] == ["key"]


def test_schema_refused_clearly_without_type_hints():
    def bare(x):
        """Args:
            x: something
        """

    with pytest.raises(ConfigError, match="bare.*type hint"):
        tool_schema(bare)


@pytest.mark.parametrize("text, calls", [
    ('<tool_call>{"name": "lookup", "arguments": {"key": "x"}}</tool_call>', [("lookup", {"key": "x"})]),
    ('Let me check.\n<tool_call>\n{"name": "lookup", "arguments": {"key": "x"}}\n</tool_call>',
     [("lookup", {"key": "x"})]),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"n": 1}}</tool_call>',
     [("a", {}), ("b", {"n": 1})]),
    ('<tool_call>{"name": "lookup", "arguments": {"key": "x"}}', [("lookup", {"key": "x"})]),  # stopped before the tag
    ('{"name": "lookup", "arguments": {"key": "x"}}', [("lookup", {"key": "x"})]),  # plain JSON
    ('```json\n{"name": "lookup", "parameters": {"key": "x"}}\n```', [("lookup", {"key": "x"})]),
    ('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]', [("a", {}), ("b", {})]),
    ('{"name": "lookup", "arguments": "{\\"key\\": \\"x\\"}"}', [("lookup", {"key": "x"})]),  # arguments as a string
])
def test_parses_common_formats(text, calls):
    got, error = parse_tool_calls(text)
    assert error is None
    assert [(c["name"], c["arguments"]) for c in got] == calls


@pytest.mark.parametrize("text", ["The answer is 42.", "{not json at all", "[1, 2, 3]", '{"answer": 3}', ""])
def test_plain_answers_are_not_calls(text):
    assert parse_tool_calls(text) == ([], None)


@pytest.mark.parametrize("text, message", [
    ('<tool_call>{"name": "lookup", "arguments": {"key": </tool_call>', "not valid JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'needs "name"'),
    ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', 'needs "name"'),
    ('{"name": "lookup", "arguments": {"key": ', "not valid JSON"),
])
def test_malformed_calls_become_error_messages(text, message):
    calls, error = parse_tool_calls(text)
    assert calls == [] and message in error


def test_calls_that_fail_return_text_not_exceptions():
    tools = {"lookup": lookup, "boom": boom}
    assert call_tool(tools, {"name": "lookup", "arguments": {"key": "x"}}) == ("7", False)
    out, failed = call_tool(tools, {"name": "nope", "arguments": {}})
    assert failed and "unknown tool 'nope'" in out and "boom, lookup" in out
    out, failed = call_tool(tools, {"name": "lookup", "arguments": {"wrong": 1}})
    assert failed and "bad arguments for lookup" in out
    out, failed = call_tool(tools, {"name": "boom", "arguments": {"n": 1}})
    assert failed and "boom failed: ValueError: no" in out

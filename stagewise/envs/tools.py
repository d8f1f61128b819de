"""Tools: JSON schemas from Python signatures, tool calls parsed from the policy's text, calls run
so that nothing the model writes can crash the run.

    schema = tool_schema(multiply)          # {"type": "function", "function": {"name", "description", "parameters"}}
    calls, error = parse_tool_calls('<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call>')
    result, failed = call_tool({"multiply": multiply}, calls[0])      # ("6", False)

Formats parsed (those of the common chat templates):
- Hermes / Qwen: one or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks;
- plain JSON: the whole turn is ``{"name": ..., "arguments": {...}}`` (optionally in a ```json fence),
  or a list of such objects. ``"parameters"`` is accepted for ``"arguments"``.
A turn with neither is a plain answer. A turn that tries (an opening tag, a JSON object with a
"name") and fails gets an error message back, as a tool result would be.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from stagewise.errors import ConfigError

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def tool_schema(fn: Callable) -> dict:
    """The OpenAI / chat-template schema of a tool, from its type hints and Google-style docstring
    (``Args:`` section). Refused with a clear message where transformers cannot derive one."""
    from transformers.utils import get_json_schema  # ~1.5 s to import: only when a schema is needed

    try:
        return get_json_schema(fn)
    except Exception as e:  # noqa: BLE001  (transformers raises its own TypeHintParsingException / DocstringParsingException)
        raise ConfigError(f"tool {getattr(fn, '__name__', fn)!r}: cannot build its JSON schema ({e}); give every "
                          f"argument a type hint and describe it under 'Args:' in the docstring") from None


def _as_call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some templates emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def parse_tool_calls(text: str) -> tuple[list[dict], str | None]:
    """-> (calls [{"name", "arguments"}], error message or None). No calls and no error: an answer."""
    blocks = TOOL_CALL.findall(text)
    if blocks:
        calls = []
        for raw in blocks:
            try:
                call = _as_call(json.loads(raw.strip()))
            except json.JSONDecodeError as e:
                return [], f"error: the tool call is not valid JSON ({e.msg} at char {e.pos}); write " \
                           f'<tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>'
            if call is None:
                return [], 'error: a tool call needs "name" (a string) and "arguments" (an object)'
            calls.append(call)
        return calls, None
    body = text.strip()
    if m := FENCE.match(body):
        body = m.group(1)
    if not body.startswith(("{", "[")):
        return [], None
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        # prose that happens to start with a brace is an answer; a broken object naming a tool is a bad call
        return ([], 'error: the tool call is not valid JSON') if '"name"' in body else ([], None)
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(o) for o in objs]
    if all(c is not None for c in calls) and calls:
        return calls, None
    return ([], 'error: a tool call needs "name" (a string) and "arguments" (an object)') \
        if any(isinstance(o, dict) and "name" in o for o in objs) else ([], None)


def call_tool(tools: dict[str, Callable], call: dict) -> tuple[str, bool]:
    """Run one parsed call. -> (text for the tool message, failed). Unknown tools, bad arguments and
    exceptions inside the tool become error text for the model, never an exception here."""
    fn = tools.get(call["name"])
    if fn is None:
        return f"error: unknown tool {call['name']!r}; available: {', '.join(sorted(tools)) or 'none'}", True
    try:
        out = fn(**call["arguments"])
    except TypeError as e:
        return f"error: bad arguments for {call['name']}: {e}", True
    except Exception as e:  # noqa: BLE001  (the tool's own failure is information for the policy, as in tau2-bench)
        return f"error: {call['name']} failed: {type(e).__name__}: {e}", True
    return (out if isinstance(out, str) else json.dumps(out)), False


def fits_schema(call: dict, schemas: list[dict]) -> bool:
    """The parsed call names one of the tools and gives its required arguments and no others (what a
    well-formed call is, whatever the tool then answers). schemas: OpenAI-style tool schemas."""
    for s in schemas:
        fn = s.get("function", s)
        if fn.get("name") == call["name"]:
            params = fn.get("parameters") or {}
            known, required = set(params.get("properties") or {}), set(params.get("required") or [])
            return required <= set(call["arguments"]) <= known
    return False

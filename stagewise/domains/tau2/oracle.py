"""tau2's oracle agent: the turns that make a task's expected actions, as a policy would write them.

    turns = oracle_turns(ctx, task_id)
    # ['<tool_call>{"name": "get_user_details", ...}</tool_call>', ..., 'Thank you, that is done. ...']
    # (a task without an action of the agent: lookups of what the customer names, then a refusal)

Each expected action of the agent is one turn with one tool call (the Hermes ``<tool_call>`` format
every template here parses); an action the customer must take on their own device (telecom with
a customer) is a sentence asking for it; the last turn tells the customer what the task wants
communicated (``communicate_info``), or calls ``done`` in solo mode. A task whose expected actions
have none of the agent's is one it declines or only answers: the oracle reads what the customer
names (``scenario_lookups``), then declines in its own sentence, or gives the information. It is what ``stagewise demos
--agent oracle`` writes demonstrations with, and what the tests check the evaluators against (1.0
on every task of every domain).

The oracle only uses ids it has seen. tau2's expected actions name ids the agent could not know
from the conversation (airline: 65 of the 238 string arguments of the training tasks' actions;
retail: 235 of 854): the reservation the customer did not name, the flight a search would find, the
item a product's variants list. A demonstration that writes them anyway teaches a policy to invent
ids. So before an action, ``grounded_actions`` adds the read calls that show each id it uses (the
customer's scenario and the earlier results are what has been seen), found by trying the domain's
read tools on what has been seen, as an agent would look things up. Read calls change no state, so
the expected actions and tau2's scores are unchanged.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass

from stagewise.domains.tau2 import data

ID = re.compile(r"[#\w@.\-]{3,}")  # what a lookup can show: ids, codes, emails, dates, names
MAX_LOOKUPS = 6  # read calls added before one action
MAX_COMBINATIONS = 200  # argument combinations tried for one read tool with several parameters
MAX_OPENERS = 8  # first calls of a two-call lookup tried


def call_text(name: str, arguments: dict) -> str:
    """One tool call as the policy writes it."""
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def oracle_turns(ctx, task_id: str, actions: list | None = None) -> list[str]:
    """ctx: the domain's Tau2Context. The agent's turns for the task, in order; ``actions``: other
    tau2 actions than the task's expected ones (the tests take one out)."""
    task = ctx.tasks[task_id]
    criteria = task.evaluation_criteria
    if actions is None:
        actions = (criteria.actions or []) if criteria is not None else []
    acts = any(a.requestor == "assistant" for a in actions)
    calls = grounded_actions(ctx, task, actions) if acts else scenario_lookups(ctx, task) + [
        Call(a.name, dict(a.arguments), a.requestor) for a in actions]
    turns = []
    for call in calls:
        if call.requestor == "user" and not ctx.solo:
            turns.append(f"Please do this on your phone: {call.name}.")
        else:
            turns.append(call_text(call.name, call.arguments))
    info = (criteria.communicate_info or []) if criteria is not None else []
    closing = " ".join(([DONE] if acts else [] if info else [DECLINE]) + list(info))
    turns.append(call_text(data.STOP_TOOL, {}) if ctx.solo else closing)
    return turns


DONE = "Thank you, that is done."
# a task with no action of the agent is one it declines (or only answers): its closing must not be the
# completions' sentence, or a demonstration teaches "that is done" as the answer to every request
DECLINE = "I am sorry, but I cannot do that: our policy does not allow it."


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict
    requestor: str = "assistant"
    lookup: bool = False  # added by the oracle to see an id, not one of the task's expected actions


def scenario_text(task) -> str:
    """What the customer knows and can tell the agent: the ticket (solo) or who they are and why they call."""
    if task.ticket:
        return task.ticket
    instructions = getattr(task.user_scenario, "instructions", None)
    if instructions is None:
        return str(task.user_scenario)
    return "\n".join(str(getattr(instructions, k, None) or "") for k in ("known_info", "reason_for_call"))


def unseen_ids(arguments: dict, seen: str) -> set[str]:
    """The id-like string values of the arguments that ``seen`` (lower case) does not contain."""
    return {v for v in _strings(arguments) if ID.fullmatch(v) and v.lower() not in seen}


def _reader(ctx, task):
    """The task's fresh environment as (its read tools as (name, required parameters), run), where
    run(call) -> the call's result text, "" when it fails."""
    from tau2.data_model.message import ToolCall
    from tau2.environment.toolkit import ToolType

    env = data.fresh_environment(ctx.domain, task, ctx.solo)
    readers = []
    for tool in env.get_tools():
        fn = tool.openai_schema["function"]
        if env.tools.tool_type(fn["name"]) == ToolType.READ:
            readers.append((fn["name"], tuple(fn["parameters"].get("required") or ())))
    counter = itertools.count()

    def run(call: Call) -> str:
        tc = ToolCall(id=f"o{next(counter)}", name=call.name, arguments=call.arguments, requestor=call.requestor)
        try:
            result = env.get_response(tc)
        except Exception:  # noqa: BLE001  (a call tau2 cannot run shows nothing)
            return ""
        return "" if result.error else (result.content or "")

    return readers, run


def scenario_lookups(ctx, task) -> list[Call]:
    """The read calls an agent makes before it declines or answers: each one-parameter read tool on
    each id-like word the customer tells (and on a bare id a lookup returns, as an email's user id),
    in the order they appear, the calls that find something, at most MAX_LOOKUPS."""
    readers, run = _reader(ctx, task)
    single = [(name, params[0]) for name, params in readers if len(params) == 1]
    queue, out = _tokens(scenario_text(task)), []
    for token in queue:
        for name, param in single:
            if len(out) == MAX_LOOKUPS:
                return out
            call = Call(name, {param: token}, lookup=True)
            text = run(call)
            if text:
                out.append(call)
                if "{" not in text and "[" not in text:
                    queue += [t for t in _tokens(text) if t not in queue]
    return out


def grounded_actions(ctx, task, actions: list) -> list[Call]:
    """The actions (tau2 Action objects) in order, each preceded by the read calls that show the ids
    it uses; an id no read call shows is left as it is."""
    readers, run = _reader(ctx, task)
    known = _Known(scenario_text(task), actions)
    out: list[Call] = []
    for action in actions:
        call = Call(action.name, dict(action.arguments), action.requestor)
        if call.requestor == "assistant" or ctx.solo:
            need = unseen_ids(call.arguments, known.lower)
            for _ in range(MAX_LOOKUPS):
                if not need:
                    break
                found = _best_lookup(readers, known, need, run)
                if found is None:
                    break
                lookup, text = found
                out.append(lookup)
                known.add(lookup, text)
                need = unseen_ids(call.arguments, known.lower)
        out.append(call)
        known.add(call, run(call) if call.requestor == "assistant" else "")
    return out


class _Known:
    """What the agent has seen: text, its id-like tokens, values by argument name, calls made."""

    def __init__(self, scenario: str, actions: list):
        self.text, self.calls = scenario, set()
        self.by_key: dict[str, set[str]] = {}
        self.action_values = [(k, v) for a in actions for k, v in _keyed(dict(a.arguments))]
        self._refresh()

    def add(self, call: Call, result: str) -> None:
        self.calls.add(_key(call))
        self.text += "\n" + result
        try:
            parsed = json.loads(result)
        except ValueError:
            parsed = None
        for k, v in _keyed(parsed):
            self.by_key.setdefault(k, set()).add(v)
        self._refresh()

    def _refresh(self) -> None:
        self.lower = self.text.lower()
        self.tokens = _tokens(self.text)
        for k, v in self.action_values:  # the task's own values, once the conversation shows them
            if v.lower() in self.lower:
                self.by_key.setdefault(k, set()).add(v)

    def after(self, call: Call, result: str) -> "_Known":
        """What would be known after one more call."""
        other = copy.copy(self)
        other.calls, other.by_key = set(self.calls), {k: set(v) for k, v in self.by_key.items()}
        other.add(call, result)
        return other

    def candidates(self, params: tuple[str, ...], tokens: list[str]):
        """Arguments to try: a one-parameter tool on the values seen under its name and on ``tokens``;
        several parameters: every combination of the values seen under their names."""
        if not params:
            yield {}
        elif len(params) == 1:
            yield from ({params[0]: v} for v in dict.fromkeys([*sorted(self.by_key.get(params[0], ())), *tokens]))
        else:
            pools = [sorted(self.by_key.get(p, ())) for p in params]
            yield from (dict(zip(params, combo))
                        for combo in itertools.islice(itertools.product(*pools), MAX_COMBINATIONS))


def _best_lookup(readers, known: _Known, need: set[str], run) -> tuple[Call, str] | None:
    """The read call that shows the most needed ids (then the shortest result); if none shows any,
    the first of two read calls where the second shows some (the shortest results first)."""
    best, openers = _scan(readers, known, need, run, known.tokens)
    if best is not None:
        return best
    seen = set(known.tokens)
    for call, text in sorted(openers, key=lambda ct: len(ct[1]))[:MAX_OPENERS]:
        after = known.after(call, text)
        if _scan(readers, after, need, run, [t for t in after.tokens if t not in seen])[0] is not None:
            return call, text
    return None


def _scan(readers, known: _Known, need: set[str], run, tokens: list[str]):
    """Every read call on what is known (one-parameter tools: on ``tokens``): the best that shows a
    needed id as (call, result), and the calls that show something new but no needed id."""
    best, openers = None, []
    old = set(known.tokens)
    for name, params in readers:
        for args in known.candidates(params, tokens):
            call = Call(name, args, lookup=True)
            if _key(call) in known.calls:
                continue
            text = run(call)
            if not text:
                continue
            low = text.lower()
            shown = sum(v.lower() in low for v in need)
            if shown and (best is None or (shown, -len(text)) > best[0]):
                best = ((shown, -len(text)), call, text)
            elif not shown and any(t not in old for t in _tokens(text)):
                openers.append((call, text))
    return (None if best is None else best[1:]), openers


def _tokens(text: str) -> list[str]:
    """The id-like words of a text, once each, without a sentence's final full stop."""
    return list(dict.fromkeys(t.rstrip(".") for t in ID.findall(text) if len(t.rstrip(".")) >= 3))


def _key(call: Call) -> str:
    return call.name + json.dumps(call.arguments, sort_keys=True)


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _keyed(value, key: str | None = None):
    """(argument name, string value) pairs of a JSON value: a list's items under the list's key."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _keyed(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _keyed(v, key)
    elif isinstance(value, str) and key is not None:
        yield key, value

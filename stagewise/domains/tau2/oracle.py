"""tau2's oracle agent: the turns that make a task's expected actions, as a policy would write them.

    turns = oracle_turns(ctx, task_id)
    # ['<tool_call>{"name": "get_user_details", ...}</tool_call>', ..., 'Thank you, that is done. ...']

Each expected action of the agent is one turn with one tool call (the Hermes ``<tool_call>`` format
every template here parses); an action the customer must take on their own device (telecom with
a customer) is a sentence asking for it; the last turn tells the customer what the task wants
communicated (``communicate_info``), or calls ``done`` in solo mode. It is what ``stagewise demos
--agent oracle`` writes demonstrations with, and what the tests check the evaluators against (1.0
on every task of every domain).
"""

from __future__ import annotations

import json

from stagewise.domains.tau2 import data


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
    turns = []
    for action in actions:
        if action.requestor == "user" and not ctx.solo:
            turns.append(f"Please do this on your phone: {action.name}.")
        else:
            turns.append(call_text(action.name, dict(action.arguments)))
    info = (criteria.communicate_info or []) if criteria is not None else []
    closing = " ".join(["Thank you, that is done.", *info])
    turns.append(call_text(data.STOP_TOOL, {}) if ctx.solo else closing)
    return turns

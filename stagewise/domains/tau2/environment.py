"""One tau2-bench conversation as a stagewise environment.

The policy is tau2's agent: it sees tau2's system prompt (instructions + the domain policy; in solo
mode also the ticket) and the domain's tool schemas; its tool calls run against a tau2 environment
in the task's initial state (``env.get_response``, errors come back as tool messages as in tau2).
A message without a tool call goes to the simulated user (normal mode), whose reply continues the
conversation; a reply with ``###STOP###``, ``###TRANSFER###`` or ``###OUT-OF-SCOPE###`` ends it.
In solo mode (telecom) there is no user: the agent also gets the user's device tools and ends by
calling ``done``.

Everything is recorded as tau2 messages (``self.trajectory``) and scored at the end by tau2's
evaluators (``evaluation.score``).

Departures from tau2's orchestrator, and why:
- Solo mode: a user message "Resolve the ticket." follows the system prompt (chat templates such as
  Qwen3's refuse a conversation without one); it is not part of the scored trajectory. A plain
  message (no tool call) in solo mode ends the episode unscored (tau2's solo agent cannot send one).
- The user simulator sees the agent's text only, as in tau2; the user's own device tool calls
  (telecom, normal mode) are run here, up to ``MAX_USER_TOOL_CALLS`` in a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stagewise.domains.tau2 import data
from stagewise.domains.tau2.evaluation import PARTS, score
from stagewise.envs.base import Environment

MAX_USER_TOOL_CALLS = 8
SOLO_NUDGE = "Resolve the ticket."


@dataclass
class Tau2Context:
    """What the episodes of one domain share: tasks by id, schemas, the user simulator, cached openings."""

    domain: str
    solo: bool
    users: object | None  # a user simulator (envs/users.py); None in solo mode
    tasks: dict = field(default_factory=dict)  # id -> tau2 Task
    firsts: dict = field(default_factory=dict)  # id -> the user's first message (shared by a task's episodes)
    schemas: list | None = None  # the agent's tool schemas
    user_schemas: list | None = None  # the simulated user's own tools (telecom's device), [] otherwise
    policy: str | None = None  # the domain policy the agent's system prompt holds

    def load_schemas(self, env) -> None:
        """Read the tools and the policy off the domain's first environment (the same for every task)."""
        if self.schemas is None:
            tools = [t.openai_schema for t in env.get_tools()]
            user_tools = [t.openai_schema for t in env.get_user_tools()] if self.domain == "telecom" else []
            self.schemas = tools + user_tools + [data.DONE_SCHEMA] if self.solo else tools
            self.user_schemas = [] if self.solo else user_tools
            self.policy = env.get_policy()


class Tau2Env(Environment):
    reward_parts = PARTS

    def __init__(self, task: dict, ctx: Tau2Context):
        super().__init__(task)
        from tau2.data_model.message import AssistantMessage, UserMessage

        self.ctx = ctx
        self.tau2_task = ctx.tasks[task["id"]]
        self.env = data.fresh_environment(ctx.domain, self.tau2_task, ctx.solo)
        ctx.load_schemas(self.env)
        self.trajectory: list = []  # tau2 messages, what the evaluators score
        self.termination: str | None = None  # user_stop / agent_stop / agent_error; None = cut off
        self.n_calls = 0
        self.user = None
        if not ctx.solo:
            self.user = ctx.users.session(system=data.user_system_prompt(self.tau2_task, bool(ctx.user_schemas)),
                                          tools=ctx.user_schemas, task=self.tau2_task)
            first = ctx.firsts.get(task["id"])
            if first is None:
                first = ctx.firsts[task["id"]] = self.user.first_message(data.GREETING)
            else:
                self.user.assume_first(data.GREETING, first)
            self.first = first
            self.trajectory += [AssistantMessage(role="assistant", content=data.GREETING),
                                UserMessage(role="user", content=first)]
            if self._stops(first):
                self.termination = "user_stop"

    # --- what the policy sees -------------------------------------------------------------------

    def opening(self) -> list[dict]:
        if self.ctx.solo:
            return [{"role": "system", "content": data.system_prompt(self.ctx.policy, self.tau2_task.ticket)},
                    {"role": "user", "content": SOLO_NUDGE}]
        return [{"role": "system", "content": data.system_prompt(self.ctx.policy)},
                {"role": "assistant", "content": data.GREETING}, {"role": "user", "content": self.first}]

    def tool_schemas(self) -> list[dict]:
        return self.ctx.schemas

    def run_tool(self, call: dict) -> tuple[str, bool]:
        from tau2.data_model.message import AssistantMessage, ToolCall

        if self.ctx.solo and call["name"] == data.STOP_TOOL:
            # tau2's solo agent turns done() into the stop message
            self.trajectory.append(AssistantMessage(role="assistant", content="###STOP###"))
            self.termination, self.finished = "agent_stop", True
            return "done", False
        self.n_calls += 1
        tc = ToolCall(id=f"call_{self.n_calls}", name=call["name"], arguments=call["arguments"], requestor="assistant")
        result = self._execute(tc)
        self.trajectory += [AssistantMessage(role="assistant", tool_calls=[tc]), result]
        return result.content or "", bool(result.error)

    def reply(self, text: str) -> str | None:
        return self.reply_many([self], [text])[0]

    @classmethod
    def reply_many(cls, envs: list["Tau2Env"], texts: list[str]) -> list[str | None]:
        """The agent's messages to the customers of several episodes: the simulated users answer them
        together (one batch for a local model), run their own device tool calls, and answer again."""
        from tau2.data_model.message import AssistantMessage

        from stagewise.envs.users import respond_all, tool_results_all

        talking = []
        for k, (env, text) in enumerate(zip(envs, texts)):
            env.answer = text
            env.trajectory.append(AssistantMessage(role="assistant", content=text))
            if env.ctx.solo:  # tau2's solo agent only calls tools
                env.termination = "agent_error"
            else:
                talking.append(k)
        turns = dict(zip(talking, respond_all([envs[k].user for k in talking], [texts[k] for k in talking])))
        for _ in range(MAX_USER_TOOL_CALLS):
            calling = [k for k in talking if turns[k].get("tool_calls")]
            if not calling:
                break
            results = [envs[k]._run_user_calls(turns[k]["tool_calls"]) for k in calling]
            turns.update(zip(calling, tool_results_all([envs[k].user for k in calling], results)))
        replies: list[str | None] = [None] * len(envs)
        for k in talking:
            replies[k] = envs[k]._hear(turns[k].get("content") or "")
        return replies

    def _run_user_calls(self, calls: list[dict]) -> list[str]:
        """The user's own tool calls (telecom's device), run on the user's side; their results' texts."""
        from tau2.data_model.message import ToolCall, UserMessage

        results = []
        for call in calls:
            self.n_calls += 1
            tc = ToolCall(id=f"call_{self.n_calls}", name=call["name"], arguments=call["arguments"], requestor="user")
            result = self._execute(tc)
            self.trajectory += [UserMessage(role="user", tool_calls=[tc]), result]
            results.append(result.content or "")
        return results

    def _hear(self, message: str) -> str | None:
        """The user's message: recorded; None if it ends the conversation."""
        from tau2.data_model.message import UserMessage

        self.trajectory.append(UserMessage(role="user", content=message))
        if self._stops(message):
            self.termination = "user_stop"
            return None
        return message

    def _execute(self, tc):
        from tau2.data_model.message import ToolMessage

        try:
            return self.env.get_response(tc)
        except Exception as e:  # noqa: BLE001  (tau2 turns tool errors into messages; anything else must not end the run)
            return ToolMessage(id=tc.id, role="tool", content=f"Error: {type(e).__name__}: {e}", requestor=tc.requestor,
                               error=True)

    @staticmethod
    def _stops(message: str) -> bool:
        return any(s in message for s in data.USER_STOP_TOKENS)

    # --- the score --------------------------------------------------------------------------------

    def reward(self) -> dict[str, float]:
        return score(self.ctx.domain, self.tau2_task, self.trajectory, self.termination, self.ctx.solo)

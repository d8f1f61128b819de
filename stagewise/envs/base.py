"""An environment: one episode of a task. The whole interface fits on this screen.

    class Calculator(Environment):
        reward_parts = ("correct", "used_tool")
        def opening(self):  return [{"role": "user", "content": self.task["question"]}]
        def tools(self):    return [self.multiply]          # callables: schema from hints + docstring
        def multiply(self, a: int, b: int) -> int: ...
        def reply(self, text): self.answer = text; return None   # None: the episode ends here
        def reward(self):   return {"correct": ..., "used_tool": ...}

The rollout loop (``stagewise.rl.episodes``) creates one instance per episode from a task dict,
renders ``opening()`` (and the tools' schemas) with the model's chat template, and then, turn by
turn: the policy writes; tool calls in it are run against ``tools()`` and their results go back as
``tool`` messages; a turn without a tool call goes to ``reply()``, whose string (a simulated user's
next message) continues the episode and whose ``None`` ends it. ``reward()`` is read once, at the
end, as named parts; the domain weighs them into the training reward and names the part whose
value 1.0 counts as success in the accuracy matrix.

An environment whose tools are not Python callables (tau2-bench's: JSON schemas and an executor)
overrides ``tool_schemas()`` and ``run_tool(call)`` instead of ``tools()``. A tool may end the episode
by setting ``self.finished`` (tau2's ``done``, a transfer to a human).

A TRL-style environment class (public methods are tools, ``reset(**task)``, ``get_reward()``)
plugs in through ``TRLEnvironment.factory(cls)``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from stagewise.envs.tools import call_tool, tool_schema


class Environment:
    """Subclass and override; instances are created per episode, so state lives on ``self``."""

    reward_parts: tuple[str, ...] = ("reward",)  # names reward() returns (checked against the domain's rewards)

    def __init__(self, task: dict):
        self.task = task
        self.answer: str | None = None  # the policy's last turn without a tool call, or its cut-off last turn
        # every well-formed call the policy made, in order: {"name", "arguments", "ok", "result"}
        self.tool_calls: list[dict] = []
        self.finished = False  # set by a tool that ends the episode
        self._callables: dict[str, Callable] | None = None

    def opening(self) -> list[dict]:
        """The conversation before the policy's first turn: chat messages (system / user / ...)."""
        prompt = self.task["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def tools(self) -> list[Callable]:
        """The tools the policy may call (functions or bound methods with type hints and an
        ``Args:`` docstring). [] = a single-turn task: the first turn is the answer."""
        return []

    def tool_schemas(self) -> list[dict]:
        """The tools' OpenAI / chat-template schemas (default: derived from ``tools()``)."""
        return [tool_schema(fn) for fn in self._tools_by_name().values()]

    def run_tool(self, call: dict) -> tuple[str, bool]:
        """Run one parsed call {"name", "arguments"} -> (text of the tool message, failed). Must not
        raise on anything the policy writes (default: the callables of ``tools()``)."""
        return call_tool(self._tools_by_name(), call)

    def _tools_by_name(self) -> dict[str, Callable]:
        if self._callables is None:
            self._callables = {fn.__name__: fn for fn in self.tools()}
        return self._callables

    def reply(self, text: str) -> str | None:
        """The policy answered without calling a tool. Return the (simulated) user's next message to
        go on, or None to end the episode. Default: record the answer and end."""
        self.answer = text
        return None

    @classmethod
    def reply_many(cls, envs: list["Environment"], texts: list[str]) -> list[str | None]:
        """``reply`` for several episodes of this class at once (the rollout loop calls this): override
        it where the replies can be made together, e.g. by one batched call to a user model."""
        return [env.reply(text) for env, text in zip(envs, texts)]

    def reward(self) -> dict[str, float]:
        """Named reward parts for the finished (or truncated) episode."""
        raise NotImplementedError


class TextTask(Environment):
    """A single-turn domain as an environment: no tools, the first turn is the answer, scored by the
    domain's reward functions (so single- and multi-turn tasks share one rollout loop; the loop scores
    a domain's episodes in one batch, ``rl/episodes.score_episodes``)."""

    def __init__(self, task: dict, domain):
        super().__init__(task)
        self.domain = domain

    def reward(self) -> dict[str, float]:
        """This episode alone (the rollout loop scores a domain's episodes together instead)."""
        return self.domain.score(self.answer or "", self.task)


class TRLEnvironment(Environment):
    """Adapter for TRL's ``environment_factory`` classes: public methods are the tools, ``reset(**task)``
    may return text appended to the last user message, ``get_reward()`` returns a float (part "reward")."""

    reward_parts = ("reward",)

    def __init__(self, task: dict, cls):
        super().__init__(task)
        self.inner = cls()
        fields = {k: v for k, v in task.items() if k != "prompt"}
        self.extra = self.inner.reset(**fields)

    @classmethod
    def factory(cls, env_cls) -> Callable[[dict], Environment]:
        if not callable(getattr(env_cls, "reset", None)):
            raise TypeError(f"{env_cls.__name__}: a TRL-style environment needs a reset(**task) method")
        return lambda task: cls(task, env_cls)

    def opening(self) -> list[dict]:
        msgs = [dict(m) for m in super().opening()]
        if self.extra:
            msgs[-1]["content"] = f"{msgs[-1]['content']}{self.extra}"
        return msgs

    def tools(self) -> list[Callable]:
        return [getattr(self.inner, name) for name, _ in inspect.getmembers(type(self.inner), inspect.isfunction)
                if not name.startswith("_") and name not in ("reset", "get_reward")]

    def reward(self) -> dict[str, float]:
        get = getattr(self.inner, "get_reward", None)
        return {"reward": float(get()) if get is not None else 0.0}

"""A built-in tool domain: arithmetic the bundled 135M model cannot do in its head, with a calculator
it must call before answering.

    domains: [{name: calc, type: calculator}]      # 3-digit x/+ 2-digit numbers; tools add, multiply

An episode: the user asks "What is 347 times 29?"; the policy calls
``<tool_call>{"name": "multiply", "arguments": {"a": 347, "b": 29}}</tool_call>``; the tool answers
10063; the policy answers "10063". Success ("correct") = the final answer's last number is the
result and at least one tool call ran; "used_tool" (a call ran without error) shapes the reward.

Calibrated to SmolLM2-135M-Instruct: its chat template ignores ``tools=``, so the tool list and
call format go into the system message (stagewise.rl.episodes), and one worked example (a
multiplication) precedes the question. Under greedy decoding the base model then solves about a
third of held-out tasks: mostly the multiplications, rarely the additions, which it tries in its head.
"""

from __future__ import annotations

import re

from stagewise.config import DomainSpec
from stagewise.domains.base import Domain, split_items
from stagewise.envs.base import Environment

PHRASINGS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
             "Please work out {a} {op} {b}."]
SYSTEM = "Use the tools to calculate. After the tool replies, answer with just its result."
WORKED_EXAMPLE = [
    {"role": "user", "content": "What is 23 times 41?"},
    {"role": "assistant", "content": '<tool_call>{"name": "multiply", "arguments": {"a": 23, "b": 41}}</tool_call>'},
    {"role": "tool", "content": "943"},
    {"role": "assistant", "content": "943"},
]


class CalculatorEnv(Environment):
    reward_parts = ("correct", "used_tool")

    def opening(self) -> list[dict]:
        shots = WORKED_EXAMPLE if self.task.get("worked_example", True) else []
        return [{"role": "system", "content": SYSTEM}, *shots, {"role": "user", "content": self.task["prompt"]}]

    def tools(self):
        return [self.multiply, self.add]

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        return int(a) * int(b)

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first term.
            b: The second term.
        """
        return int(a) + int(b)

    def reward(self) -> dict[str, float]:
        nums = re.findall(r"-?\d+", self.answer or "")
        used = any(c["ok"] for c in self.tool_calls)
        right = bool(nums) and nums[-1] == self.task["answer"]
        return {"correct": float(right and used), "used_tool": float(used)}


def calculator(spec: DomainSpec, seed: int) -> Domain:
    """args: lo=100, hi=999 (first number), lo2=11, hi2=99 (second), ops=["times", "plus"],
    worked_example=true."""
    a_range = range(spec.args.get("lo", 100), spec.args.get("hi", 999) + 1)
    b_range = range(spec.args.get("lo2", 11), spec.args.get("hi2", 99) + 1)
    ops = spec.args.get("ops", ["times", "plus"])
    items = [(a, b, op) for op in ops for a in a_range for b in b_range]
    train, held = split_items(items, spec.eval_size, spec.train_size, seed, spec.name)

    def task(a, b, op):
        phrase = PHRASINGS[(a * 31 + b * 7) % len(PHRASINGS)]
        return {"prompt": phrase.format(a=a, b=b, op=op), "answer": str(a * b if op == "times" else a + b),
                "worked_example": spec.args.get("worked_example", True)}

    return Domain(spec.name, [task(*x) for x in train], [task(*x) for x in held],
                  rewards=[("correct", 1.0), ("used_tool", 0.2)], metric="correct",
                  environment=CalculatorEnv, reward_parts=CalculatorEnv.reward_parts)

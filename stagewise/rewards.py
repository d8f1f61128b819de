"""Reward functions: pure ``(completion_text, example) -> float``, registered by name.

A domain lists the rewards it uses with weights (``domains[i].rewards``); the GRPO loop logs
each function's mean and std separately (``reward/<name>``) and trains on the weighted sum. They
are called through the batched form of TRL's reward functions (``reward_functions.per_sample``),
which a domain may also list directly (``fn: "my_pkg.rewards:accuracy"``).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numbers_in(text: str) -> list[float]:
    return [float(x) for x in _NUMBER.findall(text.replace(",", ""))]


def normalise(text: str) -> str:
    return text.strip().strip(".!").strip().lower()


def last_number(text: str, example: dict) -> float:
    """1.0 when the last number in the completion equals the numeric answer."""
    nums = numbers_in(text)
    return float(bool(nums) and abs(nums[-1] - float(example["answer"])) < 1e-6)


def numeric(text: str, example: dict) -> float:
    """1.0 when the completion holds exactly one number and it equals the answer."""
    nums = numbers_in(text)
    return float(len(nums) == 1 and abs(nums[0] - float(example["answer"])) < 1e-6)


def exact(text: str, example: dict) -> float:
    """1.0 when the completion, stripped of spaces, case and a final period, equals the answer."""
    return float(normalise(text) == normalise(str(example["answer"])))


def contains(text: str, example: dict) -> float:
    """1.0 when the answer appears in the completion (case-insensitive)."""
    return float(normalise(str(example["answer"])) in text.lower())


def regex(text: str, example: dict) -> float:
    """1.0 when ``example['answer']`` (a regular expression) matches somewhere in the completion."""
    return float(re.search(str(example["answer"]), text) is not None)


def concise(text: str, example: dict) -> float:
    """Shaping: 1.0 for an answer of at most 6 words, decaying to 0 at 30 words."""
    n = len(text.split())
    return float(max(0.0, min(1.0, (30 - n) / 24)))


def only_answer(text: str, example: dict) -> float:
    """1.0 when the answer appears and no other candidate (``example['options']``) does.

    For choice tasks ("which is larger, a or b?") where the last number is gameable: "11 is
    larger than 85" ends with the right number but names the wrong one.
    """
    nums = numbers_in(text)
    ans = float(example["answer"])
    others = [float(o) for o in example.get("options") or [] if float(o) != ans]  # None: a record without options
    return float(any(abs(n - ans) < 1e-6 for n in nums) and not any(abs(n - o) < 1e-6 for n in nums for o in others))

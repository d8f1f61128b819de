"""Built-in arithmetic domains, generated offline and calibrated to the bundled SmolLM2-135M.

Each enumerates a finite item space, so train and held-out splits are disjoint by construction.
"""

from __future__ import annotations

from stagewise.config import DomainSpec
from stagewise.domains.base import Domain, split_items

ANSWER_ONLY = " Reply with just the number."


def _arith(spec: DomainSpec, seed: int, items, make, rewards, metric="last_number") -> Domain:
    train, held = split_items(items, spec.eval_size, spec.train_size, seed, spec.name)
    return Domain(spec.name, [make(*x) for x in train], [make(*x) for x in held], rewards, metric)


def add(spec: DomainSpec, seed: int) -> Domain:
    """'What is a + b?'  a, b in [lo, hi] (args: lo=1, hi=60)."""
    lo, hi = spec.args.get("lo", 1), spec.args.get("hi", 60)
    items = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    make = lambda a, b: {"prompt": f"What is {a} + {b}?{ANSWER_ONLY}", "answer": str(a + b)}  # noqa: E731
    return _arith(spec, seed, items, make, [("last_number", 1.0), ("concise", 0.2)])


# Two phrasings, alternating by item. The bundled model names only the right number for ~15% /
# ~47% (larger) and ~21% / ~66% (smaller) of them under greedy decoding: a domain starts near 0.3-0.5.
MAX_TEMPLATES = ["Which number is larger, {a} or {b}?" + ANSWER_ONLY,
                 "Pick the larger number: {a} or {b}." + ANSWER_ONLY]
MIN_TEMPLATES = ["Which number is smaller, {a} or {b}?" + ANSWER_ONLY,
                 "Pick the smaller number: {a} or {b}." + ANSWER_ONLY]


def _choose_one(spec: DomainSpec, seed: int, pick, templates: list[str]) -> Domain:
    """Two distinct numbers in [lo, hi]; the answer is pick(a, b); correct = only it is named."""
    lo, hi = spec.args.get("lo", 1), spec.args.get("hi", 99)
    templates = spec.args.get("templates", templates)
    items = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if a != b]
    make = lambda a, b: {"prompt": templates[(a * 7 + b) % len(templates)].format(a=a, b=b),  # noqa: E731
                          "answer": str(pick(a, b)), "options": [a, b]}
    return _arith(spec, seed, items, make, [("only_answer", 1.0), ("concise", 0.2)], metric="only_answer")


def larger(spec: DomainSpec, seed: int) -> Domain:
    """'Which is larger, a or b?'  distinct a, b in [lo, hi] (args: lo=1, hi=99, templates=[...])."""
    return _choose_one(spec, seed, max, MAX_TEMPLATES)


def smaller(spec: DomainSpec, seed: int) -> Domain:
    """'Which is smaller, a or b?'  distinct a, b in [lo, hi] (args: lo=1, hi=99, templates=[...])."""
    return _choose_one(spec, seed, min, MIN_TEMPLATES)


def sub(spec: DomainSpec, seed: int) -> Domain:
    """'What is a - b?'  lo <= b < a <= hi (args: lo=1, hi=60)."""
    lo, hi = spec.args.get("lo", 1), spec.args.get("hi", 60)
    items = [(a, b) for a in range(lo, hi + 1) for b in range(lo, a)]
    make = lambda a, b: {"prompt": f"What is {a} - {b}?{ANSWER_ONLY}", "answer": str(a - b)}  # noqa: E731
    return _arith(spec, seed, items, make, [("last_number", 1.0), ("concise", 0.2)])


def mul(spec: DomainSpec, seed: int) -> Domain:
    """'What is a * b?'  a, b in [lo, hi] (args: lo=2, hi=20)."""
    lo, hi = spec.args.get("lo", 2), spec.args.get("hi", 20)
    items = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    make = lambda a, b: {"prompt": f"What is {a} times {b}?{ANSWER_ONLY}", "answer": str(a * b)}  # noqa: E731
    return _arith(spec, seed, items, make, [("last_number", 1.0), ("concise", 0.2)])


def successor(spec: DomainSpec, seed: int) -> Domain:
    """'What number comes right after n?'  n in [lo, hi] (args: lo=10, hi=999)."""
    lo, hi = spec.args.get("lo", 10), spec.args.get("hi", 999)
    make = lambda n: {"prompt": f"What number comes right after {n}?{ANSWER_ONLY}", "answer": str(n + 1)}  # noqa: E731
    return _arith(spec, seed, [(n,) for n in range(lo, hi + 1)], make, [("last_number", 1.0), ("concise", 0.2)])

"""Bring-your-own-data domain: one JSON object per line with ``prompt`` and ``answer``.

    domains:
      - name: capitals
        type: jsonl
        args: {path: data/capitals.jsonl, reward: exact}   # exact | numeric | contains | regex

``prompt`` is a string or a list of chat messages ({"role", "content"}). Any other keys are kept
on the example and reach the reward functions. A malformed line fails with ``file:line``.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.config import DomainSpec
from stagewise.data.records import read_records
from stagewise.domains.base import Domain, split_items
from stagewise.errors import ConfigError, DataError

REWARD_TYPES = ("exact", "numeric", "contains", "regex")  # args.reward: a reward of rewards.py


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
        return
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages")
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each chat message needs string 'role' and 'content'")


def _check_record(obj: dict, where: str) -> dict:
    for key in ("prompt", "answer"):
        if key not in obj:
            raise DataError(f"{where}: missing key '{key}'")
    _check_prompt(obj["prompt"], where)
    if not isinstance(obj["answer"], (str, int, float)) or isinstance(obj["answer"], bool):
        raise DataError(f"{where}: 'answer' must be a string or a number")
    return {**obj, "answer": str(obj["answer"])}


def read_jsonl(path: str | Path, on_error: str = "raise") -> tuple[list[dict], list[str]]:
    """-> (records, problems skipped). A UTF-8 BOM and blank lines are fine."""
    records, skipped = read_records(path, on_error)
    rows = []
    for where, obj in records:
        try:
            rows.append(_check_record(obj, where))
        except DataError as e:
            if on_error != "skip":
                raise
            skipped.append(str(e))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows, skipped


def split_by_prompt(rows: list[dict], spec: DomainSpec, seed: int, key=None) -> tuple[list[dict], list[dict]]:
    """Seeded train / held-out split by distinct prompt (or ``key(row)``), so a prompt repeated in the
    file cannot land on both sides; a small file keeps about a fifth for held-out."""
    key = key or (lambda r: json.dumps(r["prompt"], sort_keys=True))
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(key(r), []).append(r)
    keys = sorted(by_prompt)
    eval_size = min(spec.eval_size, max(1, len(keys) // 5)) if len(keys) <= spec.eval_size else spec.eval_size
    train_keys, eval_keys = split_items(keys, eval_size, spec.train_size, seed, spec.name)
    return [r for k in train_keys for r in by_prompt[k]], [r for k in eval_keys for r in by_prompt[k]]


def jsonl_domain(spec: DomainSpec, seed: int) -> Domain:
    if "path" not in spec.args:
        raise ConfigError(f"domains.{spec.name}.args.path: required for a jsonl domain")
    reward = spec.args.get("reward", "exact")
    if reward not in REWARD_TYPES:
        raise ConfigError(f"domains.{spec.name}.args.reward: {reward!r} is not one of {list(REWARD_TYPES)}")
    rows, skipped = read_jsonl(spec.args["path"], spec.args.get("on_error", "raise"))
    train, held = split_by_prompt(rows, spec, seed)
    return Domain(spec.name, train, held, [(reward, 1.0)], reward, skipped=skipped)

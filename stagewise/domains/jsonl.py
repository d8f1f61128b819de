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
from stagewise.domains.base import Domain, split_items
from stagewise.errors import ConfigError, DataError
from stagewise.registry import register

REWARD_TYPES = {"exact": "exact", "numeric": "numeric", "contains": "contains", "regex": "regex"}


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


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8-sig") as fh:  # editors may write a BOM
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("prompt", "answer"):
                if key not in obj:
                    raise DataError(f"{where}: missing key '{key}'")
            _check_prompt(obj["prompt"], where)
            if not isinstance(obj["answer"], (str, int, float)) or isinstance(obj["answer"], bool):
                raise DataError(f"{where}: 'answer' must be a string or a number")
            obj["answer"] = str(obj["answer"])
            rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


@register("domain", "jsonl")
def jsonl_domain(spec: DomainSpec, seed: int) -> Domain:
    if "path" not in spec.args:
        raise ConfigError(f"domains.{spec.name}.args.path: required for a jsonl domain")
    reward = spec.args.get("reward", "exact")
    if reward not in REWARD_TYPES:
        raise ConfigError(f"domains.{spec.name}.args.reward: {reward!r} is not one of {sorted(REWARD_TYPES)}")
    rows = read_jsonl(spec.args["path"])
    # split by distinct prompt so a prompt repeated in the file cannot land on both sides
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append(r)
    keys = sorted(by_prompt)
    eval_size = min(spec.eval_size, max(1, len(keys) // 5)) if len(keys) <= spec.eval_size else spec.eval_size
    train_keys, eval_keys = split_items(keys, eval_size, spec.train_size, seed, spec.name)
    train = [r for k in train_keys for r in by_prompt[k]]
    held = [r for k in eval_keys for r in by_prompt[k]]
    return Domain(spec.name, train, held, [(REWARD_TYPES[reward], 1.0)], REWARD_TYPES[reward])

"""Conversation data as a domain: what SFT stages learn, and GRPO / accuracy where a reward is given.

    domains:
      - name: support
        type: chat
        args:
          path: data/support.jsonl        # JSONL, .parquet, or a datasets.save_to_disk directory
          prompt_template: "Profile: {profile}\\nQuery: {query}"   # optional: structured records
          response_field: response        # with prompt_template
          system: "You are a helpful assistant."                 # optional
          reward: exact                   # optional: exact | numeric | contains | regex -> accuracy

Record formats: see stagewise/data/records.py. The train / held-out split is seeded and by record
(before any template), so ablations of the prompt fields are compared on the same held-out
examples. Each example keeps the whole conversation
(``messages``) plus ``prompt`` (all turns before the last assistant turn) and ``answer`` (that
turn's text), so the same domain serves SFT, GRPO and greedy accuracy. Malformed records fail with
``file:row: ...`` or, with ``data.on_error: skip``, are skipped and counted.
"""

from __future__ import annotations

import json

from stagewise.config import DomainSpec
from stagewise.data.records import RecordFormat, read_records, to_conversation
from stagewise.domains.base import Domain
from stagewise.domains.jsonl import REWARD_TYPES, split_by_prompt
from stagewise.errors import ConfigError, DataError

ARGS = {"path", "prompt_template", "response_field", "system", "reward", "on_error"}


def chat_domain(spec: DomainSpec, seed: int) -> Domain:
    where = f"domains.{spec.name}.args"
    unknown = sorted(set(spec.args) - ARGS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(ARGS))})")
    if "path" not in spec.args:
        raise ConfigError(f"{where}.path: required for a chat domain")
    reward = spec.args.get("reward")
    if reward is not None and reward not in REWARD_TYPES:
        raise ConfigError(f"{where}.reward: {reward!r} is not one of {list(REWARD_TYPES)}")
    fmt = RecordFormat(prompt_template=spec.args.get("prompt_template"),
                       response_field=spec.args.get("response_field", "response"), system=spec.args.get("system"))
    on_error = spec.args.get("on_error", "raise")
    records, skipped = read_records(spec.args["path"], on_error)
    rows = []
    for loc, rec in records:
        try:
            conv = to_conversation(rec, loc, fmt)
        except DataError as e:
            if on_error != "skip":
                raise
            skipped.append(str(e))
            continue
        rows.append({**{k: v for k, v in rec.items() if k not in ("messages", "prompt")},
                     "messages": conv, "prompt": conv[:-1], "answer": conv[-1]["content"],
                     "_record": json.dumps(rec, sort_keys=True, default=str)})
    if not rows:
        raise DataError(f"{spec.args['path']}: no usable records ({len(skipped)} skipped)")
    # split by the whole record, before any template: the held-out set is the same whichever fields
    # a prompt_template shows (ablations that hide fields compare on the same examples)
    train, held = split_by_prompt(rows, spec, seed, key=lambda r: r["_record"])
    rewards = [(reward, 1.0)] if reward else []
    return Domain(spec.name, train, held, rewards, reward if reward else None, skipped=skipped)

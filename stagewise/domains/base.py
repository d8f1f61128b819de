"""A domain: a task family with verifiable rewards and disjoint, seeded train / held-out splits.

    dom = build_domain(DomainSpec(name="add"), seed=0)
    dom.train[0] -> {"prompt": "What is 12 + 7? ...", "answer": "19"}

A domain builder is registered under a name (``@register("domain", "add")``) or given as
``"package.module:function"`` in ``domains[i].type`` (a plugin); it returns a ``Domain``.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from stagewise.config import DomainSpec
from stagewise.errors import ConfigError
from stagewise.registry import lookup, names
from stagewise.reward_functions import RewardBatch, RewardContext, call_all, combine, function_name, load, per_sample
from stagewise.seeds import split_rng


@dataclass(eq=False)
class Domain:
    name: str
    train: list[dict]  # {"prompt": str | list[chat message], "answer": str, "messages"?: [...], ...}
    eval: list[dict]  # disjoint from train
    rewards: list[tuple[str, float]]  # (reward name, weight); the weighted sum trains GRPO; [] = none
    metric: str | None  # reward whose value 1.0 counts as "correct" in held-out accuracy; None = none
    # name -> a batched reward function in TRL's form (stagewise/reward_functions.py); a name not given
    # here is a registered per-sample reward, adapted (or, with environment, one of its reward parts)
    reward_fns: dict[str, Callable] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # malformed records skipped (data.on_error: skip)
    # a multi-turn domain: task dict -> Environment (stagewise.envs); its reward() parts are the rewards
    environment: Callable | None = None
    reward_parts: tuple[str, ...] = ()  # with environment: the part names reward() returns
    oracle: Callable | None = None  # example -> the turns of an agent that solves it (demonstrations)

    def __post_init__(self):
        named = [n for n, _ in self.rewards] + ([self.metric] if self.metric else [])
        if self.environment is not None:
            unknown = [n for n in named if n not in self.reward_parts and n not in self.reward_fns]
            if unknown:
                raise ConfigError(f"domains.{self.name}: the environment's reward parts are "
                                  f"{', '.join(self.reward_parts)}; unknown: {', '.join(unknown)}")
        else:
            for name in named:
                if name not in self.reward_fns:
                    self.reward_fns[name] = per_sample(lookup("reward", name))
        # no training tasks: an evaluation-only domain (preflight refuses a stage that trains on it)
        if not self.eval:
            raise ConfigError(f"domains.{self.name}: empty split (train {len(self.train)}, eval {len(self.eval)})")

    @staticmethod
    def conversation(example: dict) -> list[dict]:
        """The example as a chat conversation ending with the assistant's answer (what SFT learns)."""
        if "messages" in example:
            return example["messages"]
        prompt = example["prompt"]
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return msgs + [{"role": "assistant", "content": str(example["answer"])}]

    def oracle_turns(self, example: dict) -> list[str] | None:
        """The turns of an agent that solves the example: the domain's oracle, else a single-turn
        example's reference answer; None when the domain knows no solution."""
        if self.oracle is not None:
            return self.oracle(example)
        if self.environment is None and "answer" in example:
            return [str(example["answer"])]
        return None

    def make_env(self, example: dict):
        """The episode's environment: the domain's own, or a single-turn TextTask scored by reward_fns."""
        from stagewise.envs.base import TextTask

        return self.environment(example) if self.environment is not None else TextTask(example, self)

    def weigh(self, parts: dict[str, float]) -> float:
        """The training reward: the weighted sum of the named parts that apply (NaN parts left out)."""
        return self.weigh_rows([parts])[0].item()

    def weigh_rows(self, parts: list[dict[str, float]]) -> torch.Tensor:
        """``weigh`` of many rows -> (B,); warns, as TRL does, where no part applies (reward 0)."""
        values = torch.tensor([[p.get(n, math.nan) for n, _ in self.rewards] for p in parts],
                              dtype=torch.float64).view(len(parts), len(self.rewards))
        rewards, unscorable = combine(values, torch.tensor([w for _, w in self.rewards], dtype=torch.float64))
        if unscorable.any():
            warnings.warn(f"domain {self.name}: every reward ({', '.join(n for n, _ in self.rewards)}) returned "
                          f"None for a completion; its reward is 0. Make at least one reward apply to every "
                          f"record of the domain", RuntimeWarning, stacklevel=2)
        return rewards

    def score_batch(self, batch: RewardBatch, context: RewardContext | None = None, *,
                    metric_only: bool = False) -> tuple[list[dict[str, float]], torch.Tensor]:
        """Each part's value (NaN: not applicable) for a batch of this domain's completions, and their
        training rewards (B,): the reward functions called together on the batch (an environment's
        parts are its own). metric_only (held-out accuracy): only the metric's function is called,
        the rewards are NaN."""
        names = [] if metric_only else [n for n, _ in self.rewards]
        if self.metric is not None and self.metric not in names:
            names.append(self.metric)
        functions = [(n, self.reward_fns[n]) for n in names if n in self.reward_fns]
        values = call_all(functions, batch, context or RewardContext(), f"domain {self.name}")
        own = ([{k: float(v) for k, v in env.reward().items()} for env in batch.environments]
               if self.environment is not None else [{} for _ in range(len(batch))])
        parts = [{**own[i], **{n: v[i] for n, v in values.items()}} for i in range(len(batch))]
        if metric_only:
            return parts, torch.full((len(batch),), math.nan)
        return parts, self.weigh_rows(parts)

    def score(self, text: str, example: dict) -> dict[str, float]:
        """Each reward's value (and the metric's) for one completion of a single-turn domain."""
        prompt = example.get("prompt", "")
        completion = text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
        return self.score_batch(RewardBatch([prompt], [completion], [[]], [example]))[0][0]

    def succeeded(self, parts: dict[str, float]) -> bool:
        """An episode counts as a success when its metric part reaches 1.0 (a NaN part: not a success)."""
        if self.metric is None:
            raise ValueError(f"domain {self.name} defines no accuracy metric")
        return parts[self.metric] >= 1.0


def split_items(items: list, eval_size: int, train_size: int, seed: int, name: str) -> tuple[list, list]:
    """Shuffle with a seeded RNG; the first eval_size items are held out, the next train_size train."""
    items = list(items)
    split_rng(name, seed).shuffle(items)
    if len(items) <= eval_size:
        raise ConfigError(f"domains.{name}: only {len(items)} distinct items, eval_size={eval_size} leaves none "
                          f"to train")
    return items[eval_size: eval_size + train_size], items[:eval_size]


def build_domain(spec: DomainSpec, seed: int, on_error: str = "raise", where: str | None = None) -> Domain:
    """on_error: the run's data.on_error, the default for builders that read files (args may override);
    where: the spec's place in the config, for errors (default ``domains.<name>``)."""
    where = where or f"domains.{spec.name}"
    kind = spec.type or spec.name
    spec = spec.model_copy(update={"args": {"on_error": on_error, **spec.args}})
    if ":" in kind:  # plugin: "package.module:function"
        mod, fn = kind.split(":", 1)
        try:
            builder = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"domains.{spec.name}.type: cannot load plugin {kind!r} ({e})") from None
    else:
        builder = lookup("domain", kind)
    dom = builder(spec, seed)
    if not isinstance(dom, Domain):
        raise ConfigError(f"domains.{spec.name}: builder {kind!r} returned {type(dom).__name__}, not a Domain")
    if spec.rewards is not None:
        named = config_rewards(spec, dom, where)
        rewards = [(n, r.weight) for (n, _), r in zip(named, spec.rewards)]
        dom = Domain(dom.name, dom.train, dom.eval, rewards, dom.metric or (rewards[0][0] if rewards else None),
                     reward_fns={**dom.reward_fns, **{n: fn for n, fn in named if fn is not None}},
                     skipped=dom.skipped, environment=dom.environment, reward_parts=dom.reward_parts,
                     oracle=dom.oracle)
    return dom


def config_rewards(spec: DomainSpec, dom: Domain, where: str) -> list[tuple[str, Callable | None]]:
    """The config's rewards in order, as (the name each is logged under, its function): ``fn:`` ones
    imported (None for ``name:`` ones, a registered reward or an environment's part, checked here
    and by Domain)."""
    known, out = names("reward"), []
    for j, r in enumerate(spec.rewards):
        if r.fn is None:
            if dom.environment is None and r.name not in known:
                raise ConfigError(f"{where}.rewards.{j}.name: unknown reward {r.name!r} (known: {', '.join(known)}; "
                                  f"or fn: 'package.module:function' for a function in TRL's form)")
            out.append((r.name, None))
            continue
        fn = load(r.fn, f"{where}.rewards.{j}.fn")
        name = r.name or function_name(fn)
        # a logged name must say which function it is: never a registered reward's or a part's
        if name in known or name in dom.reward_parts:
            raise ConfigError(f"{where}.rewards.{j}: {r.fn!r} would be logged as {name!r}, the name of a "
                              f"{'registered reward' if name in known else 'reward part'}; give it another "
                              f"(name: my_{name})")
        if name in (n for n, fn in out if fn is not None):
            raise ConfigError(f"{where}.rewards.{j}: two reward functions are named {name!r}; give one another "
                              f"(name: ...)")
        out.append((name, fn))
    return out

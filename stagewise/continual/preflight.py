"""Everything that can be checked before any model loads, in one place, for `run`, `continual`,
`sweep` (every ablation, before the first runs) and `launch` alike:

    check_config(cfg, world=8)            # plugins, registry names, trackers, strategy, each stage's shapes
    domains = build_domains(cfg)          # the domains, and what needs them built (rewards, SFT data)

A typo then costs a second, not a model load, and is one line naming the field
(``error: grpo.loss: unknown loss 'dapoo' (known: dapo, dr_grpo, grpo)``, exit status 2).
"""

from __future__ import annotations

import importlib

from stagewise import reward_functions
from stagewise.config import RunConfig
from stagewise.domains.base import Domain, build_domain
from stagewise.errors import ConfigError
from stagewise.parallel import runtime
from stagewise.registry import lookup, names
from stagewise.trackers import check_installed
from stagewise.tracking import print0


def check_config(cfg: RunConfig, world: int) -> None:
    """The config's names, strategy and batch shapes for ``world`` processes; raises ConfigError."""
    import stagewise.builtins  # noqa: F401  (registers every built-in name)

    import_plugins(cfg)
    check_names(cfg)
    check_installed(cfg.logging.report_to)  # `report_to: [wandb]` without wandb: one line, no model loaded
    check_one_vllm_engine(cfg)
    runtime.check(cfg.dist, world)
    for i, stage in enumerate(cfg.stages):
        lookup("stage", stage.kind).check(cfg, i, world)


def import_plugins(cfg: RunConfig) -> None:
    """Plugins are imported first: they may register more names."""
    for i, mod in enumerate(cfg.plugins):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001  (a plugin that fails to import is the user's error, named as such)
            raise ConfigError(f"plugins.{i}: cannot import {mod!r} ({type(e).__name__}: {e})") from None


def check_names(cfg: RunConfig) -> None:
    """Every registry name the config uses exists: stage kinds, advantages, losses, rollout engines,
    domain types, and every reward function given as ``fn:`` imports (reward names are checked when
    the domains are built: an environment's parts are its own)."""
    for i, stage in enumerate(cfg.stages):
        if stage.kind not in names("stage"):
            raise ConfigError(f"stages.{i}.kind: unknown stage kind {stage.kind!r} "
                              f"(known: {', '.join(names('stage'))})")
    for i in range(len(cfg.stages)):
        grpo_cfg = cfg.stage_part(i, "grpo")
        where = f"stages.{i}.grpo" if cfg.stages[i].grpo else "grpo"
        for kind, name in (("advantage", grpo_cfg.advantage), ("loss", grpo_cfg.loss)):
            if name not in names(kind):
                raise ConfigError(f"{where}.{kind}: unknown {kind} {name!r} (known: {', '.join(names(kind))})")
        rollout_cfg = cfg.stage_part(i, "rollout")
        if rollout_cfg.engine not in names("rollout_engine"):
            where = f"stages.{i}.rollout" if cfg.stages[i].rollout else "rollout"
            raise ConfigError(f"{where}.engine: unknown rollout engine {rollout_cfg.engine!r} "
                              f"(known: {', '.join(names('rollout_engine'))})")
    if cfg.eval_engine == "vllm":
        from stagewise.generation.vllm_engine import require_vllm

        require_vllm()
    for i, spec in enumerate(cfg.domains):
        kind = spec.type or spec.name
        if ":" not in kind and kind not in names("domain"):
            raise ConfigError(f"domains.{i}.type: unknown domain type {kind!r} (known: {', '.join(names('domain'))}; "
                              f"or 'module:function' for a plugin)")
        for j, r in enumerate(spec.rewards or []):  # a reward function in TRL's form: importable, callable
            if r.fn is not None:
                reward_functions.load(r.fn, f"domains.{i}.rewards.{j}.fn")


def check_one_vllm_engine(cfg: RunConfig) -> None:
    """vLLM is built once per process and run (its shutdown leaves torch.distributed): a stage cannot
    bring options of its own."""
    for i in range(len(cfg.stages)):
        rollout_cfg = cfg.stage_part(i, "rollout")
        if rollout_cfg.engine == "vllm" and rollout_cfg.vllm != cfg.rollout.vllm:
            raise ConfigError(f"stages.{i}.rollout.vllm: the vLLM engine is built once per run, from the run's "
                              f"rollout.vllm; set these options there, not per stage")


def build_domains(cfg: RunConfig) -> list[Domain]:
    """Every domain of the run (no model needed), checked against the stages that train on them."""
    domains = [build_domain(spec, cfg.seed, on_error=cfg.data.on_error, where=f"domains.{i}")
               for i, spec in enumerate(cfg.domains)]
    for d in domains:
        if d.skipped:
            print0(f"[stagewise] domains.{d.name}: skipped {len(d.skipped)} malformed record(s) (data.on_error=skip); "
                   f"first: {d.skipped[0]}")
    by_name = {d.name: d for d in domains}
    for i, stage in enumerate(cfg.stages):
        for name in stage.domains:
            why = cannot_train(stage.kind, by_name[name])
            if why is not None:
                raise ConfigError(f"stages.{i}: domain {name!r} {why[0]}{why[1]}")
        kind = lookup("stage", stage.kind)
        if kind.check_domains is not None:
            kind.check_domains(cfg, i, by_name)
        if stage.replay:
            pool, left_out = replay_pool(cfg, i, by_name)
            if not pool:
                earlier = "; ".join(f"{n} {why}" for n, why in left_out.items()) or "stage 1 has no earlier stage"
                raise ConfigError(f"stages.{i}.replay={stage.replay:g}: no earlier stage's domain can be replayed "
                                  f"in a {stage.kind} stage ({earlier})")
    return domains


def cannot_train(kind: str, dom: Domain) -> tuple[str, str] | None:
    """Why a stage of ``kind`` cannot train on ``dom``'s training tasks: (the reason, as the end of a
    sentence naming the domain; what to do instead); None when it can."""
    if not dom.train:
        return "has no training tasks (an evaluation-only domain)", "; train on another"
    if kind == "sft" and dom.environment is not None and not all("messages" in t for t in dom.train):
        return ("is an environment", "; an sft stage needs reference conversations (tasks with 'messages'), "
                "so train it with a grpo stage")
    if lookup("stage", kind).needs_reward and not dom.rewards:
        return "defines no reward", f", and a {kind} stage learns from one (set domains[].rewards or args.reward)"
    return None


def replay_pool(cfg: RunConfig, i: int, by_name: dict[str, Domain]) -> tuple[list[Domain], dict[str, str]]:
    """Stage i's replay domains: the earlier stages' domains (first stage first) that are not its
    own and that a stage of its kind can train on; and those left out, with why. A curriculum that
    mixes kinds (an sft warm-up on demonstrations, then grpo on the environment) replays into a grpo
    stage the environments, not the demonstrations (no reward), and into an sft stage the reverse."""
    stage = cfg.stages[i]
    earlier = dict.fromkeys(d for s in cfg.stages[:i] for d in s.domains if d not in stage.domains)
    pool, left_out = [], {}
    for name in earlier:
        why = cannot_train(stage.kind, by_name[name])
        if why is None:
            pool.append(by_name[name])
        else:
            left_out[name] = why[0]
    return pool, left_out

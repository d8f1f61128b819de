"""Every built-in name of every registry, in one table: importing this module registers them all.
It is the only module that registers built-ins (``continual/preflight.py`` imports it before any
name is checked); a plugin registers its own with ``stagewise.registry.register``.

    kind             config key that names one                       where the built-ins are defined
    stage            stages[i].kind                                  rl/grpo.py, rl/rft.py, sft/sft.py
    advantage        grpo.advantage                                  rl/advantages.py
    loss             grpo.loss                                       rl/losses.py
    reward           domains[i].rewards[j].name, args.reward         rewards.py
    domain           domains[i].type (or its name)                   domains/builtin.py, jsonl.py, chat.py,
                                                                     calculator.py, tau2/domain.py
    rollout_engine   rollout.engine, eval.engine                     generation/engines.py, generation/vllm_engine.py
    user_simulator   domains[i].args.user.kind (tau2)                envs/users.py
"""

from __future__ import annotations

from stagewise import rewards
from stagewise.domains import builtin, calculator, chat, jsonl
from stagewise.domains.tau2 import domain as tau2
from stagewise.envs import users
from stagewise.generation.engines import LocalEngine
from stagewise.generation.vllm_engine import VLLMRollouts
from stagewise.registry import register
from stagewise.rl import advantages, grpo, losses, rft
from stagewise.sft import sft
from stagewise.training.stage import StageKind

BUILTINS: dict[str, dict[str, object]] = {
    "stage": {
        "grpo": StageKind(train=grpo.train_grpo_stage, check=grpo.check_grpo_stage),
        "sft": StageKind(train=sft.train_sft_stage, check=sft.check_sft_stage, needs_reward=False),
        "rft": StageKind(train=rft.train_rft_stage, check=rft.check_rft_stage, check_domains=rft.check_rft_domains),
    },
    "advantage": {"grpo": advantages.grpo_advantages, "dr_grpo": advantages.dr_grpo_advantages,
                  "batch_std": advantages.batch_std_advantages},
    "loss": {"grpo": losses.aggregate_grpo, "dr_grpo": losses.aggregate_dr_grpo, "dapo": losses.aggregate_dapo},
    "reward": {"last_number": rewards.last_number, "numeric": rewards.numeric, "exact": rewards.exact,
               "contains": rewards.contains, "regex": rewards.regex, "concise": rewards.concise,
               "only_answer": rewards.only_answer},
    "domain": {"add": builtin.add, "max": builtin.larger, "smaller": builtin.smaller, "sub": builtin.sub,
               "mul": builtin.mul, "next": builtin.successor, "jsonl": jsonl.jsonl_domain, "chat": chat.chat_domain,
               "calculator": calculator.calculator, "tau2_airline": tau2.airline, "tau2_retail": tau2.retail,
               "tau2_telecom": tau2.telecom},
    "rollout_engine": {"local": LocalEngine, "vllm": VLLMRollouts},
    "user_simulator": {"scripted": users.ScriptedUser, "local": users.LocalModelUser, "endpoint": users.EndpointUser},
}

for _kind, _table in BUILTINS.items():
    for _name, _value in _table.items():
        register(_kind, _name)(_value)

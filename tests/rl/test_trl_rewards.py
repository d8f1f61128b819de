"""Reward functions written for TRL's GRPOTrainer, plugged in through a config unchanged
(``rewards: [{fn: "module:function"}]``), on the tiny model: GRPO and RFT stages log each
function's mean as ``reward/<name>``, pass the trainer state, collect log_metric / log_extra, and
stop with one line naming a function that fails."""

from __future__ import annotations

import json

import pytest

from stagewise.config import load_config
from stagewise.continual.curriculum import run_curriculum
from stagewise.errors import ConfigError, RewardError
from tests.helpers import tiny_raw

STATES: list[tuple[int, int]] = []  # (global_step, max_steps) of every call of record_state


def record_state(completions, trainer_state, **kwargs):
    """A curriculum-style function: it reads the trainer state as TRL passes it (None would raise)."""
    STATES.append((trainer_state.global_step, trainer_state.max_steps))
    return [None] * len(completions)  # never applies: it must not move the reward


def broken(completions, answer, **kwargs):
    return [float(a) / 0 for a in answer]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trl_raw(tmp_path, tiny_model_dir, out) -> dict:
    """Two jsonl domains: conversational prompts (TRL's format example reads completion[0]["content"])
    and plain ones with a ground_truth column (TRL's logging example reads it)."""
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": f"Say seven {i} times."}],
                                                   "answer": "7" * i} for i in range(1, 21)])
    boxed = write_jsonl(tmp_path / "boxed.jsonl", [{"prompt": f"Write \\boxed{{{i}}}.", "answer": str(i),
                                                    "ground_truth": str(i)} for i in range(1, 21)])
    tokens = {"fn": "tests.trl_docs.token_length:reward_func", "name": "tokens", "weight": 0.01}
    raw = tiny_raw(tiny_model_dir, out, stages=1, steps=2)
    raw["domains"] = [
        {"name": "chat", "type": "jsonl", "eval_size": 4, "args": {"path": chat}, "rewards": [
            {"fn": "tests.trl_docs.think_format:format_reward_func"}, tokens,
            {"fn": "tests.rl.test_trl_rewards:record_state"}]},
        {"name": "boxed", "type": "jsonl", "eval_size": 4, "args": {"path": boxed}, "rewards": [
            {"fn": "tests.trl_docs.logging_extra:reward_func", "name": "boxed_answer"},
            {"fn": "tests.trl_docs.async_io:async_reward_func", "weight": 0.5}, tokens,
            {"name": "sevens"}]},  # a registered per-sample reward beside them
    ]
    raw["stages"] = [{"domains": ["chat", "boxed"], "steps": 2}]
    raw["rollout"] = {"prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6}
    raw["grpo"] = {"micro_batch_size": 8}
    raw["eval"] = {"before_first_stage": False}
    raw["logging"] = {"dump_rollouts": True}
    return raw


def read_rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_trl_reward_functions_train_a_grpo_stage(tmp_path, tiny_model_dir, capsys):
    STATES.clear()
    out = tmp_path / "grpo"
    result = run_curriculum(load_config(raw=trl_raw(tmp_path, tiny_model_dir, out)))
    steps = [r for r in read_rows(out / "metrics.jsonl") if "stage_step" in r]
    assert len(steps) == 2
    for r in steps:
        for name in ("format_reward_func", "tokens", "boxed_answer", "async_reward_func", "sevens"):
            assert f"reward/{name}" in r and f"reward/{name}_std" in r, (name, sorted(r))
        assert "reward/record_state" not in r  # None everywhere: no mean to log
        assert r["reward/format_reward_func"] == 0.0  # a random model writes no <think> ... </think>
        # TRL's token-count example, over every row of both domains: the completions' token count
        assert r["reward/tokens"] == pytest.approx(r["completion_len_mean"])
        assert 0.0 <= r["accuracy"] <= 1.0  # what TRL's logging example logged with log_metric
    # trainer_state: the stage's steps done and its length, at every call of the stage (and no call at
    # held-out evaluation, which scores the domains' own metric, exact, alone)
    assert sorted(set(STATES)) == [(0, 2), (1, 2)]
    assert [len(row) for row in result["matrix"]] == [2]
    # log_extra's columns reach rollouts.jsonl, on the rows of the domain whose function logged them
    rollouts = read_rows(out / "rollouts.jsonl")
    boxed = [r for r in rollouts if r["domain"] == "boxed"]
    assert boxed and all(r["extra"]["golden_answer"] == r["prompt"][len("Write \\boxed{"):-2] for r in boxed)
    assert all("extra" not in r for r in rollouts if r["domain"] == "chat")
    # a stage that samples two domains logs each one's mean reward (with replay: the stage's own domain
    # apart from the replayed ones), from the same rows as rollouts.jsonl
    for r in steps:
        for dom in ("boxed", "chat"):
            rewards = [x["reward"] for x in rollouts if x["domain"] == dom and x["step"] == r["stage_step"]]
            assert rewards and r[f"domain_reward/{dom}"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
    # and the progress line shows them beside the step's mixed reward
    lines = [x for x in capsys.readouterr().out.splitlines() if "(grpo) " in x]
    assert len(lines) == len(steps)
    for line, r in zip(lines, steps):
        assert f"reward {r['reward']:.3g}  chat reward {r['domain_reward/chat']:.3g}  " \
               f"boxed reward {r['domain_reward/boxed']:.3g}  loss" in line, line  # the stage's order


def test_a_replay_stage_reports_its_own_domains_reward(tmp_path, tiny_model_dir):
    """Half of stage 2's prompts replay stage 1's domain: its `reward` mixes both, so its curve (the
    report's plot and stage table) and `own_reward` are its own domain's rows alone."""
    out = tmp_path / "replay"
    raw = trl_raw(tmp_path, tiny_model_dir, out)
    raw["stages"] = [{"domains": ["boxed"], "steps": 1}, {"domains": ["chat"], "steps": 2, "replay": 0.5}]
    run_curriculum(load_config(raw=raw))
    rows = [r for r in read_rows(out / "metrics.jsonl") if "stage_step" in r]
    rollouts = read_rows(out / "rollouts.jsonl")
    first, second = [r for r in rows if r["stage"] == 1], [r for r in rows if r["stage"] == 2]
    assert len(first) == 1 and len(second) == 2
    assert "own_reward" not in first[0]  # nothing replayed: the reward is the stage's own
    for r in second:
        chat = [x["reward"] for x in rollouts if (x["stage"], x["step"], x["domain"]) == (2, r["stage_step"], "chat")]
        boxed = [x["reward"] for x in rollouts if (x["stage"], x["step"], x["domain"]) == (2, r["stage_step"], "boxed")]
        assert len(chat) == len(boxed) == 8  # 2 of the 4 prompts replayed, 4 completions each
        assert r["own_reward"] == pytest.approx(sum(chat) / 8, abs=1e-6)
        assert r["reward"] == pytest.approx((sum(chat) + sum(boxed)) / 16, abs=1e-6)
    assert any(r["own_reward"] != pytest.approx(r["reward"]) for r in second)  # else the curve test says nothing
    curves = json.loads((out / "curriculum.json").read_text())["stage_results"]
    assert curves["1"]["curve"] == pytest.approx([first[0]["reward"]])
    assert curves["2"]["curve"] == pytest.approx([r["own_reward"] for r in second])


def test_trl_reward_functions_train_an_rft_stage(tmp_path, tiny_model_dir):
    """keep: pass reads the domain's own metric (add: last_number), scored beside a TRL function."""
    out = tmp_path / "rft"
    raw = tiny_raw(tiny_model_dir, out, stages=1, steps=1)
    raw["domains"] = [{"name": "add", "eval_size": 4, "args": {"lo": 1, "hi": 9},
                       "rewards": [{"fn": "tests.trl_docs.char_length:reward_func", "name": "chars"}]}]
    raw["stages"] = [{"kind": "rft", "domains": ["add"], "steps": 1}]
    raw["rft"] = {"keep": "pass", "micro_batch_size": 8}
    raw["eval"] = {"before_first_stage": False}
    run_curriculum(load_config(raw=raw))
    (row,) = [r for r in read_rows(out / "metrics.jsonl") if "keep_rate" in r]
    assert row["reward/chars"] == pytest.approx(row["reward"])  # the only reward, weight 1
    assert row["reward/chars"] > 0
    assert not any(k.startswith("domain_reward/") for k in row)  # one domain: its reward is `reward`


def test_a_failing_function_stops_the_run_with_one_line_naming_it(tmp_path, tiny_model_dir):
    raw = tiny_raw(tiny_model_dir, tmp_path / "broken", stages=1, steps=1)
    raw["domains"][0]["rewards"] = [{"name": "sevens"}, {"fn": "tests.rl.test_trl_rewards:broken"}]
    raw["eval"] = {"before_first_stage": False}
    with pytest.raises(RewardError, match=r"^reward function broken \(domain add\) raised ZeroDivisionError: float "
                                          r"division by zero$"):
        run_curriculum(load_config(raw=raw))


def test_a_function_that_cannot_be_imported_fails_before_any_model_loads(tmp_path):
    raw = tiny_raw(tmp_path / "no_model_here", tmp_path / "x", stages=1, steps=1)
    raw["domains"][0]["rewards"] = [{"fn": "tests.trl_docs.token_length:reward_fnuc"}]
    with pytest.raises(ConfigError, match=r"^domains\.0\.rewards\.0\.fn: cannot load reward function "
                                          r"'tests.trl_docs.token_length:reward_fnuc' \(AttributeError: "):
        run_curriculum(load_config(raw=raw))

"""The rft stage kind: which episodes are kept, and a tiny model whose held-out accuracy rises
through rejection-sampling fine-tuning alone; its configuration errors name the field."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from stagewise.config import load_config
from stagewise.continual.curriculum import run_curriculum
from stagewise.continual.preflight import build_domains, check_config
from stagewise.errors import ConfigError
from stagewise.rl.rft import kept_rows
from tests.helpers import tiny_raw


def test_kept_rows_pass_and_best_of_group():
    rewards = torch.tensor([0.1, 0.9, 0.9, 0.2, 0.0, 0.3, 0.1, 0.2])
    passed = torch.tensor([False, True, True, False, False, False, False, True])
    assert kept_rows(rewards, passed, 4, "pass", 0.5).tolist() == passed.tolist()
    # the first best row of each group, only where it reaches min_reward
    assert kept_rows(rewards, passed, 4, "best", 0.5).tolist() == [False, True, False, False] + [False] * 4
    assert kept_rows(rewards, passed, 4, "best", 0.25).tolist() == [False, True, False, False,
                                                                    False, True, False, False]


def test_episodes_cut_off_by_a_limit_are_never_kept():
    from types import SimpleNamespace

    from stagewise.rl.rft import unfinished_rows

    rewards = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.0, 0.3, 0.1, 0.2])
    passed = torch.tensor([False, True, False, False, False, False, False, True])
    truncated = torch.tensor([False, True, False, False, True, True, True, True])
    env, single = SimpleNamespace(environment=object()), SimpleNamespace(environment=None)
    unfinished = unfinished_rows([(env, {}), (env, {})], 4, truncated)
    assert unfinished.tolist() == truncated.tolist()
    # the best row was cut off: the group's best among the others; a group all cut off keeps nothing
    assert kept_rows(rewards, passed, 4, "best", 0.25, unfinished).tolist() == [False, False, True, False] + [False] * 4
    assert kept_rows(rewards, passed, 4, "pass", 0.5, unfinished).tolist() == [False] * 8
    # a single-turn completion cut at max_new_tokens is its answer: still kept
    assert not unfinished_rows([(single, {}), (env, {})], 4, truncated)[:4].any()


def test_kept_episodes_then_demonstrations_fill_the_micro_batches_and_placeholders_the_rest():
    from stagewise.rl.rft import kept_episodes, learn_micro_batches
    from stagewise.rl.rollout import RolloutBatch

    B, P, C = 8, 5, 6
    ones = torch.ones(B, C, dtype=torch.long)
    policy = ones.clone()
    policy[:, :2] = 0  # the first two tokens after the prompt came from the environment
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[4, :2] = 0  # a shorter prompt, left-padded
    batch = RolloutBatch(prompt_ids=torch.arange(B * P).view(B, P), prompt_mask=prompt_mask,
                         completion_ids=torch.arange(B * C).view(B, C), completion_mask=ones, policy_mask=policy,
                         truncated=torch.zeros(B, dtype=torch.bool), rewards=torch.zeros(B))
    keep = torch.tensor([False, True, False, False, True, True, False, False])
    kept = kept_episodes(batch, keep)
    assert [len(p) for p, _, _ in kept] == [5, 3, 5] and kept[1][0] == [22, 23, 24]
    demo = ([100, 101], [102, 103, 104], [1, 0, 1])  # a demonstration: its assistant tokens learnt
    mbs = learn_micro_batches(batch, kept + [demo], micro=2, accumulation=4, pad_id=-1)
    assert len(mbs) == 4
    assert [mb.prompt_ids[:, -1].tolist() for mb in mbs[:2]] == [[9, 24], [29, 101]]  # rows 1, 4, 5, the demo
    assert mbs[0].prompt_mask[1].tolist() == [0, 0, 1, 1, 1]
    assert mbs[1].loss_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0]]
    assert mbs[1].completion_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert mbs[1].completion_ids[1, :3].tolist() == [102, 103, 104]
    for mb in mbs[2:]:  # placeholders: one row, a one-token prompt and completion, nothing learnt
        assert mb.prompt_ids.shape == mb.completion_ids.shape == (1, 1) and mb.loss_mask.sum() == 0
    with pytest.raises(ValueError, match="do not fit"):
        learn_micro_batches(batch, kept + [demo] * 6, micro=2, accumulation=4, pad_id=-1)


def sevens_demos(tmp_path) -> dict:
    """A domain of demonstrations: the prompts' answers, 7s only."""
    path = tmp_path / "sevens.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say seven {i} times.", "answer": "7" * 6}) + "\n"
                            for i in range(1, 13)))
    return {"name": "demos", "type": "jsonl", "eval_size": 2, "args": {"path": str(path)}}


def rft_raw(tiny_model_dir, out, steps: int) -> dict:
    raw = tiny_raw(tiny_model_dir, out, stages=1, steps=steps)
    raw["domains"] = [{"name": "seven", "type": "say_seven", "eval_size": 6}]
    raw["stages"][0].update(kind="rft", domains=["seven"])
    raw["rft"] = {"keep": "best", "min_reward": 0.1, "micro_batch_size": 8}
    raw["rollout"] = {"prompts_per_step": 4, "num_generations": 8, "max_new_tokens": 4}
    raw["optim"] = {"lr": 1e-2, "warmup_steps": 0}
    return raw


def test_rft_raises_held_out_accuracy_of_a_tiny_model(tmp_path, tiny_model_dir):
    """Reward: the share of 7s in the completion; accuracy: held-out answers that are all 7s (greedy).
    Learning each group's best sample makes 7 the model's most likely character."""
    out = tmp_path / "rft"
    raw = rft_raw(tiny_model_dir, out, steps=30)
    # 16 samples a group: with 8, whether a '7' is sampled early enough to be learnt was luck (seed 0
    # learnt nothing once the tasks' order changed; with 16 seeds 0-5 all reach accuracy 1.0)
    raw["rollout"]["num_generations"] = 16
    rows = run_curriculum(load_config(raw=raw))["matrix"]
    before, after = rows[0][0], rows[1][0]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "keep_rate" in r]
    assert len(rounds) == 30 and all(r["keep_rate"] <= 4 / 64 for r in rounds)  # at most one per group
    assert all(r["loss"] == 0 and r["kept_tokens"] == 0 for r in rounds if r["kept"] == 0)  # no step
    assert rounds[-1]["reward"] > rounds[0]["reward"] + 0.2, [r["reward"] for r in rounds]
    assert after >= before + 0.5, (before, after)


def test_rft_configuration_errors(tmp_path, tiny_model_dir):
    raw = rft_raw(tiny_model_dir, tmp_path / "x", steps=1)
    raw["rft"]["micro_batch_size"] = 5
    with pytest.raises(ConfigError, match="rft.micro_batch_size=5 must divide the 32 episodes"):
        check_config(load_config(raw=raw), 1)
    raw = rft_raw(tiny_model_dir, tmp_path / "x", steps=1)
    raw["stages"][0] = {"kind": "rft", "domains": ["seven"], "epochs": 1}
    with pytest.raises(ConfigError, match="give steps or tasks_per_domain, not epochs"):
        check_config(load_config(raw=raw), 1)
    raw = rft_raw(tiny_model_dir, tmp_path / "x", steps=1)
    raw["rft"].update(demos=["demos"], demos_per_step=3)
    raw["domains"].append(sevens_demos(tmp_path))
    check_config(load_config(raw=raw), 1)
    with pytest.raises(ConfigError, match="rft.demos_per_step=3 must be divisible by the 2 processes"):
        check_config(load_config(raw=raw), 2)
    raw["domains"].append({"name": "chat_free", "type": "ascii_chat", "eval_size": 4})
    raw["rft"].update(demos=["chat_free"], demos_per_step=4)
    with pytest.raises(ConfigError, match="rft.demos domain 'chat_free' is an environment"):
        build_domains(load_config(raw=raw))
    raw["rft"].update(demos=["nowhere"])
    with pytest.raises(ConfigError, match="rft.demos names 'nowhere', which is not a domain"):
        build_domains(load_config(raw=raw))
    raw["rft"].update(demos_per_step=0)
    with pytest.raises(ConfigError, match="give both rft.demos and rft.demos_per_step"):
        load_config(raw=raw)
    raw = rft_raw(tiny_model_dir, tmp_path / "x", steps=1)
    raw["domains"].append({"name": "chat_free", "type": "ascii_chat", "eval_size": 4})
    raw["stages"][0] = {"kind": "rft", "domains": ["chat_free"], "steps": 1, "rft": {"keep": "pass"}}
    cfg = load_config(raw=raw)
    check_config(cfg, 1)
    with pytest.raises(ConfigError, match="rft.keep=pass needs domain chat_free to have an accuracy metric"):
        build_domains(cfg)


def test_a_round_that_keeps_nothing_still_learns_its_demonstrations(tmp_path, tiny_chat_dir):
    """No episode reaches min_reward 2; the demonstrations (answers of 7s) alone raise the accuracy."""
    out = tmp_path / "demos"
    raw = rft_raw(tiny_chat_dir, out, steps=12)
    raw["domains"].append(sevens_demos(tmp_path))
    raw["rft"].update(min_reward=2.0, demos=["demos"], demos_per_step=4)
    rows = run_curriculum(load_config(raw=raw))["matrix"]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "keep_rate" in r]
    assert all(r["kept"] == 0 and r["kept_tokens"] == 0 for r in rounds)
    assert all(r["demo_tokens"] > 0 and r["loss"] > 0 for r in rounds)
    assert rows[1][0] >= rows[0][0] + 0.5, (rows[0][0], rows[1][0])


def test_rft_weights_do_not_depend_on_micro_batch_or_processes(tmp_path, tiny_chat_dir):
    """The NLL is normalised by the learnt tokens (kept episodes and demonstrations) of every
    process: 32 episodes and 4 demonstrations per round as 5 x 8, 9 x 4 (1 process) and 2 processes
    x 3 x 8 train the same weights (fp32, to 1% of the update)."""
    from tests.helpers import load_weights
    from tests.parallel.test_multiprocess import launch
    from tests.rl.test_invariance import assert_within, largest_update

    def config(name: str, micro: int):
        raw = rft_raw(tiny_chat_dir, tmp_path / name, steps=3)
        raw["rft"].update(micro_batch_size=micro, min_reward=0.0, demos=["demos"], demos_per_step=4)  # keeps
        raw["domains"].append(sevens_demos(tmp_path))
        raw["dist"] = {"mixed_precision": "no", "cpu": True}
        raw["eval"]["before_first_stage"] = False
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    run_curriculum(load_config(config("m8", 8)))
    run_curriculum(load_config(config("m4", 4)))
    launch(config("ddp", 8), "ddp")
    finals = {name: load_weights(tmp_path / name / "final_model") for name in ("m8", "m4", "ddp")}
    tolerance = 0.01 * largest_update(finals["m8"], load_weights(tiny_chat_dir))
    assert tolerance > 1e-6
    assert_within(finals["m8"], finals["m4"], tolerance)
    assert_within(finals["m8"], finals["ddp"], tolerance)

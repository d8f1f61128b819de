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


def test_only_kept_rows_are_computed_and_every_process_runs_its_micro_batches():
    from stagewise.rl.rft import kept_micro_batches
    from stagewise.rl.rollout import RolloutBatch

    B, P, C = 8, 5, 6
    ones = torch.ones(B, C, dtype=torch.long)
    batch = RolloutBatch(prompt_ids=torch.arange(B * P).view(B, P), prompt_mask=torch.ones(B, P, dtype=torch.long),
                         completion_ids=torch.arange(B * C).view(B, C), completion_mask=ones, policy_mask=ones,
                         truncated=torch.zeros(B, dtype=torch.bool), rewards=torch.zeros(B))
    keep = torch.tensor([False, True, False, False, True, True, False, False])
    batch.loss_mask = batch.completion_mask * keep[:, None].float()
    mbs = kept_micro_batches(batch, keep, micro=2, accumulation=4)
    assert len(mbs) == 4
    assert [mb.prompt_ids[:, 0].tolist() for mb in mbs[:2]] == [[5, 20], [25]]  # rows 1, 4, then 5
    assert all(mb.loss_mask.sum() == mb.completion_mask.sum() for mb in mbs[:2])
    for mb in mbs[2:]:  # placeholders: one row, a one-token prompt and completion, nothing learnt
        assert mb.prompt_ids.shape == mb.completion_ids.shape == (1, 1) and mb.loss_mask.sum() == 0


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
    rows = run_curriculum(load_config(raw=rft_raw(tiny_model_dir, out, steps=30)))["matrix"]
    before, after = rows[0][0], rows[1][0]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "keep_rate" in r]
    assert len(rounds) == 30 and all(r["keep_rate"] <= 4 / 32 for r in rounds)  # at most one per group
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
    raw["domains"].append({"name": "chat_free", "type": "ascii_chat", "eval_size": 4})
    raw["stages"][0] = {"kind": "rft", "domains": ["chat_free"], "steps": 1, "rft": {"keep": "pass"}}
    cfg = load_config(raw=raw)
    check_config(cfg, 1)
    with pytest.raises(ConfigError, match="rft.keep=pass needs domain chat_free to have an accuracy metric"):
        build_domains(cfg)


def test_rft_weights_do_not_depend_on_micro_batch_or_processes(tmp_path, tiny_model_dir):
    """The NLL is normalised by the kept tokens of every process: 32 episodes per round as 4 x 8,
    8 x 4 (1 process) and 2 processes x 2 x 8 train the same weights (fp32, to 1% of the update)."""
    from tests.helpers import load_weights
    from tests.parallel.test_multiprocess import launch
    from tests.rl.test_invariance import assert_within, largest_update

    def config(name: str, micro: int):
        raw = rft_raw(tiny_model_dir, tmp_path / name, steps=3)
        raw["rft"].update(micro_batch_size=micro, min_reward=0.0)  # every round keeps (and steps)
        raw["dist"] = {"mixed_precision": "no", "cpu": True}
        raw["eval"]["before_first_stage"] = False
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    run_curriculum(load_config(config("m8", 8)))
    run_curriculum(load_config(config("m4", 4)))
    launch(config("ddp", 8), "ddp")
    finals = {name: load_weights(tmp_path / name / "final_model") for name in ("m8", "m4", "ddp")}
    tolerance = 0.01 * largest_update(finals["m8"], load_weights(tiny_model_dir))
    assert tolerance > 1e-6
    assert_within(finals["m8"], finals["m4"], tolerance)
    assert_within(finals["m8"], finals["ddp"], tolerance)

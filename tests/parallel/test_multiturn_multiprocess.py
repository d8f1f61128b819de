"""Multi-turn GRPO on 2 processes (DDP, gloo) equals 1 process: episodes with a simulated user
(tests/plugins.py) are a pure function of (seed, stage, step, episode), whichever process runs them."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import tiny_raw
from tests.parallel.test_multiprocess import assert_same_weights, in_process, launch, rollouts_of, steps_of

pytestmark = pytest.mark.slow


def write(tmp, model_dir, name, turns=3):
    raw = tiny_raw(model_dir, tmp / name, stages=1, steps=3)
    raw["domains"] = [{"name": "chat", "type": "ascii_chat", "eval_size": 4, "args": {"turns": turns}}]
    raw["stages"] = [{"domains": ["chat"], "steps": 3}]
    raw["rollout"] = {"engine": "short_turns", "max_new_tokens": 4, "max_turns": 3, "max_episode_tokens": 96,
                      "prompts_per_step": 4, "num_generations": 4}  # 2 groups per process with 2 processes
    raw["grpo"] = {"micro_batch_size": 4}  # 16 rows: 1 process x 4 micro-batches, 2 processes x 2
    raw["optim"] = {"lr": 1e-3, "warmup_steps": 0}
    raw["eval"]["before_first_stage"] = False
    raw["logging"] = {"dump_rollouts": True}
    raw["dist"] = {"mixed_precision": "no"}  # compares arithmetic
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_two_process_ddp_multi_turn_equals_one_process(tmp_path, tiny_chat_dir):
    in_process(write(tmp_path, tiny_chat_dir, "single"))
    launch(write(tmp_path, tiny_chat_dir, "ddp"), "ddp")
    one, two = rollouts_of(tmp_path / "single"), rollouts_of(tmp_path / "ddp")
    assert [(r["completion"], r["reward"]) for r in one] == [(r["completion"], r["reward"]) for r in two]
    assert all(r["completion"].count("[user] More ") == 2 for r in one)  # three turns each
    s1, s2 = steps_of(tmp_path / "single"), steps_of(tmp_path / "ddp")
    for a, b in zip(s1, s2):
        assert a["episode/turns"] == b["episode/turns"] == 3.0
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_same_weights(tmp_path / "single", tmp_path / "ddp", atol=2e-5)


def test_zero3_multi_turn_with_uneven_turns_stays_in_step(tmp_path, tiny_chat_dir):
    """Under ZeRO-3 every rank must run the same forward passes while generating. Episodes of 1-3 turns
    end at different turns on the two ranks: the rank that is done joins the others' turns with empty
    batches. It must neither hang nor change what is computed."""
    in_process(write(tmp_path, tiny_chat_dir, "single", turns="varied"))
    launch(write(tmp_path, tiny_chat_dir, "zero3", turns="varied"), "zero3", timeout=300)
    one, three = rollouts_of(tmp_path / "single"), rollouts_of(tmp_path / "zero3")
    assert [(r["completion"], r["reward"]) for r in one] == [(r["completion"], r["reward"]) for r in three]
    turns = {r["completion"].count("[user] More ") for r in one}
    assert turns == {0, 1, 2}  # 1, 2 and 3 policy turns all occur
    # and on some step one rank's longest episode is shorter than the other's (rows: rank 0's 8, then rank 1's 8)
    longest = [[max(r["completion"].count("[user] More ") for r in three[s + h:s + h + 8]) for h in (0, 8)]
               for s in range(0, len(three), 16)]
    assert any(a != b for a, b in longest), longest
    assert_same_weights(tmp_path / "single", tmp_path / "zero3", atol=2e-5)

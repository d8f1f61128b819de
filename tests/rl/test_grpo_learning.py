"""Real learning on the tiny random model: GRPO must raise a reward it can reach."""

import json

from stagewise.continual.curriculum import run_curriculum

from tests.helpers import tiny_config


def rewards(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["reward"] for r in rows if "reward" in r]


def test_grpo_learns_to_emit_sevens(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "learn", stages=1, steps=25, overrides=[
        "optim.lr=1e-2", "optim.schedule=constant", "rollout.prompts_per_step=4", "rollout.num_generations=8",
        "rollout.max_new_tokens=8", "grpo.micro_batch_size=16", "eval.before_first_stage=false"])
    run_curriculum(cfg)
    r = rewards(tmp_path / "learn")
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    print("reward curve:", [round(x, 3) for x in r])
    assert first < 0.1  # a random model rarely says 7
    assert last > 0.4 and last > 4 * first

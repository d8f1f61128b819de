"""Real learning on the tiny random model: GRPO must raise a reward it can reach."""

import json

import pytest
import torch

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


def test_kl_to_reference_grows_from_zero(tiny_model_dir, tmp_path):
    """beta > 0 loads the reference; at step 1 the policy equals it (KL 0), afterwards KL > 0."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "kl", stages=1, steps=3, overrides=[
        "grpo.beta=0.1", "optim.lr=1e-2", "optim.warmup_steps=0", "eval.before_first_stage=false"])
    run_curriculum(cfg)
    rows = [json.loads(x) for x in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert abs(kls[0]) < 1e-6 and kls[-1] > 1e-4


def test_lora_with_kl_uses_adapters_off_as_reference(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "lora", stages=1, steps=3, overrides=[
        "model.lora={r: 4, alpha: 8}", "grpo.beta=0.1", "optim.lr=5e-2", "optim.warmup_steps=0",
        "eval.before_first_stage=false"])
    run_curriculum(cfg)
    rows = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert abs(kls[0]) < 1e-6 and kls[-1] > 0
    # the export is a merged plain model (no adapter files), and it differs from the base
    from tests.helpers import load_weights

    final, base = load_weights(tmp_path / "lora" / "final_model"), load_weights(tiny_model_dir)
    assert set(final) == set(base)
    assert any(not torch.equal(final[k], base[k]) for k in base)


def test_lora_reference_base_holds_from_stage_two(tiny_model_dir, tmp_path):
    """With LoRA, stage 2 starts from stage 1's merged export, so 'adapters off' is that export, not
    the base model. grpo.reference=base must still anchor the KL to the base weights: at stage 2's
    first step the policy equals its starting weights, so KL is 0 against previous_stage and > 0
    against base."""
    first_kl = {}
    for reference in ("base", "previous_stage"):
        out = tmp_path / reference
        run_curriculum(tiny_config(tiny_model_dir, out, stages=2, steps=2, overrides=[
            "model.lora={r: 4, alpha: 8}", "grpo.beta=0.1", f"grpo.reference={reference}", "optim.lr=5e-2",
            "optim.warmup_steps=0", "eval.before_first_stage=false"]))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        first_kl[reference] = next(r["kl"] for r in rows if r.get("stage") == 2 and "kl" in r)
        assert next(r["kl"] for r in rows if r.get("stage") == 1 and "kl" in r) == pytest.approx(0, abs=1e-6)
    assert first_kl["previous_stage"] == pytest.approx(0, abs=1e-6)
    assert first_kl["base"] > 1e-4, first_kl

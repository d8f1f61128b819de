"""Micro-batch x accumulation invariance: 8x1, 4x2 and 2x4 (rows per micro-batch x accumulation
steps) train to the same weights — the loss normalisers are global, not per micro-batch.

These compare arithmetic, so they run fp32 on the CPU (dist.mixed_precision=no, dist.cpu=true):
under bf16 autocast a micro-batch of 2 rows (groups split: the rows' common opening shared) and of
8 (each group's prompt shared) round differently, which would hide a real scaling bug behind a loose tolerance.

Even in fp32 another order of computation rounds differently, and by how much depends on the CPU's
kernels (gradient checkpointing on vs off: weights 3.3e-6 apart after 2 steps on one machine of this
kind, for updates of 1.7e-3). So weights must agree to 1% of the largest update the run made: a
scaling bug (a micro-batch or a process weighted twice) moves them by the order of the update itself."""

import json

import pytest

from stagewise.continual.curriculum import run_curriculum
from tests.helpers import load_weights, tiny_config


@pytest.mark.parametrize("loss", ["dapo", "grpo", "dr_grpo"])
def test_micro_batch_times_accumulation_invariance(tiny_model_dir, tmp_path, loss):
    finals, losses = [], []
    for micro in (8, 4, 2):  # 2 prompts x G 4 = 8 rows: gas 1, 2, 4 (2 splits groups: common opening shared)
        out = tmp_path / f"m{micro}"
        cfg = tiny_config(tiny_model_dir, out, stages=1, steps=3, overrides=[
            f"grpo.micro_batch_size={micro}", f"grpo.loss={loss}", "eval.before_first_stage=false",
            "dist.mixed_precision=no", "dist.cpu=true",
            "grpo.epsilon=0.1", "grpo.num_iterations=2"])  # 2 iterations: ratios != 1, clipping active
        run_curriculum(cfg)
        finals.append(load_weights(out / "final_model"))
        rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        losses.append([r["loss"] for r in rows if "loss" in r])
    base = load_weights(tiny_model_dir)
    tolerance = 0.01 * largest_update(finals[0], base)
    assert tolerance > 1e-6  # the run trained: equality is not the trivial "nothing moved"
    for other, other_loss in zip(finals[1:], losses[1:]):
        assert other_loss == pytest.approx(losses[0], abs=1e-6)
        assert_within(finals[0], other, tolerance)


def test_shared_prefix_trains_the_same_as_the_plain_forward(tiny_model_dir, tmp_path):
    """grpo.shared_prefix on (the default) and off: the same losses and weights (fp32)."""
    finals, losses = [], []
    for shared in ("true", "false"):
        out = tmp_path / f"shared_{shared}"
        run_curriculum(tiny_config(tiny_model_dir, out, stages=1, steps=2, overrides=[
            f"grpo.shared_prefix={shared}", "eval.before_first_stage=false", "dist.mixed_precision=no",
            "dist.cpu=true", "grpo.num_iterations=2", "grpo.beta=0.05"]))  # old and reference log-probs too
        finals.append(load_weights(out / "final_model"))
        losses.append([r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                       if "loss" in r])
    tolerance = 0.01 * largest_update(finals[0], load_weights(tiny_model_dir))
    assert tolerance > 1e-6
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert_within(finals[0], finals[1], tolerance)


def test_gradient_checkpointing_trains_the_same(tiny_model_dir, tmp_path):
    finals = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc{checkpointing}"
        run_curriculum(tiny_config(tiny_model_dir, out, stages=1, steps=2, overrides=[
            f"model.gradient_checkpointing={str(checkpointing).lower()}", "eval.before_first_stage=false",
            "dist.mixed_precision=no", "dist.cpu=true"]))
        finals.append(load_weights(out / "final_model"))
    tolerance = 0.01 * largest_update(finals[0], load_weights(tiny_model_dir))
    assert tolerance > 1e-6
    assert_within(finals[0], finals[1], tolerance)


def largest_update(final: dict, base: dict) -> float:
    return max((final[k] - base[k]).abs().max().item() for k in base)


def assert_within(a: dict, b: dict, atol: float) -> None:
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights {worst:.2e} apart, allowed {atol:.2e} (1% of the largest update)"

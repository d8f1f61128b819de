"""Micro-batch x accumulation invariance: 8x1, 4x2 and 2x4 (rows per micro-batch x accumulation
steps) train to the same weights — the loss normalisers are global, not per micro-batch.

These compare arithmetic, so they run fp32 (dist.mixed_precision=no): under bf16 autocast a
micro-batch of 2 rows (groups split, plain forward) and of 8 (shared-prompt forward) round
differently, which would hide a real scaling bug behind a loose tolerance."""

import json

import pytest
import torch

from stagewise.continual.curriculum import run_curriculum

from tests.helpers import load_weights, tiny_config


@pytest.mark.parametrize("loss", ["dapo", "grpo", "dr_grpo"])
def test_micro_batch_times_accumulation_invariance(tiny_model_dir, tmp_path, loss):
    finals, losses = [], []
    for micro in (8, 4, 2):  # 2 prompts x G 4 = 8 rows: gas 1, 2, 4 (2 splits groups: plain path)
        out = tmp_path / f"m{micro}"
        cfg = tiny_config(tiny_model_dir, out, stages=1, steps=3, overrides=[
            f"grpo.micro_batch_size={micro}", f"grpo.loss={loss}", "eval.before_first_stage=false",
            "dist.mixed_precision=no",
            "grpo.epsilon=0.1", "grpo.num_iterations=2"])  # 2 iterations: ratios != 1, clipping active
        run_curriculum(cfg)
        finals.append(load_weights(out / "final_model"))
        losses.append([r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r])
    for other, other_loss in zip(finals[1:], losses[1:]):
        assert other_loss == pytest.approx(losses[0], abs=1e-6)
        for k in finals[0]:
            assert torch.allclose(finals[0][k], other[k], atol=1e-6, rtol=0), k
    base = load_weights(tiny_model_dir)
    assert any(not torch.equal(finals[0][k], base[k]) for k in base)


def test_gradient_checkpointing_trains_the_same(tiny_model_dir, tmp_path):
    finals = []
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        run_curriculum(tiny_config(tiny_model_dir, out, stages=1, steps=2, overrides=[
            f"model.gradient_checkpointing={str(gc).lower()}", "eval.before_first_stage=false",
            "dist.mixed_precision=no"]))
        finals.append(load_weights(out / "final_model"))
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], atol=1e-6, rtol=0), k

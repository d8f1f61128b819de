import pytest
import torch

from stagewise.registry import lookup
from stagewise.rl import advantages  # noqa: F401
from stagewise.rl.advantages import zero_variance_groups

R = torch.tensor([1.0, 0.0, 0.0, 1.0,   # group 0: mean .5, unbiased std sqrt(1/3)
                  2.0, 2.0, 2.0, 2.0])  # group 1: zero variance


def test_grpo_hand_computed():
    adv, stats = lookup("advantage", "grpo")(R, 4)
    s = (1 / 3) ** 0.5
    expected = torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert stats["frac_zero_variance_groups"] == 0.5


def test_dr_grpo_is_mean_centred_only():
    adv, _ = lookup("advantage", "dr_grpo")(R, 4)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_batch_std_uses_whole_batch_std():
    adv, _ = lookup("advantage", "batch_std")(R, 4)
    batch_std = R.std().item()  # values: four 0/1 and four 2 -> mean 1.25
    assert abs(batch_std - 0.8864052604279183) < 1e-6
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (batch_std + 1e-4), atol=1e-6)


def test_zero_variance_mask_and_bad_group_size():
    assert zero_variance_groups(R, 4).tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError):
        lookup("advantage", "grpo")(R, 3)

"""Advantage estimators: pure functions of rewards laid out as contiguous groups.

All take rewards (B,) with B = num_groups * G (group g = rows g*G .. g*G+G-1) and return
(advantages (B,), stats). They must see every row of a group, so the GRPO loop gathers rewards
across processes before calling them.
"""

from __future__ import annotations

import torch

EPS = 1e-4  # as TRL: keeps (r - mean) / (std + eps) finite for zero-variance groups


def grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B // G, G); raises if B is not a multiple of G."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: True for every row of a group whose rewards are all equal (no learning signal)."""
    g = grouped(rewards, group_size)
    flat = (g.max(dim=1).values - g.min(dim=1).values) < 1e-8
    return flat.repeat_interleave(group_size)


def _stats(rewards, group_size):
    zv = zero_variance_groups(rewards, group_size)
    return {"frac_zero_variance_groups": zv.float().mean().item()}


def grpo_advantages(rewards: torch.Tensor, group_size: int):
    """GRPO (Shao et al. 2024): (r - group mean) / (group std + eps); std is unbiased (as TRL)."""
    g = grouped(rewards.float(), group_size)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + EPS)
    return adv.reshape(-1), _stats(rewards, group_size)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int):
    """Dr. GRPO (Liu et al. 2025): r - group mean; no std division (removes difficulty bias)."""
    g = grouped(rewards.float(), group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1), _stats(rewards, group_size)


def batch_std_advantages(rewards: torch.Tensor, group_size: int):
    """(r - group mean) / (std of the whole batch + eps) (REINFORCE++-style scale; TRL 'batch')."""
    g = grouped(rewards.float(), group_size)
    centred = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    return centred / (rewards.float().std() + EPS), _stats(rewards, group_size)

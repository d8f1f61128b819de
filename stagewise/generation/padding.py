"""Token lists as padded tensors, and the positions of left-padded rows (shared by sampling,
rollouts and the training forward).

    ids, mask = left_pad([[1, 2, 3], [4, 5]], pad_id=0, device="cpu")   # (2, 3) each
    tail, tail_mask = right_pad([[7], [8, 9]], 0, "cpu")                 # [[7, 0], [8, 9]]
    positions = position_ids_from_mask(mask)                             # [[0, 1, 2], [0, 0, 1]]
"""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (N, P) left-padded with pad_id, mask (N, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list, value, device, dtype=torch.long, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of numbers -> values (N, W) right-padded with ``value``, mask (N, W) long;
    W = the longest list, at least ``min_width`` (a batch of empty completions keeps one column)."""
    width = max(max((len(s) for s in seqs), default=0), min_width)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, :len(s)] = torch.as_tensor(s, dtype=dtype)
            mask[i, :len(s)] = 1
    return out.to(device), mask.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 attention mask, left-padded -> (B, T) positions counting only real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)

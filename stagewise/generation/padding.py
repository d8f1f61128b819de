"""Token lists as padded tensors, and the positions of left-padded rows (shared by sampling,
rollouts and the training forward).

    ids, mask = left_pad([[1, 2, 3], [4, 5]], pad_id=0, device="cpu")   # (2, 3) each
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


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 attention mask, left-padded -> (B, T) positions counting only real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)

"""The collectives the loops and helpers use, each a no-op copy when there is one process.

    total = reduce_sum(torch.tensor([n_local]))      # sum over processes
    rows = gather_rows(torch.tensor(local_values))   # every rank's rows, concatenated in rank order
    barrier()

They need only torch.distributed (no Accelerator), so checkpoints, signals, evaluation and the
stage loops share them.
"""

from __future__ import annotations

import torch


def _world() -> int:
    import torch.distributed as td

    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def device() -> torch.device:
    """The device of this process (the run's process state must exist)."""
    from accelerate.state import PartialState

    return PartialState().device


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (a copy; the tensor itself when there is one process)."""
    import torch.distributed as td

    if _world() > 1:
        t = t.clone()
        td.all_reduce(t)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` (the same shape on every rank) concatenated along dim 0 in rank order."""
    import torch.distributed as td

    world = _world()
    if world == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    td.all_gather(parts, t)
    return torch.cat(parts)


def barrier() -> None:
    import torch.distributed as td

    if _world() > 1:
        td.barrier()

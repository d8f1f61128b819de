"""A step's statistics from every process in one collective.

    sums, rows = reduce_step_stats(device, sums={"loss": loss_sum, "tokens": n}, rows={"length": lengths})
    sums["loss"]       # a float: summed over processes
    rows["length"]     # a (world * B,) tensor: every process's rows, in rank order

Every rank passes the same names, in the same order, with the same row count (the loops keep
batches equal across ranks), so one all-gather of one flat vector carries them all: a step with
tau2's five reward parts and five episode statistics costs one collective for its metrics, not
twelve.
"""

from __future__ import annotations

import torch

from stagewise.parallel.collectives import gather_rows


def reduce_step_stats(device, *, sums: dict[str, torch.Tensor],
                      rows: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """sums: name -> scalar tensor, added up over processes; rows: name -> (B,) tensor, concatenated
    over processes. -> ({name: float}, {name: (world * B,) float32 tensor on the CPU})."""
    sum_names, row_names = list(sums), list(rows)
    n_rows = len(next(iter(rows.values()))) if rows else 0
    parts = [torch.stack([sums[k].detach().float().reshape(()).to(device) for k in sum_names])] if sums else []
    if rows:
        parts.append(torch.stack([rows[k].detach().float().to(device) for k in row_names], dim=1).flatten())
    if not parts:
        return {}, {}
    flat = torch.cat(parts)
    per_rank = gather_rows(flat).view(-1, flat.numel()).cpu()
    summed = per_rank[:, :len(sum_names)].sum(0)
    table = per_rank[:, len(sum_names):].reshape(-1, len(row_names)) if rows else None
    assert table is None or table.size(0) == per_rank.size(0) * n_rows
    return ({k: summed[i].item() for i, k in enumerate(sum_names)},
            {k: table[:, j].clone() for j, k in enumerate(row_names)})

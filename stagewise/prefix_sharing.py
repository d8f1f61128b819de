"""A training forward that computes a micro-batch's shared prefix once: agent conversations of one
domain all open with the same few thousand tokens (policy, tool schemas), and GRPO's groups share
their prompt. The transformer body runs on the prefix once (with gradients), its KV cache is
repeated for the rows, and every row's tail attends to it; autograd sums the rows' gradients into
the prefix, so values and gradients equal the plain forward's (within floating-point reassociation).

    ids, lengths, index = unpadded(prompt_ids, prompt_mask, completion_ids, completion_mask)
    hidden = shared_prefix_hidden(body, ids, lengths, index, group_size=G)   # (N, H) at `index`

Shapes: B rows, right-padded to T tokens (``lengths`` (B,) real tokens each, positions 0..len-1);
``index`` (N,) flat indices into B*T of the positions whose hidden states are wanted; H hidden.

The prefix is the longest one shared by all rows (one prefix row), or, when rows come in groups of
``group_size``, by the rows of each group (one prefix row per group), whichever costs fewer token
forwards. The body is called exactly twice whatever the data (the prefix, then the tails): under
ZeRO-3 and FSDP each call gathers the weights, so every rank calls it as often as the others.
"""

from __future__ import annotations

import torch


def common_prefix_length(ids: torch.Tensor, lengths: torch.Tensor, group_size: int = 0) -> int:
    """The longest L with ids[:, :L] equal within every group of ``group_size`` consecutive rows (all
    rows when 0), capped so that every row keeps at least one token after it. ids (B, T), lengths (B,)."""
    B, T = ids.shape
    G = group_size or B
    grouped = ids.view(B // G, G, T)
    same = (grouped == grouped[:, :1]).all(dim=1).all(dim=0)  # (T,)
    shared = int(same.int().cumprod(0).sum().item())
    return max(0, min(shared, int(lengths.min().item()) - 1))


def prefix_plan(ids: torch.Tensor, lengths: torch.Tensor, group_size: int = 1) -> tuple[int, int]:
    """(rows per prefix row G, prefix length L) of the cheaper sharing: one prefix for all rows, or
    one per group of ``group_size`` rows. (B, 1) when nothing is shared: every row then is its own
    one-token prefix."""
    B, T = ids.shape
    plans = [(B, common_prefix_length(ids, lengths))]
    if 1 < group_size < B and B % group_size == 0:
        plans.append((group_size, common_prefix_length(ids, lengths, group_size)))
    # token forwards: B/G prefix rows of L tokens, then B tails of T - L
    G, L = min(plans, key=lambda p: (B // p[0]) * p[1] + B * (T - p[1]))
    return (1, 1) if L == 0 else (G, L)


def shared_prefix_hidden(body, ids: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor,
                         group_size: int = 1) -> torch.Tensor:
    """The body's hidden states at the flat positions ``index`` (N,) of ids (B, T): (N, H).

    Equals ``body(ids, positions 0..)``'s last hidden state at those positions; the shared prefix
    (``prefix_plan``) runs once per prefix row and each row's tail attends to its repeated KV cache.
    """
    B, T = ids.shape
    G, L = prefix_plan(ids, lengths, group_size)
    P, tail_len, dev = B // G, T - L, ids.device
    out = body(input_ids=ids[::G, :L], position_ids=torch.arange(L, device=dev).expand(P, L), use_cache=True)
    cache = out.past_key_values
    if G > 1:
        cache.batch_repeat_interleave(G)
    tail_mask = torch.arange(tail_len, device=dev)[None, :] < (lengths.to(dev) - L)[:, None]
    mask = torch.cat([torch.ones(B, L, dtype=tail_mask.dtype, device=dev), tail_mask], dim=1).long()
    positions = (L + torch.arange(tail_len, device=dev)).expand(B, tail_len)
    tail = body(input_ids=ids[:, L:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True).last_hidden_state
    prefix = out.last_hidden_state
    H = prefix.size(-1)
    table = torch.cat([prefix.reshape(P * L, H), tail.reshape(B * tail_len, H).to(prefix.dtype)])
    row, col = index // T, index % T
    where = torch.where(col < L, (row // G) * L + col, P * L + row * tail_len + (col - L).clamp(min=0))
    return table.index_select(0, where)


def unpadded(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
             completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's left-padded prompts (B, P) and right-padded completions (B, C) as right-padded rows.

    -> ids (B, P + C) (each row's prompt then its completion, then padding), lengths (B,), and the
    flat index (N,) into (B, P + C) of the positions predicting each real completion token, in the
    order of ``completion_mask.nonzero()``.
    """
    mask = torch.cat([prompt_mask, completion_mask], dim=1).bool()
    order = torch.argsort((~mask).int(), dim=1, stable=True)  # real tokens first, in order
    ids = torch.cat([prompt_ids, completion_ids], dim=1).gather(1, order)
    lengths = mask.sum(1)
    B, C = completion_ids.shape
    T = ids.size(1)
    prompt_len = prompt_mask.sum(1)
    where = completion_mask.reshape(-1).nonzero().squeeze(1)
    row, j = where // C, where % C
    return ids, lengths, row * T + prompt_len[row] + j - 1

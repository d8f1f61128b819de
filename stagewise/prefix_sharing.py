"""A training forward that computes a micro-batch's shared prefix once: agent conversations of one
domain all open with the same few thousand tokens (policy, tool schemas), and GRPO's groups share
their prompt.

    use_prefix_tree(lm)                                        # once, on the trained model (sdpa attention)
    ids, lengths, index = unpadded(prompt_ids, prompt_mask, completion_ids, completion_mask)
    hidden = shared_prefix_hidden(body, ids, lengths, index)  # (N, H) at `index`

Shapes: B rows, right-padded to T tokens (``lengths`` (B,) real tokens each, positions 0..len-1);
``index`` (N,) flat indices into B*T of the positions whose hidden states are wanted; H hidden.

The rows are packed into one sequence without padding, a prefix tree of depth two: each shared
prefix once, then the rest ("tail") of each of its rows, every tail at the positions it has in its
own row (they restart after the prefix). One body call runs it (so ZeRO-3 / FSDP gather the weights
once, as for the plain forward, and gradient checkpointing works as usual); in every layer the
attention (``tree_attention_forward``) lets the prefix attend causally to itself and each tail to
its prefix and causally to itself, nothing else. Autograd sums every tail's gradient into the
prefix: values and gradients equal the plain forward's (within floating-point reassociation), for
the prefix's tokens once instead of once per row.

Which rows share which prefix is planned from the tokens (``prefix_groups``): rows sorted by their
tokens, split into consecutive groups for the fewest packed tokens. A GRPO group's rows share their
prompt; episodes of one domain share its system prompt; a micro-batch of two domains' episodes
gets one prefix per domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TREE_ATTENTION = "stagewise_prefix_tree"


# --- planning ------------------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading tokens a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(rows: list[list[int]]) -> list[tuple[int, list[int]]]:
    """Which rows share which prefix: [(prefix length L, row indices), ...] covering every row once,
    with the fewest packed tokens (sum over groups of L plus every row's tail). Each row keeps at
    least one token after its prefix; a row alone is a one-token prefix and its tail.

    Rows sorted by their tokens put those with long common openings next to each other (a GRPO
    group's rows, a domain's episodes); the best split of that order into consecutive groups is a
    small dynamic programme: a group's prefix is the smallest common prefix of its neighbours, and
    it saves (rows - 1) x L tokens."""
    order = sorted(range(len(rows)), key=lambda r: rows[r])
    B = len(order)
    lcp = [common_prefix(rows[order[i]], rows[order[i + 1]]) for i in range(B - 1)]
    best = [0] * (B + 1)  # best[i]: the largest saving over the first i sorted rows
    cut = [0] * (B + 1)
    for i in range(1, B + 1):
        best[i], cut[i] = best[i - 1], i - 1  # row i-1 alone
        shared, shortest = None, len(rows[order[i - 1]])
        for j in range(i - 2, -1, -1):  # group = sorted rows j .. i-1
            shared = lcp[j] if shared is None else min(shared, lcp[j])
            shortest = min(shortest, len(rows[order[j]]))
            L = min(shared, shortest - 1)
            if L <= 0:
                break
            if best[j] + (i - 1 - j) * L > best[i]:
                best[i], cut[i] = best[j] + (i - 1 - j) * L, j
    groups, i = [], B
    while i > 0:
        j = cut[i]
        members = order[j:i]
        L = min(min(lcp[j:i - 1], default=len(rows[members[0]])), min(len(rows[r]) for r in members) - 1)
        groups.append((max(L, 1), members))
        i = j
    return groups[::-1]


@dataclass(frozen=True)
class PrefixTree:
    """The packed layout: for each prefix, (its start, its length, ((tail start, tail length), ...))
    in packed positions. Plain ints: the attention reads them in every layer without asking the device."""

    segments: tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...]
    length: int  # packed tokens


def pack_rows(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PrefixTree]:
    """Rows (B, T) -> packed ids (1, N), positions (1, N), the packed place of every (row, column)
    (B, T) (-1 past a row's end), and the tree (``prefix_groups``)."""
    B, T = ids.shape
    rows = [ids[r, :lengths[r]].tolist() for r in range(B)]
    pieces, positions, segments = [], [], []
    place = torch.full((B, T), -1, dtype=torch.long)
    at = 0
    for L, members in prefix_groups(rows):
        pieces.append(ids[members[0], :L])
        positions.append(torch.arange(L))
        prefix_start, tails = at, []
        at += L
        for r in members:
            n = lengths[r] - L
            pieces.append(ids[r, L:lengths[r]])
            positions.append(torch.arange(L, lengths[r]))
            place[r, :L] = torch.arange(prefix_start, prefix_start + L)
            place[r, L:lengths[r]] = torch.arange(at, at + n)
            tails.append((at, n))
            at += n
        segments.append((prefix_start, L, tuple(tails)))
    return torch.cat(pieces)[None], torch.cat(positions)[None], place, PrefixTree(tuple(segments), at)


# --- the forward ---------------------------------------------------------------------------------


# a 4-D mask is taken as given by transformers' mask builders (no (N, N) mask is ever built): the
# tree attention ignores it
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def shared_prefix_hidden(body, ids: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The body's hidden states at the flat positions ``index`` (N,) of ids (B, T): (N, H).

    Equals ``body(ids, positions 0..)``'s last hidden state at those positions; the rows run packed as
    a prefix tree (``prefix_groups``), one body call. The body's attention must be the tree attention
    (``use_prefix_tree``)."""
    if getattr(getattr(body, "config", None), "_attn_implementation", None) != TREE_ATTENTION:
        # any other attention would read the packed rows as one causal sequence: wrong, silently
        raise RuntimeError("shared_prefix_hidden needs the model's attention switched by use_prefix_tree(lm)")
    packed, positions, place, tree = pack_rows(ids.cpu(), lengths.tolist())
    device = ids.device
    hidden = body(input_ids=packed.to(device), position_ids=positions.to(device), attention_mask=_NO_MASK.to(device),
                  prefix_tree=tree, use_cache=False).last_hidden_state[0]
    return hidden.index_select(0, place.view(-1).to(ids.device).index_select(0, index))


def tree_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                           scaling: float | None = None, dropout: float = 0.0, prefix_tree: PrefixTree | None = None,
                           **kwargs):
    """transformers attention function (``stagewise_prefix_tree``): with ``prefix_tree``, the tree's
    attention over one packed row (query (1, heads, N, d), key / value (1, kv_heads, N, d)); without,
    transformers' sdpa (every other forward of the model: sampling, evaluation, the plain path).
    -> (1, N, heads, d), as transformers' attention functions return it."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if prefix_tree is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    groups = query.size(1) // key.size(1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as autocast runs sdpa: in its compute dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    drop = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    attend = torch.nn.functional.scaled_dot_product_attention
    outs = []
    for start, L, tails in prefix_tree.segments:
        k_prefix, v_prefix = key[:, :, start:start + L], value[:, :, start:start + L]
        outs.append(attend(query[:, :, start:start + L], k_prefix, v_prefix, is_causal=L > 1, dropout_p=drop,
                           scale=scale))
        first, last = tails[0][0], tails[-1][0] + tails[-1][1]  # a prefix's tails follow it, in order
        sizes = tuple(n for _, n in tails)
        if query.device.type == "cpu" and drop == 0.0:
            outs.append(PrefixTailAttention.apply(query[:, :, first:last], k_prefix, v_prefix,
                                                  key[:, :, first:last], value[:, :, first:last], sizes, scale))
            continue
        for at, n in tails:  # other devices: one masked call per tail (the prefix's keys copied per tail)
            k = torch.cat([k_prefix, key[:, :, at:at + n]], dim=2)
            v = torch.cat([v_prefix, value[:, :, at:at + n]], dim=2)
            mask = torch.ones(n, L + n, dtype=torch.bool, device=query.device).tril(L)  # lower-right causal
            outs.append(attend(query[:, :, at:at + n], k, v, attn_mask=mask, dropout_p=drop, scale=scale))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _flash(q, k, v, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _flash_backward(grad, q, k, v, out, lse, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, causal,
                                                                               scale=scale)


class PrefixTailAttention(torch.autograd.Function):
    """The tails of one prefix, attending to it and causally to themselves, without copying the
    prefix's keys per tail or masking (CPU's flash kernels). q, k_tails, v_tails: (1, h, M, d), the
    tails one after the other (``sizes``); k_prefix, v_prefix: (1, h, L, d) -> (1, h, M, d).

    Forward: every tail query against the prefix in one dense call, each tail against itself
    causally, merged exactly by the two log-sum-exps (softmax over [prefix; own] = the partial
    softmaxes weighted by exp(lse_part - lse)). Backward: each part's flash backward given the
    merged output and log-sum-exp, which makes its probabilities the merged softmax's (as ring
    attention does); the query's gradient is the sum of the two parts'."""

    @staticmethod
    def forward(ctx, q, k_prefix, v_prefix, k_tails, v_tails, sizes: tuple[int, ...], scale: float):
        out_p, lse_p = _flash(q, k_prefix, v_prefix, False, scale)
        own, own_lse = [], []
        at = 0
        for n in sizes:
            o, lse = _flash(q[:, :, at:at + n], k_tails[:, :, at:at + n], v_tails[:, :, at:at + n], True, scale)
            own.append(o)
            own_lse.append(lse)
            at += n
        out_t, lse_t = torch.cat(own, dim=2), torch.cat(own_lse, dim=2)
        lse = torch.logaddexp(lse_p, lse_t)
        out = (out_p.float() * (lse_p - lse).exp()[..., None] + out_t.float() * (lse_t - lse).exp()[..., None])
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k_prefix, v_prefix, k_tails, v_tails, out, lse)
        ctx.sizes, ctx.scale = sizes, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_prefix, v_prefix, k_tails, v_tails, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk_prefix, dv_prefix = _flash_backward(grad, q, k_prefix, v_prefix, out, lse, False, ctx.scale)
        dq_own, dk_own, dv_own = [], [], []
        at = 0
        for n in ctx.sizes:
            part = slice(at, at + n)
            g = _flash_backward(grad[:, :, part], q[:, :, part], k_tails[:, :, part], v_tails[:, :, part],
                                out[:, :, part], lse[:, :, part].contiguous(), True, ctx.scale)
            dq_own.append(g[0])
            dk_own.append(g[1])
            dv_own.append(g[2])
            at += n
        dq = dq + torch.cat(dq_own, dim=2)
        return dq, dk_prefix, dv_prefix, torch.cat(dk_own, dim=2), torch.cat(dv_own, dim=2), None, None


def tree_supported(lm) -> str | None:
    """Why the tree attention cannot stand in for the model's attention, or None: it must be
    transformers' sdpa (the default), without soft-capping, sinks or sliding windows."""
    from stagewise.generation.shared_prefix import supported

    impl = {getattr(getattr(m, "config", None), "_attn_implementation", None) for m in lm.modules()} - {None}
    if not impl <= {"sdpa", TREE_ATTENTION}:
        return f"attention {', '.join(sorted(impl))} (the shared prefix needs sdpa)"
    if not supported(lm):
        return "soft-capping, attention sinks or sliding windows"
    return None


def use_prefix_tree(lm) -> bool:
    """Switch every config under ``lm`` from sdpa to the tree attention (which is sdpa for every
    forward that passes no tree), for good: a recomputed forward under gradient checkpointing must
    see the same attention. False (nothing changed) where it cannot (``tree_supported``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if tree_supported(lm) is not None:
        return False
    AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)
    for m in lm.modules():
        config = getattr(m, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = TREE_ATTENTION
    return True


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

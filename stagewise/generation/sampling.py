"""Autoregressive sampling with a KV cache and one random stream per sequence.

Why not ``model.generate``: every sequence here draws its noise from its own generator seeded by
(run seed, step, global sequence index). The completions of a step are therefore the same
whether 1 or N processes generate them and whatever the batch composition, which is what makes
N-process GRPO testable against 1 process, and resume exact. Under ZeRO-3 every rank must run
the same number of forward passes (parameters are all-gathered inside forward); ``all_done``
is the hook through which ranks agree to stop (the role of ``synced_gpus`` in ``generate``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from stagewise.errors import TrainingError
from stagewise.generation import shared_prefix
from stagewise.generation.padding import position_ids_from_mask
from stagewise.generation.prefix_store import PrefixStore


def check_logits(logits: torch.Tensor, step: int) -> None:
    """Refuse to sample from NaN / +inf logits or from a row with no finite logit: softmax would
    give NaN probabilities and inverse-CDF sampling would silently pick the last token id."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise TrainingError(f"sampling: the model produced non-finite logits at decode step {step} "
                            f"(rows {rows[:8]}); its weights have probably diverged (lower optim.lr, or "
                            f"resume from an earlier checkpoint)")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k and the top-p nucleus with -inf.  logits: (B, V) -> (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling. probs: (B, V), uniforms: (B,) in [0, 1) -> (B,) token ids.

    One uniform per row (not V Gumbel draws) keeps per-sequence generators cheap: drawing
    full-vocabulary noise row by row cost ~40 ms per decode step for 32 rows here.
    """
    cdf = probs.double().cumsum(-1)
    u = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first index whose cumulative mass exceeds u, never a zero-probability token
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)


SPLIT_PREFILL_FROM = 1024  # padded prompt length from which prompts are prefilled one by one, in blocks
# tokens per prefill block; prompts equal up to a block boundary share those blocks. 256, not 512: a tau2
# domain's conversations agree on their first ~5,060 (airline) / ~4,950 (retail) tokens, so 512-token
# blocks made each conversation recompute ~450 / ~340 of them (airline evaluation 261 s; 256: 240 s;
# 128: 247 s, more forward calls per turn)
PREFILL_BLOCK = 256


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D token tensors."""
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


def prefill(model, prompt_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *, lockstep: bool,
            room: int | None = None, store: PrefixStore | None = None):
    """KV cache and last-position logits (N, V) of left-padded prompts (N, P).

    Long prompts (multi-turn episodes: thousands of tokens each) are prefilled one at a time,
    without padding, in blocks of PREFILL_BLOCK tokens at fixed offsets, and their caches
    left-padded into one. Two reasons:
    - with a padding mask, attention runs SDPA's math path and materialises a (P x P) mask per
      head and row: a batch of 5k-token prompts was ~10x slower on CPU than unpadded prefills;
    - prompts that agree up to a block boundary (the tau2 policy and tool schemas, ~5k tokens,
      in every episode of a domain; a group's conversation up to where it diverged) compute
      those blocks once: in sorted order, a prompt starts from its predecessor's cache, cut at
      the last block boundary they share (the role of vLLM's prefix caching).
    A prompt's numbers depend only on its own tokens (same blocks whichever prompts share them),
    so completions stay independent of batch composition. Under lockstep (ZeRO-3 / FSDP) every
    rank must run the same forward passes, so the batch is prefilled at once there.

    store: prompt caches from earlier calls with the same weights (the engine's; ``prefix_store``):
    a prompt starts from the longest whole-block prefix found there or in its sorted predecessor, and
    is stored in turn (an episode's next turn re-prefills only what was said since).

    room: the decode steps to come. Given it (and plain softmax attention), long prompts return a
    ``SharedPrefixCache``: the prefix that sorted neighbours share in whole blocks (or a lone prompt
    whole) is kept once for all the rows reading it, the rest of each prompt in its row's tail.
    """
    from transformers import DynamicCache

    N, P = prompt_ids.shape
    if lockstep or P < SPLIT_PREFILL_FROM:
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1, :].float()
    lengths = mask.sum(-1).tolist()
    rows = [prompt_ids[i, P - lengths[i]:] for i in range(N)]
    order = sorted(range(N), key=lambda i: rows[i].tolist())
    layers: list = [None] * N
    logits: list = [None] * N
    starts = [0] * N  # tokens (whole blocks) prompt i shares with its sorted predecessor
    previous = None
    # a chunk that continues a cache attends to it without a materialised mask (shared_prefix)
    split_attention = shared_prefix.supported(model)
    for i in order:
        n, cache = lengths[i], None
        if previous is not None:
            starts[i] = min(common_prefix(rows[previous], rows[i]), n - 1) // PREFILL_BLOCK * PREFILL_BLOCK
        start, source = starts[i], layers[previous] if previous is not None else None
        if store is not None:
            stored, stored_layers = store.longest(rows[i], PREFILL_BLOCK, below=n)
            if stored > start:
                start, source = stored, stored_layers
        if start:
            cache = DynamicCache()
            for li, layer in enumerate(source):
                cache.update(layer.keys[:, :, :start], layer.values[:, :, :start], li)
        # to the next block boundary, then whole blocks at fixed offsets
        cuts = [start] + list(range((start // PREFILL_BLOCK + 1) * PREFILL_BLOCK, n, PREFILL_BLOCK)) + [n]
        with shared_prefix.chunk_over_cache_attention(model) if split_attention else nullcontext():
            for s, e in zip(cuts, cuts[1:]):
                positions_se = torch.arange(s, e, device=prompt_ids.device)[None]
                out = model(input_ids=rows[i][None, s:e], position_ids=positions_se, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
        ls = getattr(cache, "layers", None)
        if not ls or not all(hasattr(layer, "keys") and not getattr(layer, "is_sliding", False) for layer in ls):
            # a cache we cannot cut or pad (sliding windows, ...): the batched way
            out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
            return out.past_key_values, out.logits[:, -1, :].float()
        layers[i], logits[i], previous = ls, out.logits[:, -1, :].float(), i
        if store is not None:
            store.add(rows[i], ls, PREFILL_BLOCK)
    if room is not None and shared_prefix.supported(model):
        return shared_cache(layers, order, starts, lengths, room), torch.cat(logits)
    cache = DynamicCache()
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, P - t.size(2), 0))  # noqa: E731  (zeros, masked out)
    for li in range(len(layers[0])):
        cache.update(torch.cat([pad(ls[li].keys) for ls in layers]), torch.cat([pad(ls[li].values) for ls in layers]),
                     li)
    return cache, torch.cat(logits)


def shared_cache(layers: list, order: list[int], starts: list[int], lengths: list[int], room: int):
    """Per-prompt prefill caches -> one SharedPrefixCache. Runs of sorted prompts that share whole blocks
    share one segment: the blocks common to the whole run (its owner's cache, cut there); a prompt that
    shares no block with its neighbours is its own segment, whole."""
    runs: list[list[int]] = []
    for i in order:
        if starts[i] and runs:
            runs[-1].append(i)
        else:
            runs.append([i])
    prefix_of: list = [None] * len(order)
    for run in runs:
        shared = min(starts[i] for i in run[1:]) if len(run) > 1 else lengths[run[0]]
        for i in run:
            prefix_of[i] = (run[0], shared)
    caches = [[(layer.keys, layer.values) for layer in ls] for ls in layers]
    return shared_prefix.SharedPrefixCache.from_prompts(caches, prefix_of, room)


def store_completions(store: PrefixStore, cache: shared_prefix.SharedPrefixCache, ended: torch.Tensor,
                      prompts: list[torch.Tensor], decoded: torch.Tensor) -> None:
    """Keep each ended row's prompt + its decoded tokens in the store: the keys and values of the
    t = decoded.size(1) tokens the cache holds after the prompt are the last t of the row's tail (the
    stop token just drawn was never run). A multi-turn episode's next prompt is that prompt, the
    completion and what was said since: it then prefills only the last part.
    ended: (rows,) bool over the cache's rows; prompts[j], decoded[j]: cache row j's."""
    for j in ended.nonzero().flatten().tolist():
        store.extend(prompts[j], decoded[j], cache.last_of_row(j, decoded.size(1)), PREFILL_BLOCK)


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           eos_token_ids: list[int], pad_token_id: int, num_samples: int = 1,
           seeds: list[int] | None = None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, all_done: Callable[[bool], bool] | None = None,
           with_logprobs: bool = False, prefix_store: PrefixStore | None = None) -> tuple[torch.Tensor, ...]:
    """Sample ``num_samples`` completions for each prompt.

    prompt_ids, prompt_mask: (N, P), left-padded, one row per *distinct* prompt.
    seeds: N * num_samples ints (row b = prompt b // num_samples), required unless greedy.
    Returns completion_ids (B, C) right-padded with pad_token_id (B = N * num_samples), completion
    mask (B, C) covering the tokens up to and including the first EOS, and truncated (B,) bool:
    no EOS within max_new_tokens. C <= max_new_tokens: decoding stops when every row has ended.
    with_logprobs: also return (B, C) fp32 log-probabilities of the drawn tokens under the
    distribution they were drawn from (temperature and top-k/top-p applied; 0 after the end).
    prefix_store: long prompts' caches kept across calls with the same weights (see ``prefill``).

    Speed: each distinct prompt is prefilled once and its KV cache repeated num_samples times
    (GRPO groups share their prompt), and rows that reached EOS leave the batch. Long prompts
    (from SPLIT_PREFILL_FROM tokens) keep what rows share once, not once per row (``shared_prefix``).
    """
    N, device = prompt_ids.size(0), prompt_ids.device
    B = N * num_samples
    if not greedy:
        if seeds is None or len(seeds) != B:
            raise ValueError("sample: one seed per completion is required unless greedy=True")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(eos_token_ids, device=device)
    mask = prompt_mask.long()
    positions = position_ids_from_mask(mask)
    past, logits = prefill(model, prompt_ids, mask, positions, lockstep=all_done is not None, room=max_new_tokens,
                           store=prefix_store)
    shared = isinstance(past, shared_prefix.SharedPrefixCache)  # long prompts: shared prefixes read once
    if shared and prefix_store is not None:  # a row's prompt, to store it with the completion's keys and values
        lengths_in = prompt_mask.sum(-1).tolist()
        prompt_rows = [prompt_ids[i, prompt_ids.size(1) - lengths_in[i]:] for i in range(N)]
    next_pos = positions[:, -1:] + 1
    if num_samples > 1:
        past.batch_repeat_interleave(num_samples)
        logits, mask, next_pos = (x.repeat_interleave(num_samples, dim=0) for x in (logits, mask, next_pos))

    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    token_logp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device) if with_logprobs else None
    active = torch.arange(B, device=device)  # rows of the full batch still decoding (= cache rows)
    # the shared-prefix cache is read by its own attention function while decoding (prefill ran the model's)
    with shared_prefix.shared_prefix_attention(model) if shared else nullcontext():
        for t in range(max_new_tokens):
            if active.numel():
                check_logits(logits, t)
                if greedy:
                    nxt = logits.argmax(-1)
                    if with_logprobs:
                        token_logp[active, t] = logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
                else:
                    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                    u = torch.stack([torch.rand((), generator=gens[i]) for i in active.tolist()])
                    nxt = draw_tokens(probs, u.to(device))
                    if with_logprobs:
                        token_logp[active, t] = probs.gather(-1, nxt[:, None]).squeeze(-1).log()
                tokens[active, t] = nxt
                lengths[active] += 1
                hit = torch.isin(nxt, eos)
                ended[active[hit]] = True
                if hit.any():
                    if shared and prefix_store is not None and t:
                        store_completions(prefix_store, past, hit, [prompt_rows[i // num_samples] for i in
                                                                    active.tolist()], tokens[active, :t])
                    keep = (~hit).nonzero().squeeze(1)
                    past.batch_select_indices(keep)
                    active, nxt, mask, next_pos = active[keep], nxt[keep], mask[keep], next_pos[keep]
            last = t == max_new_tokens - 1
            local_done = active.numel() == 0
            if last or (all_done(local_done) if all_done is not None else local_done):
                break
            if active.numel():
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
                out = model(input_ids=nxt[:, None], attention_mask=None if shared else mask, position_ids=next_pos,
                            past_key_values=past, use_cache=True, logits_to_keep=1)
                past, logits = out.past_key_values, out.logits[:, -1, :].float()
                next_pos = next_pos + 1
            else:  # finished here but not on every rank: keep joining the ZeRO-3 all-gathers
                model(input_ids=torch.full((1, 1), pad_token_id, device=device), use_cache=False)
    C = max(int(lengths.max()), 1)
    completion_mask = (torch.arange(C, device=device)[None, :] < lengths[:, None]).long()
    if with_logprobs:
        return tokens[:, :C], completion_mask, ~ended, token_logp[:, :C]
    return tokens[:, :C], completion_mask, ~ended

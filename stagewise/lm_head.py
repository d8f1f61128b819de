"""An LM's output head applied in token chunks: log-probabilities (and entropies) of given tokens
without the (tokens x vocab) logits ever existing. GRPO's log-probs (rl/logprobs.py) and SFT's
loss (sft/loss.py) both go through it.

    logp, entropy = token_logprobs(hidden, ids, lm.get_output_embeddings(), with_entropy=True)
    # hidden (N, H) at the positions predicting ids (N,) -> (N,) fp32 each
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 holds the module's weights partitioned: every call of it then gathers them (a
    collective), so every rank must call it the same number of times."""
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of the head + log-softmax: one fp32 (chunk, V) block is ~256 MB (441
    tokens for Qwen3's 151,936-word vocabulary, 1,365 for SmolLM2's 49,152)."""
    return max(16, 2**26 // vocab)


def _chunk_logprobs(hidden: torch.Tensor, ids: torch.Tensor, head, temperature: float,
                    softcap: float | None, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (n, H) (or logits (n, V) when head is None), ids (n,) -> log-prob (n,) fp32 and
    entropy (n,) fp32 (detached; empty when not asked)."""
    logits = (hidden if head is None else head(hidden)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, ids[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, logp.new_zeros(0)
    with torch.no_grad():
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def token_logprobs(hidden: torch.Tensor, ids: torch.Tensor, head: torch.nn.Module, *, temperature: float = 1.0,
                   softcap: float | None = None, with_entropy: bool = False,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden (N, H) at the positions predicting ids (N,) -> log-probs (N,) fp32 and entropy (N,) or None.

    The head and the log-softmax run ``chunk`` tokens at a time, each chunk (when there are
    several) under activation checkpointing (its logits recomputed in backward, not kept): the
    (N, V) logits never exist, in any dtype; peak extra memory is a few (chunk, V) fp32 blocks.
    """
    # the vocabulary from the module, not its weight (ZeRO-3 leaves a partitioned weight empty)
    chunk = chunk or chunk_tokens(getattr(head, "out_features", None) or head.weight.size(0))
    # one chunk only (short completions): nothing to save by recomputing its logits in backward
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.size(0) > chunk
    rows, chunk_head = hidden, head
    if partitioned(head):
        # ZeRO-3: each call of the head gathers it, and ranks hold different numbers of tokens:
        # the head runs once on all of them (its (N, V) logits in the compute dtype), the fp32
        # log-softmax in chunks
        rows, chunk_head = head(hidden), None
    logps, entropies = [], []
    for i in range(0, hidden.size(0), chunk):
        args = (rows[i:i + chunk], ids[i:i + chunk], chunk_head, temperature, softcap, with_entropy)
        if recompute:
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)

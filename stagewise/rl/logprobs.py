"""Log-probabilities of completion tokens only, without a full-batch fp32 log-softmax."""

from __future__ import annotations

import torch

from stagewise.rl.sampling import position_ids_from_mask


def selective_logprobs(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """log softmax(logits)[ids], computed `chunk` rows at a time in fp32.

    logits: (B, T, V) any float dtype; ids: (B, T) -> (B, T) fp32. Peak extra memory is one
    (chunk, T, V) fp32 block instead of (B, T, V).
    """
    out = []
    for i in range(0, logits.size(0), chunk):
        lg = logits[i:i + chunk].float()
        out.append(lg.gather(-1, ids[i:i + chunk, :, None]).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out, dim=0)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy in nats, chunked, no grad (a cheap diagnostic)."""
    out = []
    for i in range(0, logits.size(0), chunk):
        lg = logits[i:i + chunk].float()
        logz = torch.logsumexp(lg, dim=-1, keepdim=True)
        p = torch.exp(lg - logz)
        out.append((logz.squeeze(-1) - (p * lg).sum(-1)))
    return torch.cat(out, dim=0)


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log pi(completion token | prefix) for each completion position.

    prompt_*: (B, P) left-padded; completion_*: (B, C) right-padded -> logp (B, C), entropy (B, C)|None.
    Only the C positions that predict completion tokens get logits (``logits_to_keep``): the
    prompt's positions never reach the vocabulary projection.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    C = completion_ids.size(1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                logits_to_keep=C + 1, use_cache=False)
    logits = out.logits[:, :-1, :]  # position t predicts token t+1: drop the last
    if temperature != 1.0:
        logits = logits / temperature
    logp = selective_logprobs(logits, completion_ids)
    ent = entropy_from_logits(logits.detach()) if with_entropy else None
    return logp, ent

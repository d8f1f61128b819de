"""GRPO policy loss: per-token clipped surrogate + k3 KL, then an aggregation from a registry.

Shapes: B sequences in a micro-batch, T completion positions.
The aggregations take the *global* counts (active sequences, active tokens, all rows) of the whole
accumulated batch (all micro-batches on all processes) so that summing micro-batch losses over
accumulation steps and processes gives exactly the paper's objective, whatever the micro-batch size
or the number of processes.
"""

from __future__ import annotations

import torch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), per token: exp(ref - logp) - (ref - logp) - 1 >= 0.

    logp, ref_logp: (B, T) -> (B, T).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor, *,
                   epsilon_low: float, epsilon_high: float, beta: float = 0.0,
                   ref_logp: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   kl_ratio_weighted: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (PPO/GRPO) per token.

    logp: (B, T) log pi_theta of the sampled tokens (with grad).
    old_logp: (B, T) log pi_old, or None when num_iterations == 1 (then pi_old = pi_theta detached,
              the ratio is 1 and its gradient is grad log pi: no second forward pass is needed).
    advantages: (B,).  ref_logp: (B, T) or None.  Returns (loss (B, T), per-token stats (B, T)).
    mask: (B, T) or None. Positions outside it (padding, dropped rows) are set to log-prob 0 *before*
          any exp, so an inf or NaN there can reach neither the loss nor, through autograd, the gradient.
    kl_ratio_weighted: multiply the k3 KL by the (differentiable) ratio pi_theta / pi_old, as TRL's
          default ``use_bias_correction_kl`` does (DeepSeek-V3.2's unbiased reverse-KL gradient).
          Off by default: Shao et al.'s GRPO adds the plain k3 term.
    """
    old = logp.detach() if old_logp is None else old_logp
    if mask is not None:
        keep = mask.bool()
        logp, old = logp.masked_fill(~keep, 0.0), old.masked_fill(~keep, 0.0)
        ref_logp = None if ref_logp is None else ref_logp.masked_fill(~keep, 0.0)
    ratio = torch.exp(logp - old)
    adv = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    stats = {"clipped": ((ratio * adv) > (clipped * adv)).float()}
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)
        stats["kl"] = kl.detach()
        if kl_ratio_weighted:
            kl = kl * ratio
        loss = loss + beta * kl
    return loss, stats


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of x where mask is set; elsewhere x is ignored even if it is inf or NaN (unlike x * mask)."""
    picked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def aggregate_grpo(loss: torch.Tensor, mask: torch.Tensor, *, num_sequences: int, num_tokens: int,
                   num_rows: int, max_len: int) -> torch.Tensor:
    """GRPO: mean over each sequence's tokens, then mean over the sequences that enter the loss
    (rows masked whole — zero-variance groups, truncated completions — are not counted)."""
    per_seq = masked_sum(loss, mask, dim=-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / max(num_sequences, 1)


def aggregate_dr_grpo(loss: torch.Tensor, mask: torch.Tensor, *, num_sequences: int, num_tokens: int,
                      num_rows: int, max_len: int) -> torch.Tensor:
    """Dr. GRPO: token sum / (all rows of the batch x max completion length), a constant: no length
    bias, and masking rows does not rescale the others (as the paper and TRL)."""
    return masked_sum(loss, mask) / max(num_rows * max_len, 1)


def aggregate_dapo(loss: torch.Tensor, mask: torch.Tensor, *, num_sequences: int, num_tokens: int,
                   num_rows: int, max_len: int) -> torch.Tensor:
    """DAPO token-level: token sum / number of active tokens of the whole accumulated batch."""
    return masked_sum(loss, mask) / max(num_tokens, 1)


def engine_mismatch(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                    cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (TIS, Yao et al. 2025) for a rollout engine whose numbers
    differ from the trainer's (vLLM kernels, bf16): tokens were drawn from pi_engine, the loss is
    written for pi_trainer, so each token's loss is weighted by min(pi_trainer / pi_engine, cap).

    trainer_logp, engine_logp, mask: (B, T). Returns (weights (B, T), detached, 1 outside the mask
    or when cap is None; |trainer_logp - engine_logp| (B, T), 0 outside the mask).
    """
    keep = mask.bool()
    diff = torch.where(keep, trainer_logp.detach().float() - engine_logp.float(), torch.zeros((), device=mask.device))
    weights = torch.ones_like(diff) if cap is None else torch.exp(diff).clamp(max=cap)
    return torch.where(keep, weights, torch.ones_like(weights)), diff.abs()

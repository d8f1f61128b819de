"""Rollouts: G sampled completions per prompt, scored by the domain's reward functions.

The typed container below is what flows from generation into the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from stagewise.domains import Domain
from stagewise.rl.prompts import encode_prompts, eos_ids
from stagewise.rl.sampling import sample


@dataclass
class RolloutBatch:
    """One process's share of a step. B = local groups x G, rows of a group contiguous."""

    prompt_ids: torch.Tensor  # (B, P) left-padded, each prompt repeated G times
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C) 1 up to and including EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    rewards: torch.Tensor  # (B,) weighted sum of the reward functions
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,), NaN if unused
    texts: list[str] = field(default_factory=list)
    advantages: torch.Tensor | None = None  # (B,)
    loss_mask: torch.Tensor | None = None  # (B, C) completion_mask minus dropped/masked rows
    old_logp: torch.Tensor | None = None  # (B, C) only when num_iterations > 1
    ref_logp: torch.Tensor | None = None  # (B, C) only when beta > 0

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def slice(self, start: int, end: int) -> RolloutBatch:
        """Rows start..end (a micro-batch); completion columns trimmed to the longest row in it."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                kw[f.name] = v[start:end]
            elif isinstance(v, dict):
                kw[f.name] = {k: t[start:end] for k, t in v.items()}
            elif isinstance(v, list):
                kw[f.name] = v[start:end]
        mb = replace(self, **kw)
        width = max(int(mb.completion_mask.sum(-1).max()), 1)
        for name in ("completion_ids", "completion_mask", "loss_mask", "old_logp", "ref_logp"):
            t = getattr(mb, name)
            if t is not None:
                setattr(mb, name, t[:, :width])
        return mb


def generate_rollouts(model, tokenizer, examples: list[tuple[Domain, dict]], *, num_generations: int,
                      max_new_tokens: int, temperature: float, top_p: float, top_k: int, seeds: list[int],
                      device, all_done=None) -> RolloutBatch:
    """Sample G completions per (domain, example) and score them.  seeds: one per completion."""
    ids, mask = encode_prompts(tokenizer, [ex["prompt"] for _, ex in examples], device)
    comp, cmask, trunc = sample(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, num_samples=num_generations, seeds=seeds,
                                temperature=temperature, top_p=top_p, top_k=top_k, all_done=all_done)
    texts = [tokenizer.decode(comp[i][cmask[i].bool()], skip_special_tokens=True) for i in range(comp.size(0))]
    rewards, parts = score(texts, [x for x in examples for _ in range(num_generations)])
    G = num_generations
    return RolloutBatch(prompt_ids=ids.repeat_interleave(G, 0), prompt_mask=mask.repeat_interleave(G, 0),
                        completion_ids=comp, completion_mask=cmask, truncated=trunc, rewards=rewards,
                        reward_parts=parts, texts=texts)


def score(texts: list[str], examples: list[tuple[Domain, dict]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> total (B,), and per reward function (B,) with NaN where a row's domain does not use it."""
    names = sorted({n for d, _ in examples for n, _ in d.rewards})
    parts = {n: torch.full((len(texts),), float("nan")) for n in names}
    total = torch.zeros(len(texts))
    for i, (text, (dom, ex)) in enumerate(zip(texts, examples)):
        s = dom.score(text, ex)
        total[i] = s.pop("_total")
        for n, v in s.items():
            parts[n][i] = v
    return total, parts

"""Rollouts: G episodes per task (one completion each for a single-turn domain), scored.

The typed container below is what flows from generation into the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from stagewise.domains import Domain
from stagewise.rl.engines import SamplingParams, left_pad
from stagewise.rl.episodes import Episode, EpisodeLimits, run_episodes


@dataclass
class RolloutBatch:
    """One process's share of a step. B = local groups x G, rows of a group contiguous."""

    prompt_ids: torch.Tensor  # (B, P) left-padded, each prompt repeated G times
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C) 1 on every real token after the prompt (policy and environment)
    policy_mask: torch.Tensor  # (B, C) 1 where the policy sampled the token (the only ones trained on)
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    rewards: torch.Tensor  # (B,) weighted sum of the reward functions
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,), NaN if unused
    texts: list[str] = field(default_factory=list)
    episode_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # turns, tool_calls, ... -> (B,)
    advantages: torch.Tensor | None = None  # (B,)
    loss_mask: torch.Tensor | None = None  # (B, C) completion_mask minus dropped/masked rows
    engine_logp: torch.Tensor | None = None  # (B, C) the rollout engine's log-probs, when it reports them
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
        for name in ("completion_ids", "completion_mask", "policy_mask", "loss_mask", "engine_logp", "old_logp",
                     "ref_logp"):
            t = getattr(mb, name)
            if t is not None:
                setattr(mb, name, t[:, :width])
        return mb


def generate_rollouts(engine, tokenizer, examples: list[tuple[Domain, dict]], *, num_generations: int,
                      params: SamplingParams, limits: EpisodeLimits, seeds: list[int], device,
                      all_done=None) -> RolloutBatch:
    """Run G episodes per (domain, example) through the rollout engine and score them.
    seeds: one per episode. A single-turn domain's episode is one completion."""
    eps = run_episodes(engine, tokenizer, examples, group_size=num_generations, seeds=seeds, params=params,
                       limits=limits, all_done=all_done)
    return batch_from_episodes(eps, tokenizer.pad_token_id, device)


def batch_from_episodes(eps: list[Episode], pad_id: int, device) -> RolloutBatch:
    """Episodes -> tensors: prompts left-padded, everything after them right-padded, policy tokens marked."""
    B = len(eps)
    prompt_ids, prompt_mask = left_pad([e.prompt for e in eps], pad_id, device)
    C = max(max(len(e.tokens) for e in eps), 1)
    comp = torch.full((B, C), pad_id, dtype=torch.long)
    cmask = torch.zeros((B, C), dtype=torch.long)
    pmask = torch.zeros((B, C), dtype=torch.long)
    reported = bool(eps) and all(e.engine_logp is not None or not e.tokens for e in eps)
    elogp = torch.zeros((B, C), dtype=torch.float32) if reported else None
    for i, e in enumerate(eps):
        n = len(e.tokens)
        comp[i, :n] = torch.tensor(e.tokens, dtype=torch.long)
        cmask[i, :n] = 1
        pmask[i, :n] = torch.tensor(e.policy, dtype=torch.long)
        if reported and n:
            elogp[i, :n] = torch.tensor(e.engine_logp, dtype=torch.float32)
    # every part a domain weighs or its environment reports (tau2: pass, db, actions, ...), logged as
    # reward/<part>; NaN where a row's domain has no such part (a replay mix of domains)
    known = {id(e.domain): {n for n, _ in e.domain.rewards} | set(e.domain.reward_parts or ()) for e in eps}
    names = sorted(set().union(*known.values())) if eps else []
    parts = {n: torch.tensor([e.parts.get(n, float("nan")) if n in known[id(e.domain)] else float("nan")
                              for e in eps]) for n in names}
    stats = {"turns": [e.turns for e in eps], "tool_calls": [e.tool_calls for e in eps],
             "tool_errors": [e.tool_errors for e in eps], "policy_tokens": [sum(e.policy) for e in eps],
             "prompt_tokens": [len(e.prompt) for e in eps]}  # tau2's system prompt + tools: thousands
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp.to(device),
                        completion_mask=cmask.to(device), policy_mask=pmask.to(device),
                        engine_logp=None if elogp is None else elogp.to(device),
                        truncated=torch.tensor([e.truncated for e in eps]), rewards=torch.tensor([e.reward for e in eps]),
                        reward_parts=parts, texts=[e.transcript() for e in eps],
                        episode_stats={k: torch.tensor(v, dtype=torch.float32) for k, v in stats.items()})

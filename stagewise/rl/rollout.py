"""Rollouts: G episodes per task (one completion each for a single-turn domain), scored.

The typed container below is what flows from generation into the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from stagewise.domains.base import Domain
from stagewise.errors import ConfigError
from stagewise.generation import vllm_engine
from stagewise.generation.engines import SamplingParams
from stagewise.generation.padding import left_pad
from stagewise.parallel import runtime
from stagewise.rl.episodes import Episode, EpisodeLimits, run_episodes

# per-episode statistics every batch carries (logged as episode/<name> for multi-turn domains)
EPISODE_STATS = ("turns", "tool_calls", "tool_errors", "policy_tokens", "prompt_tokens")


@dataclass
class RolloutBatch:
    """One process's share of a step. B = local groups x G, rows of a group contiguous."""

    prompt_ids: torch.Tensor  # (B, P) left-padded, each prompt repeated G times
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C) 1 on every real token after the prompt (policy and environment)
    policy_mask: torch.Tensor  # (B, C) 1 where the policy sampled the token (the only ones trained on)
    truncated: torch.Tensor  # (B,) bool: the episode ran out of turns or tokens, or a turn hit max_new_tokens
    rewards: torch.Tensor  # (B,) weighted sum of the reward functions
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,), NaN if unused
    texts: list[str] = field(default_factory=list)
    episode_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # turns, tool_calls, ... -> (B,)
    advantages: torch.Tensor | None = None  # (B,)
    loss_mask: torch.Tensor | None = None  # (B, C) policy tokens (completion_mask & policy_mask) of the rows kept
    engine_logp: torch.Tensor | None = None  # (B, C) the rollout engine's log-probs, when it reports them
    old_logp: torch.Tensor | None = None  # (B, C) only when num_iterations > 1
    ref_logp: torch.Tensor | None = None  # (B, C) only when beta > 0

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def micro_batches(self, size: int):
        """Consecutive slices of ``size`` rows (the last may be shorter)."""
        for start in range(0, len(self), size):
            yield self.slice(start, start + size)

    def slice(self, start: int, end: int) -> RolloutBatch:
        """Rows start..end (a micro-batch); completion columns trimmed to the longest row in it."""
        return self.rows(list(range(start, min(end, len(self)))))

    def rows(self, index: list[int]) -> RolloutBatch:
        """The rows ``index``, in that order; completion columns trimmed to the longest row in it."""
        at = torch.tensor(index, dtype=torch.long)
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                kw[f.name] = v[at.to(v.device)]
            elif isinstance(v, dict):
                kw[f.name] = {k: t[at.to(t.device)] for k, t in v.items()}
            elif isinstance(v, list):
                kw[f.name] = [v[i] for i in index] if v else []
        mb = replace(self, **kw)
        width = max(int(mb.completion_mask.sum(-1).max()), 1)
        for name in ("completion_ids", "completion_mask", "policy_mask", "loss_mask", "engine_logp", "old_logp",
                     "ref_logp"):
            t = getattr(mb, name)
            if t is not None:
                setattr(mb, name, t[:, :width])
        return mb


def check_sampling_stage(cfg, i: int, world: int, micro_batch_size: int, field: str, rows_are: str) -> None:
    """The batch shapes of a stage that samples groups (grpo, rft) for ``world`` processes, before any
    model loads: whole groups per process, micro-batches that divide a process's rows, the DeepSpeed
    JSON's batch, vLLM's limits. ``field``: the stage kind's micro-batch option, for the message."""
    rollout_cfg = cfg.stage_part(i, "rollout")
    if rollout_cfg.prompts_per_step % world:
        raise ConfigError(f"stages.{i}: rollout.prompts_per_step={rollout_cfg.prompts_per_step} must be divisible by "
                          f"the {world} processes (groups are kept whole per process)")
    rows = rollout_cfg.prompts_per_step // world * rollout_cfg.num_generations
    if rows % micro_batch_size:
        raise ConfigError(f"stages.{i}: {field}={micro_batch_size} must divide the {rows} {rows_are}")
    runtime.check_deepspeed_json(cfg.dist, world, micro_batch_size, rows // micro_batch_size)
    if rollout_cfg.engine == "vllm":
        where = f"stages.{i}.rollout.engine" if cfg.stages[i].rollout else "rollout.engine"
        vllm_engine.refuse_unsupported(cfg.dist.strategy, cfg.model.lora is not None, where)
        vllm_engine.require_vllm()


def placeholder_row(batch: RolloutBatch) -> RolloutBatch:
    """One row of two tokens that learns nothing: a micro-batch every process must still run (DDP,
    ZeRO and FSDP count forward / backward calls) when it has nothing to learn, at no cost."""
    mb = batch.slice(0, 1)
    mb.prompt_ids, mb.prompt_mask = mb.prompt_ids[:, -1:], torch.ones_like(mb.prompt_mask[:, -1:])
    for name in ("completion_ids", "completion_mask", "policy_mask", "loss_mask", "engine_logp", "old_logp",
                 "ref_logp"):
        t = getattr(mb, name)
        if t is not None:
            setattr(mb, name, t[:, :1])
    mb.completion_mask = torch.ones_like(mb.completion_mask)
    mb.loss_mask = torch.zeros_like(mb.completion_mask, dtype=torch.float32)
    return mb


def generate_rollouts(generator, tokenizer, examples: list[tuple[Domain, dict]], *, num_generations: int,
                      params: SamplingParams, limits: EpisodeLimits, seeds: list[int], device) -> RolloutBatch:
    """Run G episodes per (domain, example) with a rollout engine's generator and score them.
    seeds: one per episode. A single-turn domain's episode is one completion."""
    episodes = run_episodes(generator, tokenizer, examples, group_size=num_generations, seeds=seeds, params=params,
                            limits=limits)
    return batch_from_episodes(episodes, tokenizer.pad_token_id, device)


def batch_from_episodes(episodes: list[Episode], pad_id: int, device) -> RolloutBatch:
    """Episodes -> tensors: prompts left-padded, everything after them right-padded, policy tokens marked."""
    B = len(episodes)
    prompt_ids, prompt_mask = left_pad([e.prompt for e in episodes], pad_id, device)
    C = max(max(len(e.tokens) for e in episodes), 1)
    comp = torch.full((B, C), pad_id, dtype=torch.long)
    cmask = torch.zeros((B, C), dtype=torch.long)
    pmask = torch.zeros((B, C), dtype=torch.long)
    reported = bool(episodes) and all(e.engine_logp is not None or not e.tokens for e in episodes)
    elogp = torch.zeros((B, C), dtype=torch.float32) if reported else None
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        comp[i, :n] = torch.tensor(e.tokens, dtype=torch.long)
        cmask[i, :n] = 1
        pmask[i, :n] = torch.tensor(e.policy_mask, dtype=torch.long)
        if reported and n:
            elogp[i, :n] = torch.tensor(e.engine_logp, dtype=torch.float32)
    # every part a domain weighs or its environment reports (tau2: pass, db, actions, ...), logged as
    # reward/<part>; NaN where a row's domain has no such part (a replay mix of domains)
    known = {id(e.domain): {n for n, _ in e.domain.rewards} | set(e.domain.reward_parts or ()) for e in episodes}
    names = sorted(set().union(*known.values())) if episodes else []
    parts = {n: torch.tensor([e.parts.get(n, float("nan")) if n in known[id(e.domain)] else float("nan")
                              for e in episodes]) for n in names}
    stats = {"turns": [e.turns for e in episodes], "tool_calls": [e.tool_calls for e in episodes],
             "tool_errors": [e.tool_errors for e in episodes], "policy_tokens": [sum(e.policy_mask) for e in episodes],
             "prompt_tokens": [len(e.prompt) for e in episodes]}  # tau2's system prompt + tools: thousands
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp.to(device),
                        completion_mask=cmask.to(device), policy_mask=pmask.to(device),
                        engine_logp=None if elogp is None else elogp.to(device),
                        truncated=torch.tensor([e.truncated for e in episodes]),
                        rewards=torch.tensor([e.reward for e in episodes]),
                        reward_parts=parts, texts=[e.transcript() for e in episodes],
                        episode_stats={k: torch.tensor(v, dtype=torch.float32) for k, v in stats.items()})

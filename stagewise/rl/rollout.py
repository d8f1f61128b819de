"""Rollouts: G episodes per task (one completion each for a single-turn domain), scored.

The typed container below is what flows from generation into the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from stagewise.domains.base import Domain
from stagewise.errors import ConfigError, RewardError
from stagewise.generation import vllm_engine
from stagewise.generation.engines import SamplingParams
from stagewise.generation.padding import left_pad, right_pad
from stagewise.parallel import runtime
from stagewise.reward_functions import MetricLog, RewardContext, may_log, trainer_state
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
    extras: list[dict] = field(default_factory=list)  # per row: columns reward functions logged (log_extra)
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
        """The rows ``index``, in that order; prompt columns trimmed to the longest prompt in it, and
        completion columns to the longest completion. Why the prompts too: a row's left padding makes
        the plain forward pass a padding mask to sdpa, whose masked kernel is ~1.4x slower than the
        causal one on a 6k-token row (CPU, fp32); an unpadded micro-batch needs no mask."""
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
        prompt_width = max(int(mb.prompt_mask.sum(-1).max()), 1)  # left-padded: the real tokens are the last
        mb.prompt_ids, mb.prompt_mask = mb.prompt_ids[:, -prompt_width:], mb.prompt_mask[:, -prompt_width:]
        width = max(int(mb.completion_mask.sum(-1).max()), 1)
        for name in ("completion_ids", "completion_mask", "policy_mask", "loss_mask", "engine_logp", "old_logp",
                     "ref_logp"):
            t = getattr(mb, name)
            if t is not None:
                setattr(mb, name, t[:, :width])
        return mb


def check_sampling_stage(cfg, i: int, world: int, micro_batch_size: int, field: str, rows_are: str,
                         accumulation: int | None = None) -> None:
    """The batch shapes of a stage that samples groups (grpo, rft) for ``world`` processes, before any
    model loads: whole groups per process, micro-batches that divide a process's rows, the DeepSpeed
    JSON's batch, vLLM's limits. ``field``: the stage kind's micro-batch option, for the message;
    ``accumulation``: micro-batches per step when not the sampled rows' (rft's demonstrations add some)."""
    rollout_cfg = cfg.stage_part(i, "rollout")
    if rollout_cfg.prompts_per_step % world:
        raise ConfigError(f"stages.{i}: rollout.prompts_per_step={rollout_cfg.prompts_per_step} must be divisible by "
                          f"the {world} processes (groups are kept whole per process)")
    rows = rollout_cfg.prompts_per_step // world * rollout_cfg.num_generations
    if rows % micro_batch_size:
        raise ConfigError(f"stages.{i}: {field}={micro_batch_size} must divide the {rows} {rows_are}")
    runtime.check_deepspeed_json(cfg.dist, world, micro_batch_size, accumulation or rows // micro_batch_size)
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
                      params: SamplingParams, limits: EpisodeLimits, seeds: list[int], device,
                      context: RewardContext | None = None) -> RolloutBatch:
    """Run G episodes per (domain, example) with a rollout engine's generator and score them.
    seeds: one per episode. A single-turn domain's episode is one completion. context: what the
    reward functions get besides the batch (``StageRewards.context``)."""
    episodes = run_episodes(generator, tokenizer, examples, group_size=num_generations, seeds=seeds, params=params,
                            limits=limits, context=context)
    return batch_from_episodes(episodes, tokenizer.pad_token_id, device)


def batch_from_episodes(episodes: list[Episode], pad_id: int, device) -> RolloutBatch:
    """Episodes -> tensors: prompts left-padded, everything after them right-padded, policy tokens marked."""
    prompt_ids, prompt_mask = left_pad([e.prompt for e in episodes], pad_id, device)
    comp, cmask = right_pad([e.tokens for e in episodes], pad_id, device, min_width=1)
    pmask, _ = right_pad([e.policy_mask for e in episodes], 0, device, min_width=1)
    reported = bool(episodes) and all(e.engine_logp is not None or not e.tokens for e in episodes)
    elogp = (right_pad([e.engine_logp or [] for e in episodes], 0.0, device, torch.float32, min_width=1)[0]
             if reported else None)
    # every part a domain weighs or its environment reports (tau2: pass, db, actions, ...), logged as
    # reward/<part>, and its metric (rft.keep: pass reads it); NaN where a row's domain has no such part
    # (a replay mix of domains)
    known = {id(e.domain): {n for n, _ in e.domain.rewards} | set(e.domain.reward_parts or ())
             | ({e.domain.metric} if e.domain.metric else set()) for e in episodes}
    names = sorted(set().union(*known.values())) if episodes else []
    parts = {n: torch.tensor([e.parts.get(n, float("nan")) if n in known[id(e.domain)] else float("nan")
                              for e in episodes]) for n in names}
    stats = {"turns": [e.turns for e in episodes], "tool_calls": [e.tool_calls for e in episodes],
             "tool_errors": [e.tool_errors for e in episodes], "policy_tokens": [sum(e.policy_mask) for e in episodes],
             "prompt_tokens": [len(e.prompt) for e in episodes]}  # tau2's system prompt + tools: thousands
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp,
                        completion_mask=cmask, policy_mask=pmask, engine_logp=elogp,
                        truncated=torch.tensor([e.truncated for e in episodes]),
                        rewards=torch.tensor([e.reward for e in episodes]),
                        reward_parts=parts, texts=[e.transcript() for e in episodes],
                        extras=[e.extra for e in episodes],
                        episode_stats={k: torch.tensor(v, dtype=torch.float32) for k, v in stats.items()})


# --- rewards across a stage (grpo, rft) --------------------------------------------------------

# what the stage scaffold adds to every step's row (training/run.StageRun.end_step): log_metric may not reuse them
SCAFFOLD_METRICS = ("stage", "stage_step", "grad_norm", "lr", "skipped_steps", "bad_steps_total", "peak_memory_mb",
                    "train_compute_dtype")


class StageRewards:
    """What a sampling stage gives its reward functions (TRL's ``trainer_state`` and ``log_metric``)
    and the reward metrics it logs per step: ``reward/<part>`` (mean and std over the rows whose
    domain has the part, every process), ``domain_reward/<domain>`` where the stage samples more than
    one domain (replay: the stage's own reward apart from the replayed ones'), ``own_reward`` (the
    mean over the stage's own domains' rows) where it replays others, and what the functions logged
    with ``log_metric``."""

    def __init__(self, own: list[Domain], total_steps: int, *, replayed: list[Domain] = (), rank: int,
                 local_rank: int):
        domains = [*own, *replayed]
        self.parts = sorted({n for d in domains for n, _ in d.rewards} | {p for d in domains for p in d.reward_parts})
        names = list(dict.fromkeys(d.name for d in domains))
        self.domain_names = names if len(names) > 1 else []
        self.own_names = {d.name for d in own}
        self.replays = any(name not in self.own_names for name in names)
        self.log = MetricLog()
        self.state = trainer_state(total_steps, is_main=rank == 0, is_local_main=local_rank == 0)
        self.context = RewardContext(trainer_state=self.state, log_metric=self.log)
        # the same on every rank (the domains are), so every rank joins the gather or none does
        self.gathers = may_log(fn for d in domains for fn in d.reward_fns.values())

    def begin_step(self, step: int) -> RewardContext:
        self.state.global_step = step
        return self.context

    def part_rows(self, batch: RolloutBatch, picked: list, group_size: int) -> dict[str, torch.Tensor]:
        """Per-row values for ``reduce_step_stats`` (NaN where a row's domain has no such part, or is
        another domain). picked: this process's (domain, example) pairs, each sampled group_size
        times in a row (the batch's row order)."""
        row_domains = [dom.name for dom, _ in picked for _ in range(group_size)]
        nan = torch.full((len(batch),), float("nan"))
        rows = {f"reward/{p}": batch.reward_parts.get(p, nan) for p in self.parts}
        for name in self.domain_names:
            mine = torch.tensor([d == name for d in row_domains])
            rows[f"domain_reward/{name}"] = torch.where(mine, batch.rewards.float().cpu(), nan)
        if self.replays:
            own = torch.tensor([d in self.own_names for d in row_domains])
            rows["own_reward"] = torch.where(own, batch.rewards.float().cpu(), nan)
        return rows

    def metrics(self, gathered: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's ``reward/<part>`` metrics from the gathered part rows (popped from ``gathered``)."""
        out = {}
        for p in self.parts:
            values = gathered.pop(f"reward/{p}")
            ok = ~torch.isnan(values)
            if ok.any():
                out[f"reward/{p}"] = values[ok].mean().item()
                out[f"reward/{p}_std"] = values[ok].std().item() if ok.sum() > 1 else 0.0
        # means over the rows of one domain, or of the stage's own (absent where the step drew none)
        for key in [f"domain_reward/{name}" for name in self.domain_names] + (["own_reward"] if self.replays else []):
            values = gathered.pop(key)
            ok = ~torch.isnan(values)
            if ok.any():
                out[key] = values[ok].mean().item()
        return out

    def curve(self, metrics: dict) -> float | None:
        """The step's point on the stage's reward curve: its own domains' reward (a replayed domain's
        rows would hide whether the stage learns its own; None: the step drew none of them)."""
        return metrics.get("own_reward") if self.replays else metrics["reward"]

    def progress(self, metrics: dict) -> dict[str, float]:
        """Each domain's reward for the progress line of a step that sampled several (replay): the
        step's ``reward`` mixes them."""
        return {f"{name} reward": metrics[f"domain_reward/{name}"] for name in self.domain_names
                if f"domain_reward/{name}" in metrics}

    def with_logged(self, metrics: dict) -> dict:
        """``metrics`` and what the reward functions logged this step with ``log_metric`` (averaged
        over the step and every process: a collective, where a function may have logged)."""
        if not self.gathers:
            return metrics
        from accelerate.utils import gather_object

        logged = self.log.flush(gather_object)
        clash = sorted(set(logged) & (set(metrics) | set(SCAFFOLD_METRICS)))
        if clash:
            raise RewardError(f"a reward function logged {clash[0]!r} with log_metric, a metric stagewise logs "
                              f"itself; log it under another name")
        return {**metrics, **logged}

"""One GRPO stage: the training loop to read top to bottom.

    result = train_grpo_stage(job)      # called by the curriculum for every `kind: grpo` stage

Each step:  sample prompts  ->  generate G completions each  ->  rewards  ->  gather rewards of
all processes  ->  advantages per group  ->  (old / reference log-probs when needed)  ->
micro-batches with gradient accumulation  ->  clip, AdamW, schedule  ->  metrics, checkpoint.
What every stage kind shares (the Accelerator, resume, the loss scaling, bad steps, stopping,
checkpoints, export) is the stage scaffold's (``training/run.py``).

Departures from the paper (Shao et al. 2024), on purpose:
- with num_iterations == 1 the "old" policy is the current one detached (ratio == 1), so no
  extra forward pass is spent on old log-probs (as TRL);
- the loss aggregation is chosen by name (grpo | dr_grpo | dapo), and the normalisers are the
  global counts of the whole step, so micro-batch x accumulation x processes does not change
  the gradient;
- dropping zero-variance groups ("dynamic sampling", DAPO) masks them out of the loss instead of
  re-sampling: every process still runs the same number of forward/backward passes.
"""

from __future__ import annotations

import json
import time

import torch

from stagewise.config import RunConfig
from stagewise.domains.base import Domain
from stagewise.generation.chat_template import eos_ids
from stagewise.generation.engines import SamplingParams
from stagewise.models import load_model, replicated_init
from stagewise.parallel import runtime
from stagewise.parallel.collectives import gather_rows, reduce_sum
from stagewise.registry import lookup
from stagewise.rl.advantages import zero_variance_groups
from stagewise.rl.episodes import EpisodeLimits
from stagewise.rl.logprobs import PolicyLogprobs
from stagewise.rl.losses import engine_mismatch, masked_sum, per_token_loss
from stagewise.rl.rollout import EPISODE_STATS, RolloutBatch, StageRewards, check_sampling_stage, generate_rollouts
from stagewise.seeds import completion_seeds, prompt_rng, task_order_rng
from stagewise.tracking import is_main
from stagewise.training.run import StageRun
from stagewise.training.stage import StageJob, StageResult
from stagewise.training.step_stats import reduce_step_stats

# --- the stage ---------------------------------------------------------------------------------


def train_grpo_stage(job: StageJob) -> StageResult:
    cfg, tok = job.cfg, job.tokenizer
    rollout_cfg, grpo_cfg = job.part("rollout"), job.part("grpo")
    total_steps = cfg.stage_steps(job.index)
    world = runtime.world_size_from_env()
    group_size = rollout_cfg.num_generations
    groups_local = rollout_cfg.prompts_per_step // world  # each process samples whole groups
    rows_local = groups_local * group_size
    micro = grpo_cfg.micro_batch_size
    accumulation = rows_local // micro

    run = StageRun(job, lambda: PolicyLogprobs(load_model(job.init_path, cfg.model)), micro_batch=micro,
                   accumulation=accumulation, total_steps=total_steps,
                   optimizer_steps=total_steps * grpo_cfg.num_iterations)
    advantage_fn, aggregate = lookup("advantage", grpo_cfg.advantage), lookup("loss", grpo_cfg.loss)
    reference = load_reference(job, run)
    engine = lookup("rollout_engine", rollout_cfg.engine)(run.strategy, tokenizer=tok, rollout=rollout_cfg,
                                                          seed=cfg.seed, model_path=job.init_path)
    sampling = SamplingParams(max_new_tokens=rollout_cfg.max_new_tokens, temperature=rollout_cfg.temperature,
                              top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k, stop_token_ids=tuple(eos_ids(tok)))
    limits = EpisodeLimits(max_turns=rollout_cfg.max_turns, max_tokens=rollout_cfg.max_episode_tokens,
                           max_tool_errors=rollout_cfg.max_tool_errors)
    shared = prefix_sharing(grpo_cfg.shared_prefix)
    domains = job.domains + job.replay_domains
    multi_turn = any(d.environment is not None for d in domains)
    rewards = StageRewards(job.domains, total_steps, replayed=job.replay_domains, rank=run.rank,
                           local_rank=run.strategy.acc.local_process_index)
    # the most policy tokens an episode can hold (Dr. GRPO's constant normaliser)
    policy_budget = (min(rollout_cfg.max_turns * rollout_cfg.max_new_tokens, rollout_cfg.max_episode_tokens)
                     if multi_turn else rollout_cfg.max_new_tokens)

    while not run.finished:
        step = run.begin_step()

        # 1. rollout: this process's contiguous share of the step's groups
        examples = pick_examples(job, step, rollout_cfg.prompts_per_step, job.stage.replay)
        mine = examples[run.rank * groups_local:(run.rank + 1) * groups_local]
        seeds = completion_seeds(cfg.seed, job.index, step, run.rank * rows_local, rows_local)
        with engine.generator() as generator:  # the weights as they are now
            batch = generate_rollouts(generator, tok, mine, num_generations=group_size, params=sampling,
                                      limits=limits, seeds=seeds, device=run.device, context=rewards.begin_step(step))
        gen_time = run.elapsed()

        # 2. advantages on the gathered rewards: a group's rows are never normalised apart
        all_rewards = gather_rows(batch.rewards.to(run.device)).cpu()
        advantages, adv_stats = advantage_fn(all_rewards, group_size)
        lo, hi = run.rank * rows_local, (run.rank + 1) * rows_local
        batch.advantages = advantages[lo:hi].to(run.device)
        batch.loss_mask = loss_mask(batch.completion_mask * batch.policy_mask, batch.truncated, all_rewards, group_size,
                                    lo, hi, drop_zero_variance=grpo_cfg.drop_zero_variance_groups,
                                    mask_truncated=rollout_cfg.mask_truncated_completions)
        n_seq, n_tok = global_counts(batch.loss_mask, run.device)

        # 3. log-probs that stay fixed during the step (only when they are needed)
        add_fixed_logprobs(batch, run, reference, grpo_cfg, rollout_cfg.temperature, shared)

        # 4. optimise: num_iterations passes, each = `accumulation` micro-batches = one optimizer step
        train_start = time.time()
        sums = LossSums(run.device)
        for _ in range(grpo_cfg.num_iterations):
            for k, mb in enumerate(batch.micro_batches(micro)):
                with run.accumulate():
                    logp, entropy = run.model(*policy_inputs(mb, rollout_cfg.temperature), with_entropy=True,
                                              **shared)
                    token_loss, stats = per_token_loss(logp, mb.old_logp, mb.advantages, epsilon_low=grpo_cfg.epsilon,
                                                       epsilon_high=grpo_cfg.clip_high, beta=grpo_cfg.beta,
                                                       ref_logp=mb.ref_logp, mask=mb.loss_mask,
                                                       kl_ratio_weighted=grpo_cfg.kl_ratio_weighted)
                    tis = gap = None
                    if mb.engine_logp is not None:  # sampled by another engine (vllm): measure, maybe correct
                        tis, gap = engine_mismatch(logp if mb.old_logp is None else mb.old_logp, mb.engine_logp,
                                                   mb.loss_mask, grpo_cfg.tis_cap)
                        token_loss = token_loss * tis
                    loss = aggregate(token_loss, mb.loss_mask, num_sequences=n_seq, num_tokens=n_tok,
                                     num_rows=rollout_cfg.prompts_per_step * group_size, max_len=policy_budget)
                    loss = run.backward(loss, last=k == accumulation - 1)
                sums.add(mb.loss_mask, loss / grpo_cfg.num_iterations, stats, entropy, gap, tis)
            run.optimizer_step()
        train_time = time.time() - train_start

        # 5. metrics (one collective), then the scaffold logs, stops or checkpoints
        metrics = step_metrics(batch, all_rewards, adv_stats, sums, run=run, rewards=rewards, multi_turn=multi_turn,
                               picked=mine, group_size=group_size,
                               gen_time=gen_time, train_time=train_time, engine_timings=engine.timings)
        if cfg.logging.dump_rollouts:
            dump_rollouts(job, step + 1, batch, mine, group_size)
        if run.end_step(metrics, samples=rollout_cfg.prompts_per_step * group_size, curve=rewards.curve(metrics),
                        progress={"reward": metrics["reward"], **rewards.progress(metrics), "loss": metrics["loss"],
                                  "tok_s": metrics["tokens_per_s"]}):
            return run.stopped()
    return run.finish(tok)


# --- pieces the loop uses ----------------------------------------------------------------------


def pick_examples(job: StageJob, step: int, n: int, replay: float) -> list[tuple[Domain, dict]]:
    """The step's global prompt list: a pure function of (seed, stage, step), so the data position
    is the step counter and every process agrees without communicating.

    ``round(n * replay)`` of the n draws come from the earlier stages' domains (``replay_domains``),
    the rest from the stage's own. Within each pool the draws go round the domains in turn (equal
    shares), and each domain deals its training tasks in a shuffled order, every task once before
    any is drawn again (an epoch; reshuffled each epoch), as a sampler over a dataset does: no task
    is drawn twice in one step while others wait, and a stage of E epochs of a domain's tasks shows
    each task E times.
    """
    n_replay = round(n * replay) if job.replay_domains else 0
    seed, stage = job.cfg.seed, job.index
    out = (_deal(job.replay_domains, step * n_replay, n_replay, seed, stage)
           + _deal(job.domains, step * (n - n_replay), n - n_replay, seed, stage))
    prompt_rng(seed, stage, step).shuffle(out)
    return out


def _deal(pool: list[Domain], first: int, count: int, seed: int, stage: int) -> list[tuple[Domain, dict]]:
    """Draws first .. first + count - 1 of a pool of domains: draw j is domain j % len(pool)'s
    (j // len(pool))-th task in its epoch-by-epoch shuffled order."""
    out, orders = [], {}
    for j in range(first, first + count):
        dom = pool[j % len(pool)]
        k, size = j // len(pool), len(dom.train)
        key = (dom.name, k // size)
        if key not in orders:
            orders[key] = list(range(size))
            task_order_rng(seed, stage, dom.name, k // size).shuffle(orders[key])
        out.append((dom, dom.train[orders[key][k % size]]))
    return out


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, all_rewards: torch.Tensor, group_size: int,
              lo: int, hi: int, *, drop_zero_variance: bool, mask_truncated: bool) -> torch.Tensor:
    """Which completion tokens of this process's rows [lo, hi) enter the loss.

    completion_mask (B, C) (the policy's own tokens), truncated (B,), all_rewards (B_global,) -> (B, C) float.
    A row is dropped whole when its group has zero reward variance (dynamic sampling) or when it
    hit max_new_tokens without EOS (mask_truncated_completions).
    """
    keep = torch.ones(hi - lo, dtype=torch.bool)
    if drop_zero_variance:
        keep &= ~zero_variance_groups(all_rewards, group_size)[lo:hi]
    if mask_truncated:
        keep &= ~truncated.cpu()
    return (completion_mask.bool() & keep[:, None].to(completion_mask.device)).float()


def global_counts(mask: torch.Tensor, device) -> tuple[int, int]:
    """(sequences with a token in the loss, tokens in the loss) over every process: the loss normalisers."""
    counts = reduce_sum(torch.tensor([float((mask.sum(-1) > 0).sum()), float(mask.sum())], device=device))
    return int(counts[0].item()), int(counts[1].item())


def policy_inputs(mb: RolloutBatch, temperature: float) -> tuple:
    """The arguments of ``PolicyLogprobs.forward`` for a micro-batch."""
    return mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask, temperature


def prefix_sharing(enabled: bool) -> dict:
    """PolicyLogprobs' sharing arguments: the shared-prefix forward unless switched off."""
    return {"share_prefix": enabled}


def load_reference(job: StageJob, run: StageRun):
    """The KL term's reference model (bf16 under bf16 compute, frozen, wrapped as the policy is; a
    whole copy on every rank, partitioned over them under ZeRO-3 and FSDP), or None: when beta is 0,
    and under LoRA when the reference is the stage's starting weights (the model with its adapters
    switched off is exactly that: stage 1, or reference: previous_stage)."""
    cfg, grpo_cfg = job.cfg, job.part("grpo")
    if grpo_cfg.beta == 0 or (run.strategy.is_lora and job.ref_path == job.init_path):
        return None
    with replicated_init():
        ref = load_model(job.ref_path, cfg.model.model_copy(update={"lora": None, "gradient_checkpointing": False}),
                         dtype=runtime.frozen_dtype(cfg.dist))
    ref = run.strategy.frozen(PolicyLogprobs(ref))
    fractions = gather_rows(torch.tensor([run.strategy.param_fraction(ref)], device=run.device)).cpu().tolist()
    job.tracker.log({"stage": job.index + 1, "reference_param_fraction_per_rank": fractions},
                    step=job.global_step_offset)
    return ref


def fixed_logprobs(forward, batch: RolloutBatch, micro_batch: int) -> torch.Tensor:
    """forward(micro-batch) -> (log-probs, _), run without gradients over the batch: (B, C) fp32."""
    width, out = batch.completion_ids.size(1), []
    with torch.no_grad():
        for mb in batch.micro_batches(micro_batch):
            lp = forward(mb)[0].float()
            out.append(torch.nn.functional.pad(lp, (0, width - lp.size(1))))
    return torch.cat(out)


def add_fixed_logprobs(batch: RolloutBatch, run: StageRun, reference, grpo_cfg, temperature: float,
                       shared: dict) -> None:
    """The old policy's log-probs (num_iterations > 1) and the reference's (beta > 0), before any update."""
    micro = grpo_cfg.micro_batch_size

    def policy(mb):
        return run.model(*policy_inputs(mb, temperature), **shared)

    if grpo_cfg.num_iterations > 1:
        batch.old_logp = fixed_logprobs(policy, batch, micro)
    if reference is not None:
        batch.ref_logp = fixed_logprobs(
            lambda mb: reference(*policy_inputs(mb, temperature), **shared), batch, micro)
    elif grpo_cfg.beta > 0:  # LoRA: the reference is the model with its adapters switched off
        with run.strategy.lm.disable_adapter():
            batch.ref_logp = fixed_logprobs(policy, batch, micro)


class LossSums:
    """Token sums of one step's loss statistics, added micro-batch by micro-batch (this process)."""

    NAMES = ("loss", "clipped", "kl", "entropy", "tokens", "engine_gap", "tis_weight")

    def __init__(self, device):
        self.values = {name: torch.zeros((), device=device) for name in self.NAMES}

    def add(self, mask: torch.Tensor, loss: torch.Tensor, stats: dict, entropy: torch.Tensor, gap, tis) -> None:
        """mask (B, C): the loss mask; stats: per_token_loss's (B, C) tensors; gap / tis: the engine
        mismatch (B, C) or None."""
        parts = {"loss": loss.detach().float(), "clipped": masked_sum(stats["clipped"], mask),
                 "entropy": masked_sum(entropy, mask), "tokens": mask.sum()}
        if "kl" in stats:
            parts["kl"] = masked_sum(stats["kl"], mask)
        if gap is not None:
            parts.update(engine_gap=masked_sum(gap, mask), tis_weight=masked_sum(tis, mask))
        for name, value in parts.items():
            self.values[name] = self.values[name] + value.to(self.values[name].device)


def step_metrics(batch: RolloutBatch, all_rewards: torch.Tensor, adv_stats: dict, sums: LossSums, *, run: StageRun,
                 rewards: StageRewards, multi_turn: bool, picked: list, group_size: int, gen_time: float,
                 train_time: float, engine_timings: dict) -> dict:
    """The step's metrics from every process, gathered in one collective (the reward parts of the
    stage's domains: NaN where a row's domain has no such part; ``log_metric``'s values in a second
    one, where a reward function may have logged)."""
    rows = {"length": batch.completion_mask.sum(-1).float(), "truncated": batch.truncated.float(),
            **rewards.part_rows(batch, picked, group_size),
            **({f"episode/{s}": batch.episode_stats[s] for s in EPISODE_STATS} if multi_turn else {})}
    total, gathered = reduce_step_stats(run.device, sums=sums.values, rows=rows)
    tokens = max(total["tokens"], 1)
    lengths = gathered.pop("length")
    step_time = run.elapsed()
    metrics = {"reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
               **rewards.metrics(gathered)}
    metrics.update({name: values.mean().item() for name, values in gathered.items() if name.startswith("episode/")})
    metrics.update({
        "loss": total["loss"], "clip_ratio": total["clipped"] / tokens, "kl": total["kl"] / tokens,
        "entropy": total["entropy"] / tokens,
        "completion_len_mean": lengths.mean().item(), "completion_len_max": lengths.max().item(),
        "truncated_frac": gathered["truncated"].mean().item(), **adv_stats,
        "step_time": step_time, "gen_time": gen_time, "train_time": train_time,
        "tokens_per_s": float(lengths.sum()) / step_time, "completions_per_s": all_rewards.numel() / step_time,
    })
    if batch.engine_logp is not None:  # how far the engine's numbers are from the trainer's
        metrics.update({"engine/logp_abs_diff": total["engine_gap"] / tokens,
                        "engine/tis_weight": total["tis_weight"] / tokens})
    metrics.update(engine_timings)
    return rewards.with_logged(metrics)


def dump_rollouts(job: StageJob, step: int, batch: RolloutBatch, mine, group_size: int) -> None:
    """rollouts.jsonl on rank 0: every completion of the step, gathered from all processes."""
    from accelerate.utils import gather_object

    rows = [{"prompt": ex.get("prompt"), "domain": dom.name, "completion": batch.texts[g * group_size + j],
             "reward": batch.rewards[g * group_size + j].item(),
             "advantage": batch.advantages[g * group_size + j].item(),
             # the columns reward functions added with log_extra (TRL's completions table)
             **({"extra": batch.extras[g * group_size + j]} if batch.extras and batch.extras[g * group_size + j]
                else {})}
            for g, (dom, ex) in enumerate(mine) for j in range(group_size)]
    rows = gather_object(rows)
    if is_main():
        with (job.out_dir.parent / "rollouts.jsonl").open("a") as fh:
            for r in rows:
                fh.write(json.dumps({"stage": job.index + 1, "step": step, **r}, default=str) + "\n")


def check_grpo_stage(cfg: RunConfig, i: int, world: int) -> None:
    """Batch shapes of stage i for `world` processes (before any model loads)."""
    grpo_cfg = cfg.stage_part(i, "grpo")
    check_sampling_stage(cfg, i, world, grpo_cfg.micro_batch_size, "grpo.micro_batch_size",
                         "completions each process trains on per step")

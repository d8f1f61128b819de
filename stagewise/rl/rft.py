"""One rejection-sampling fine-tuning stage (RFT, expert iteration): the loop to read top to bottom.

    result = train_rft_stage(job)      # called by the curriculum for every `kind: rft` stage

Each step (a round):  sample prompts  ->  G episodes each from the current policy  ->  rewards  ->
keep the episodes that pass (``rft.keep: pass``: the domain's metric reaches 1.0) or each group's
best (``best``: the highest reward of the group, when it reaches ``rft.min_reward``), never an
environment's episode cut off by a limit (``unfinished_rows``)  ->  one
optimizer step of supervised learning on the kept episodes' policy tokens and on ``rft.demos_per_step``
demonstrations (``rft.demos``: reference conversations, e.g. the warm-up's; their assistant tokens)
(the mean negative log-likelihood over every process)  ->  metrics, checkpoint. A round in which no
process has anything to learn takes no optimizer step.

What it shares with GRPO: the rollout engines, the episodes (tool calls, simulated customers), the
prompt choice and replay (``grpo.pick_examples``), the batch tensors and the stage scaffold. What
it does not have: advantages, ratios, a reference model. Every process runs the same number of
forward / backward passes, as DDP, ZeRO's fixed accumulation and FSDP need: the rows to learn (kept
episodes, then demonstrations) fill the first micro-batches and the rest are two-token placeholders
(``learn_micro_batches``), so rows that were not kept cost nothing.
"""

from __future__ import annotations

import time

import torch

from stagewise.config import RunConfig
from stagewise.errors import ConfigError
from stagewise.generation.chat_template import eos_ids
from stagewise.generation.engines import SamplingParams
from stagewise.generation.padding import left_pad, right_pad
from stagewise.models import load_model
from stagewise.parallel import runtime
from stagewise.parallel.collectives import gather_rows, reduce_sum
from stagewise.registry import lookup
from stagewise.rl.episodes import EpisodeLimits
from stagewise.rl.grpo import global_counts, pick_examples, policy_inputs, prefix_sharing
from stagewise.rl.logprobs import PolicyLogprobs
from stagewise.rl.rollout import RolloutBatch, StageRewards, check_sampling_stage, generate_rollouts, placeholder_row
from stagewise.seeds import completion_seeds, replay_rng
from stagewise.sft.data import tokenize_example
from stagewise.training.run import StageRun
from stagewise.training.stage import StageJob, StageResult
from stagewise.training.step_stats import reduce_step_stats


def train_rft_stage(job: StageJob) -> StageResult:
    cfg, tok = job.cfg, job.tokenizer
    rollout_cfg, rft_cfg = job.part("rollout"), job.part("rft")
    total_steps = cfg.stage_steps(job.index)
    world = runtime.world_size_from_env()
    group_size = rollout_cfg.num_generations
    groups_local = rollout_cfg.prompts_per_step // world
    rows_local = groups_local * group_size
    micro = rft_cfg.micro_batch_size
    accumulation = rft_accumulation(cfg, job.index, world)
    demos_local = rft_cfg.demos_per_step // world
    demos = demonstrations(job, cfg.stage_part(job.index, "sft").max_seq_len)

    run = StageRun(job, lambda: PolicyLogprobs(load_model(job.init_path, cfg.model)), micro_batch=micro,
                   accumulation=accumulation, total_steps=total_steps,
                   describe=f"keep {rft_cfg.keep}" + (f" >= {rft_cfg.min_reward}" if rft_cfg.keep == "best" else ""))
    engine = lookup("rollout_engine", rollout_cfg.engine)(run.strategy, tokenizer=tok, rollout=rollout_cfg,
                                                          seed=cfg.seed, model_path=job.init_path)
    sampling = SamplingParams(max_new_tokens=rollout_cfg.max_new_tokens, temperature=rollout_cfg.temperature,
                              top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k, stop_token_ids=tuple(eos_ids(tok)))
    limits = EpisodeLimits(max_turns=rollout_cfg.max_turns, max_tokens=rollout_cfg.max_episode_tokens,
                           max_tool_errors=rollout_cfg.max_tool_errors)
    shared = prefix_sharing(rft_cfg.shared_prefix)
    rewards = StageRewards(job.domains, total_steps, replayed=job.replay_domains, rank=run.rank,
                           local_rank=run.strategy.acc.local_process_index)

    while not run.finished:
        step = run.begin_step()

        # 1. rollout: this process's contiguous share of the round's groups
        examples = pick_examples(job, step, rollout_cfg.prompts_per_step, job.stage.replay)
        mine = examples[run.rank * groups_local:(run.rank + 1) * groups_local]
        seeds = completion_seeds(cfg.seed, job.index, step, run.rank * rows_local, rows_local)
        with engine.generator() as generator:
            batch = generate_rollouts(generator, tok, mine, num_generations=group_size, params=sampling,
                                      limits=limits, seeds=seeds, device=run.device, context=rewards.begin_step(step))
        gen_time = run.elapsed()

        # 2. which episodes are demonstrations
        passed = torch.tensor([dom.succeeded({k: float(v[g * group_size + j]) for k, v in batch.reward_parts.items()})
                               if rft_cfg.keep == "pass" else False
                               for g, (dom, _) in enumerate(mine) for j in range(group_size)])
        keep = kept_rows(batch.rewards.cpu(), passed, group_size, rft_cfg.keep, rft_cfg.min_reward,
                         unfinished=unfinished_rows(mine, group_size, batch.truncated.cpu()))
        batch.loss_mask = (batch.completion_mask * batch.policy_mask) * keep[:, None].to(run.device).float()
        n_seq, n_kept_tok = global_counts(batch.loss_mask, run.device)
        shown = [demos[(step * rft_cfg.demos_per_step + j) % len(demos)]
                 for j in range(run.rank * demos_local, (run.rank + 1) * demos_local)] if demos else []
        n_demo_tok = int(reduce_sum(torch.tensor(float(sum(sum(m) for _, _, m in shown)), device=run.device)).item())
        n_tok = n_kept_tok + n_demo_tok

        # 3. learn the kept episodes and the demonstrations: one optimizer step (none when nothing is learnt)
        train_start, loss_sum = time.time(), torch.zeros((), device=run.device)
        if n_tok > 0:
            rows = kept_episodes(batch, keep) + shown
            for k, mb in enumerate(learn_micro_batches(batch, rows, micro, accumulation, tok.pad_token_id)):
                with run.accumulate():
                    logp, _ = run.model(*policy_inputs(mb, 1.0), **shared)
                    loss = -(logp * mb.loss_mask).sum() / n_tok
                    loss = run.backward(loss, last=k == accumulation - 1)
                loss_sum = loss_sum + loss.detach().float()
            run.optimizer_step()
        train_time = time.time() - train_start

        # 4. metrics (one collective), then the scaffold logs, stops or checkpoints
        all_rewards = gather_rows(batch.rewards.to(run.device)).cpu()
        total, gathered = reduce_step_stats(run.device, sums={"loss": loss_sum, "kept_reward": (batch.rewards.to(
            run.device) * keep.to(run.device)).sum()}, rows=rewards.part_rows(
            batch, mine, group_size))
        step_time = run.elapsed()
        lengths = batch.completion_mask.sum().item()
        metrics = {"reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                   "keep_rate": n_seq / all_rewards.numel(), "kept": n_seq, "kept_tokens": n_kept_tok,
                   "demo_tokens": n_demo_tok,
                   "kept_reward": total["kept_reward"] / max(n_seq, 1), "loss": total["loss"],
                   "step_time": step_time, "gen_time": gen_time, "train_time": train_time,
                   "tokens_per_s": lengths * world / step_time, **rewards.metrics(gathered), **engine.timings}
        metrics = rewards.with_logged(metrics)
        if run.end_step(metrics, samples=rollout_cfg.prompts_per_step * group_size, curve=rewards.curve(metrics),
                        progress={"reward": metrics["reward"], **rewards.progress(metrics),
                                  "keep": metrics["keep_rate"]}):
            return run.stopped()
    return run.finish(tok)


def rft_accumulation(cfg: RunConfig, i: int, world: int) -> int:
    """Micro-batches per process per round of stage i: room for every sampled row (keep: pass can
    keep them all) and the process's share of the demonstrations."""
    rollout_cfg, rft_cfg = cfg.stage_part(i, "rollout"), cfg.stage_part(i, "rft")
    rows = rollout_cfg.prompts_per_step // world * rollout_cfg.num_generations + rft_cfg.demos_per_step // world
    return -(-rows // rft_cfg.micro_batch_size)


def demonstrations(job: StageJob, max_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """The stage's rft.demos (their training examples, tokenized as an sft stage does) as rows to
    learn, (prompt, rest, learnt) token lists split at the first
    learnt token, in a fixed shuffled order (seed, stage); [] when there are none. A conversation
    longer than max_len (sft.max_seq_len) is cut there, as SFT would; one with nothing left to learn
    is dropped."""
    names = job.part("rft").demos
    if not names:
        return []
    pool = [ex for name in names for ex in job.domains_by_name[name].train]
    replay_rng(job.cfg.seed, job.index).shuffle(pool)
    rows = []
    for ex in pool:
        t = tokenize_example(job.tokenizer, ex, max_len)
        if t is not None:
            ids, train = t
            start = train.index(True)
            rows.append((ids[:start], ids[start:], [int(x) for x in train[start:]]))
    if not rows:
        raise ConfigError(f"{job.label}: no demonstration of rft.demos ({', '.join(names)}) has an assistant "
                          f"token within sft.max_seq_len={max_len}")
    return rows


def kept_episodes(batch: RolloutBatch, keep: torch.Tensor) -> list[tuple[list[int], list[int], list[int]]]:
    """The kept rows of a rollout batch as (prompt, rest, learnt) token lists (learnt: the policy's tokens)."""
    out = []
    for i in keep.nonzero().squeeze(1).tolist():
        n = int(batch.completion_mask[i].sum())
        out.append((batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist(), batch.completion_ids[i, :n].tolist(),
                    batch.policy_mask[i, :n].tolist()))
    return out


def learn_micro_batches(batch: RolloutBatch, rows: list, micro: int, accumulation: int,
                        pad_id: int) -> list[RolloutBatch]:
    """The ``accumulation`` micro-batches of a round: ``rows`` ((prompt, rest, learnt) token lists),
    ``micro`` at a time, then two-token placeholders (every process runs as many forward / backward
    passes as the others)."""
    if len(rows) > micro * accumulation:
        raise ValueError(f"{len(rows)} rows to learn do not fit {accumulation} micro-batches of {micro}")
    return [rows_batch(rows[k * micro:(k + 1) * micro], pad_id, batch.prompt_ids.device)
            if rows[k * micro:(k + 1) * micro] else placeholder_row(batch) for k in range(accumulation)]


def rows_batch(rows: list, pad_id: int, device) -> RolloutBatch:
    """(prompt, rest, learnt) token lists -> a RolloutBatch to learn: prompts left-padded, the rest
    right-padded, loss_mask on the learnt tokens; its prompt and completion columns as narrow as its rows."""
    prompt_ids, prompt_mask = left_pad([p for p, _, _ in rows], pad_id, device)
    comp, cmask = right_pad([rest for _, rest, _ in rows], pad_id, device, min_width=1)
    learnt, _ = right_pad([mask for _, _, mask in rows], 0, device, min_width=1)
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp,
                        completion_mask=cmask, policy_mask=learnt, truncated=torch.zeros(len(rows), dtype=torch.bool),
                        rewards=torch.zeros(len(rows)), loss_mask=learnt.float())


def kept_rows(rewards: torch.Tensor, passed: torch.Tensor, group_size: int, keep: str,
              min_reward: float, unfinished: torch.Tensor | None = None) -> torch.Tensor:
    """rewards (B,), passed (B,) bool, rows of a group contiguous -> (B,) bool: the demonstrations.
    pass: the rows that passed; best: each group's first highest-reward row, when it reaches min_reward.
    unfinished (B,) bool: rows that are never kept, whatever their reward."""
    eligible = torch.ones_like(passed, dtype=torch.bool) if unfinished is None else ~unfinished.bool()
    if keep == "pass":
        return passed.bool() & eligible
    groups = rewards.float().masked_fill(~eligible, float("-inf")).view(-1, group_size)
    best = groups.argmax(dim=1)
    out = torch.zeros_like(groups, dtype=torch.bool)
    out[torch.arange(groups.size(0)), best] = groups.max(dim=1).values >= min_reward
    return out.view(-1)


def unfinished_rows(examples: list, group_size: int, truncated: torch.Tensor) -> torch.Tensor:
    """examples: (domain, example) per group; truncated (B,) -> (B,) bool: the environment episodes cut
    off by a limit (rollout.max_turns, max_episode_tokens, a turn's max_new_tokens). They never ended:
    learning one teaches going on (a tau2 agent that made every expected call and never answered
    earns partial credit, and can be its group's best). A single-turn completion cut at
    max_new_tokens is its answer as scored, and stays eligible."""
    env = torch.tensor([dom.environment is not None for dom, _ in examples for _ in range(group_size)],
                       dtype=torch.bool)
    return env & truncated.bool()


def check_rft_stage(cfg: RunConfig, i: int, world: int) -> None:
    """Batch shapes of stage i for `world` processes (before any model loads)."""
    if cfg.stages[i].epochs is not None:
        raise ConfigError(f"stages.{i}: an rft stage runs rounds: give steps or tasks_per_domain, not epochs")
    rft_cfg = cfg.stage_part(i, "rft")
    if rft_cfg.demos_per_step % world:
        raise ConfigError(f"stages.{i}: rft.demos_per_step={rft_cfg.demos_per_step} must be divisible by the {world} "
                          f"processes")
    check_sampling_stage(cfg, i, world, rft_cfg.micro_batch_size, "rft.micro_batch_size",
                         "episodes each process samples per round", accumulation=rft_accumulation(cfg, i, world))


def check_rft_domains(cfg: RunConfig, i: int, domains: dict) -> None:
    """keep: pass needs every domain of the stage to have an accuracy metric; rft.demos must name
    domains with training examples to learn (answers or conversations, as an sft stage's)."""
    for name in cfg.stage_part(i, "rft").demos:
        dom = domains.get(name)
        if dom is None:
            raise ConfigError(f"stages.{i}: rft.demos names {name!r}, which is not a domain (known: "
                              f"{', '.join(domains)})")
        if dom.environment is not None and not all("messages" in t for t in dom.train):
            raise ConfigError(f"stages.{i}: rft.demos domain {name!r} is an environment; demonstrations are "
                              f"reference answers or conversations (`stagewise demos` writes them)")
        if not dom.train:
            raise ConfigError(f"stages.{i}: rft.demos domain {name!r} has no training examples")
    if cfg.stage_part(i, "rft").keep != "pass":
        return
    for name in cfg.stages[i].domains:
        if domains[name].metric is None:
            raise ConfigError(f"stages.{i}: rft.keep=pass needs domain {name} to have an accuracy metric; it has "
                              f"none (use rft.keep=best with rft.min_reward)")

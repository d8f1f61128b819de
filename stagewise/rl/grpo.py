"""One GRPO stage: the training loop to read top to bottom.

    result = train_grpo_stage(job)      # called by the curriculum for every `kind: grpo` stage

Each step:  sample prompts  ->  generate G completions each  ->  rewards  ->  gather rewards of
all processes  ->  advantages per group  ->  (old / reference log-probs when needed)  ->
micro-batches with gradient accumulation  ->  clip, AdamW, schedule  ->  metrics, checkpoint.

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

import copy
import random
import time
from contextlib import contextmanager, nullcontext

import torch

from stagewise import faults
from stagewise.checkpoint import export_model, latest_checkpoint, load_checkpoint, save_checkpoint
from stagewise.config import RunConfig
from stagewise.continual.stage import StageJob, StageKind
from stagewise.domains import Domain
from stagewise.errors import ConfigError, TrainingError
from stagewise.models import load_model, load_model_config, replicated_init
from stagewise.optim import make_adamw, make_scheduler
from stagewise.parallel import runtime
from stagewise.parallel.engine import TrainEngine
from stagewise.parallel.stop import agreed_stop
from stagewise.registry import lookup, register
from stagewise.rl import advantages as _adv  # noqa: F401  (registers advantages)
from stagewise.rl import losses as _losses  # noqa: F401  (registers loss aggregations)
from stagewise.rl.logprobs import PolicyLogprobs, completion_logprobs
from stagewise.rl.advantages import zero_variance_groups
from stagewise.rl.losses import engine_mismatch, masked_sum, per_token_loss
from stagewise.rl import vllm_engine  # noqa: F401  (registers rollout.engine: vllm)
from stagewise.rl.engines import SamplingParams
from stagewise.rl.episodes import EpisodeLimits
from stagewise.rl.prompts import eos_ids
from stagewise.rl.rollout import RolloutBatch, generate_rollouts
from stagewise.tracking import PeakMemory, StepProgress, print0


# --- pieces the loop uses ----------------------------------------------------------------------


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


def pick_examples(job: StageJob, step: int, n: int, replay: float) -> list[tuple[Domain, dict]]:
    """The step's global prompt list: a pure function of (seed, stage, step), so the data position
    is the step counter and every process agrees without communicating."""
    rng = random.Random(f"{job.cfg.seed}:{job.index}:{step}")
    n_replay = round(n * replay) if job.replay_domains else 0
    out = []
    for i in range(n):
        pool = job.replay_domains if i < n_replay else job.domains
        dom = pool[rng.randrange(len(pool))]
        out.append((dom, dom.train[rng.randrange(len(dom.train))]))
    rng.shuffle(out)
    return out


def completion_seeds(seed: int, stage: int, step: int, first_row: int, count: int) -> list[int]:
    """One sampling seed per completion, keyed by its global row: independent of process count."""
    base = (seed * 1_000_003 + stage * 65_537 + step * 8_191) % (2**61)
    return [(base * 31 + first_row + i) % (2**61) for i in range(count)]


class RolloutWeights:
    """Weights used for sampling.

    bf16_copy: a bf16 replica of the policy that exists only while sampling. Decoding is
    latency-bound: bf16 weights halve memory traffic and skip autocast's per-call weight casts
    (2.1 s vs 3.3 s fp32 for 32 x 24 tokens on the 2-core CPU). Its tensors are filled from the
    current fp32 weights when sampling starts (~50 ms) and freed when it ends, so the replica
    never adds to the training step's peak memory. Otherwise ("policy"): the training module
    itself, under the run's autocast. Neither touches the training module's wrappers.
    """

    def __init__(self, engine: TrainEngine, choice: str, mixed_precision: str):
        self.engine = engine
        lm = engine.lm
        if choice == "auto":
            fp32_params = next(lm.parameters()).dtype == torch.float32
            plain = engine.strategy in ("single", "ddp") and not engine.is_lora
            choice = "bf16_copy" if (plain and fp32_params and mixed_precision == "bf16") else "policy"
        self.choice = choice
        self.copy = None
        if choice == "bf16_copy":  # built once, before the optimizer has allocated its states
            self.copy = copy.deepcopy(lm).to(torch.bfloat16).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)
            self._release()

    @contextmanager
    def sampling_model(self):
        """The module to sample from, with the current weights, for the duration of the block."""
        if self.copy is None:
            with self.engine.acc.autocast(), self.engine.lm_for_direct_calls() as lm:
                yield lm
            return
        with torch.no_grad():
            for c, p in zip(self.copy.parameters(), self.engine.lm.parameters()):
                c.data = p.detach().to(torch.bfloat16)
        try:
            yield self.copy
        finally:
            self._release()

    def _release(self) -> None:
        for c in self.copy.parameters():
            c.data = torch.empty(0, dtype=torch.bfloat16, device=c.device)


def log_stage_start(engine: TrainEngine, job: StageJob) -> None:
    """Record which fraction of the parameters each rank holds (1/N under ZeRO-3 / FSDP, 1 otherwise)
    and the dtype of the weights the optimizer updates (collective)."""
    acc = engine.acc
    total = sum(getattr(p, "ds_numel", p.numel()) for p in engine.model.parameters())
    fractions = acc.gather(torch.tensor([engine.param_fraction()], device=acc.device)).cpu().tolist()
    master = str(engine.master_dtype()).removeprefix("torch.")
    job.tracker.log({"stage": job.index + 1, "param_fraction_per_rank": fractions, "params_total": total,
                     "master_dtype": master}, step=job.global_step_offset)


def dump_rollouts(acc, job: StageJob, step: int, batch: RolloutBatch, mine, G: int) -> None:
    """rollouts.jsonl on rank 0: every completion of the step, gathered from all processes."""
    from accelerate.utils import gather_object

    rows = [{"prompt": ex.get("prompt"), "domain": dom.name, "completion": batch.texts[g * G + j],
             "reward": batch.rewards[g * G + j].item(), "advantage": batch.advantages[g * G + j].item()}
            for g, (dom, ex) in enumerate(mine) for j in range(G)]
    rows = gather_object(rows)
    if acc.is_main_process:
        import json

        with (job.out_dir.parent / "rollouts.jsonl").open("a") as fh:
            for r in rows:
                fh.write(json.dumps({"stage": job.index + 1, "step": step, **r}) + "\n")


def make_all_done(device, lockstep: bool):
    """Under ZeRO-3 / FSDP all ranks must decode the same number of steps (the synced_gpus role)."""
    if not lockstep:
        return None

    def all_done(local: bool) -> bool:
        flag = torch.tensor([0.0 if local else 1.0], device=device)
        return bool(runtime.reduce_sum(flag).item() == 0)

    return all_done


def check_grpo_stage(cfg: RunConfig, i: int, world: int) -> None:
    """Batch shapes of stage i for `world` processes (before any model loads)."""
    ro, gc = cfg.stage_part(i, "rollout"), cfg.stage_part(i, "grpo")
    if ro.prompts_per_step % world:
        raise ConfigError(f"stages.{i}: rollout.prompts_per_step={ro.prompts_per_step} must be divisible by "
                          f"the {world} processes (groups are kept whole per process)")
    rows = ro.prompts_per_step // world * ro.num_generations
    if rows % gc.micro_batch_size:
        raise ConfigError(f"stages.{i}: grpo.micro_batch_size={gc.micro_batch_size} must divide the "
                          f"{rows} completions each process trains on per step")
    runtime.check_deepspeed_json(cfg.dist, world, gc.micro_batch_size, rows // gc.micro_batch_size)
    if ro.engine == "vllm":
        where = f"stages.{i}.rollout.engine" if cfg.stages[i].rollout else "rollout.engine"
        if cfg.dist.strategy in vllm_engine.SHARDED and cfg.model.lora is not None:
            raise ConfigError(f"{where}: vllm does not support LoRA under dist.strategy={cfg.dist.strategy} yet "
                              f"(the adapters would have to be gathered and merged per module); use zero2 or ddp, "
                              f"or engine: local")
        vllm_engine.require_vllm()


# --- the stage ---------------------------------------------------------------------------------


def train_grpo_stage(job: StageJob) -> dict:
    cfg, tok = job.cfg, job.tokenizer
    ro, gc, oc = cfg.stage_part(job.index, "rollout"), cfg.stage_part(job.index, "grpo"), cfg.stage_part(job.index, "optim")
    stage = cfg.stages[job.index]
    stage_label = job.label
    total_steps = cfg.stage_steps(job.index)
    world = runtime.world_size_from_env()
    G = ro.num_generations
    groups_local = ro.prompts_per_step // world
    rows_local = groups_local * G
    gas = rows_local // gc.micro_batch_size
    hidden = getattr(load_model_config(job.init_path, cfg.model.trust_remote_code), "hidden_size", 1024)
    acc = runtime.build_accelerator(cfg.dist, grad_accum=gas, micro_batch=gc.micro_batch_size,
                                    max_grad_norm=oc.max_grad_norm, hidden_size=hidden, output_dir=str(job.run_dir),
                                    stage_dir=str(job.out_dir))
    rank = acc.process_index
    print0(f"[stagewise] {stage_label}: {runtime.describe(acc, cfg.dist.strategy, gc.micro_batch_size, gas)}")
    advantage_fn, aggregate = lookup("advantage", gc.advantage), lookup("loss", gc.loss)
    eps_high = gc.epsilon if gc.epsilon_high is None else gc.epsilon_high

    # model, optimizer, schedule (a fresh optimizer each stage; weights come from the hand-over)
    n_opt_steps = total_steps * gc.num_iterations

    engine = TrainEngine.create(acc, cfg.dist.strategy, PolicyLogprobs(load_model(job.init_path, cfg.model)),
                                lambda params: make_adamw(params, oc, cfg.dist.strategy),
                                lambda opt: make_scheduler(opt, oc, n_opt_steps), max_grad_norm=oc.max_grad_norm,
                                mixed_precision=cfg.dist.mixed_precision)
    model, scheduler = engine.model, engine.scheduler
    # prompts shared by a group are run once per micro-batch when groups are not split
    group = G if (gc.shared_prompt and gc.micro_batch_size % G == 0 and not cfg.model.gradient_checkpointing) else 1
    # KL reference: LoRA's "adapters off" is the stage's starting weights, so it serves only when the
    # reference *is* those weights (stage 1, or reference: previous_stage); otherwise load it.
    adapters_off_ref = engine.is_lora and job.ref_path == job.init_path
    ref = None
    if gc.beta > 0 and not adapters_off_ref:
        with replicated_init():
            ref = load_model(job.ref_path, cfg.model.model_copy(update={"lora": None, "gradient_checkpointing": False}),
                             dtype=torch.bfloat16 if cfg.dist.mixed_precision == "bf16" else torch.float32)
        ref = ref.to(acc.device).eval()
    counters = job.counters
    counters.step, counters.samples = 0, 0
    if job.resume and (ckpt := latest_checkpoint(job.out_dir)) is not None:
        load_checkpoint(engine, ckpt, job.counters)
        print0(f"[stagewise] stage {job.index + 1}: resumed from {ckpt} (step {counters.step}/{total_steps})")
    log_stage_start(engine, job)
    engine_cls = lookup("rollout_engine", ro.engine)
    # an engine that lives for the run (vllm) and is handed the current weights before each rollout;
    # otherwise (local) one is built each step around the weights to sample with
    persistent = engine_cls(job.init_path, engine, ro.vllm, cfg.seed, acc.device) \
        if hasattr(engine_cls, "before_rollout") else None
    weights = RolloutWeights(engine, ro.weights, cfg.dist.mixed_precision) if persistent is None else None
    params = SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                            top_k=ro.top_k, stop_token_ids=tuple(eos_ids(tok)))
    limits = EpisodeLimits(max_turns=ro.max_turns, max_tokens=ro.max_episode_tokens,
                           max_tool_errors=ro.max_tool_errors)
    multi_turn = any(d.environment is not None for d in job.domains + job.replay_domains)
    # the most policy tokens an episode can hold (Dr. GRPO's constant normaliser)
    policy_budget = min(ro.max_turns * ro.max_new_tokens, ro.max_episode_tokens) if multi_turn else ro.max_new_tokens
    all_done = make_all_done(acc.device, engine.lockstep)
    bad_in_a_row, bad_total = 0, 0
    probe: dict = {}  # the dtype of the stage's first training forward (logged once)

    bar = StepProgress(total_steps, f"stage {job.index + 1} {stage.name or '+'.join(stage.domains)}",
                       cfg.logging.progress, start=counters.step)
    peak = PeakMemory().start()
    while counters.step < total_steps:
        step, t_start = counters.step, time.time()
        where = dict(stage=job.index + 1, step=step + 1, rank=rank)
        faults.maybe_raise(**where)

        # 1. rollout: this process's contiguous share of the step's groups
        examples = pick_examples(job, step, ro.prompts_per_step, stage.replay)
        mine = examples[rank * groups_local:(rank + 1) * groups_local]
        seeds = completion_seeds(cfg.seed, job.index, step, rank * rows_local, rows_local)
        model.eval()
        rollout_kw = dict(num_generations=G, params=params, limits=limits, seeds=seeds, device=acc.device,
                          all_done=all_done)
        if persistent is None:
            with weights.sampling_model() as sampler:
                batch = generate_rollouts(engine_cls(sampler, tok, device=acc.device, all_done=all_done,
                                                     prefix_cache_gib=ro.prefix_cache_gib), tok, mine,
                                          **rollout_kw)
        else:
            try:
                batch = generate_rollouts(persistent.before_rollout(), tok, mine, **rollout_kw)
            finally:
                persistent.after_rollout()
        model.train()
        t_gen = time.time() - t_start

        # 2. advantages on the gathered rewards: a group's rows are never normalised apart
        all_rewards = acc.gather(batch.rewards.to(acc.device)).cpu()
        adv_all, adv_stats = advantage_fn(all_rewards, G)
        lo, hi = rank * rows_local, (rank + 1) * rows_local
        batch.advantages = adv_all[lo:hi].to(acc.device)
        batch.loss_mask = loss_mask(batch.completion_mask * batch.policy_mask, batch.truncated, all_rewards, G, lo, hi,
                                    drop_zero_variance=gc.drop_zero_variance_groups,
                                    mask_truncated=ro.mask_truncated_completions)
        counts = acc.reduce(torch.tensor([float((batch.loss_mask.sum(-1) > 0).sum()), float(batch.loss_mask.sum())],
                                         device=acc.device), reduction="sum")
        n_seq, n_tok = int(counts[0].item()), int(counts[1].item())

        # 3. log-probs that stay fixed during the step (only when they are needed)
        def fixed(fn) -> torch.Tensor:
            width, out = batch.completion_ids.size(1), []
            with torch.no_grad():
                for s in range(0, rows_local, gc.micro_batch_size):
                    mb = batch.slice(s, s + gc.micro_batch_size)
                    lp = fn(mb)[0].float()
                    out.append(torch.nn.functional.pad(lp, (0, width - lp.size(1))))
            return torch.cat(out)

        args = lambda mb: (mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask, ro.temperature)  # noqa: E731
        if gc.num_iterations > 1:
            batch.old_logp = fixed(lambda mb: model(*args(mb), group_size=group))
        if ref is not None:
            batch.ref_logp = fixed(lambda mb: completion_logprobs(ref, *args(mb), group_size=group))
        elif gc.beta > 0:  # LoRA: the reference is the model with its adapters switched off
            with engine.lm.disable_adapter():
                batch.ref_logp = fixed(lambda mb: model(*args(mb), group_size=group))

        # 4. optimise: num_iterations passes, each = gas micro-batches = one optimizer step
        t_train = time.time()
        sums = torch.zeros(7, device=acc.device)  # loss, clipped, kl, entropy, tokens, |engine - trainer|, TIS weight
        skipped, grad_norm = 0, float("nan")
        for it in range(gc.num_iterations):
            for k, s in enumerate(range(0, rows_local, gc.micro_batch_size)):
                mb = batch.slice(s, s + gc.micro_batch_size)
                first = not probe and it == 0 and k == 0  # the stage's first training forward
                with engine.accumulate(), (engine.compute_dtype_probe(probe) if first else nullcontext()):
                    logp, ent = model(*args(mb), with_entropy=True, group_size=group)
                    if faults.active("inf_grad", **where):
                        logp.register_hook(lambda g: torch.full_like(g, float("inf")))
                    tok_loss, st = per_token_loss(logp, mb.old_logp, mb.advantages, epsilon_low=gc.epsilon,
                                                  epsilon_high=eps_high, beta=gc.beta, ref_logp=mb.ref_logp,
                                                  mask=mb.loss_mask, kl_ratio_weighted=gc.kl_ratio_weighted)
                    if mb.engine_logp is not None:  # sampled by another engine (vllm): measure, maybe correct
                        tis, gap = engine_mismatch(logp if mb.old_logp is None else mb.old_logp, mb.engine_logp,
                                                   mb.loss_mask, gc.tis_cap)
                        tok_loss = tok_loss * tis
                    loss = aggregate(tok_loss, mb.loss_mask, num_sequences=n_seq, num_tokens=n_tok,
                                     num_rows=ro.prompts_per_step * G, max_len=policy_budget)
                    if faults.active("nan_loss", **where):
                        loss = loss * float("nan")
                    # accelerate divides by gas and DDP/ZeRO/FSDP average over processes: undo both so
                    # the summed gradient is exactly that of the global objective
                    engine.backward(loss * world * gas, last=k == gas - 1)
                m = mb.loss_mask
                sums += torch.stack([loss.detach().float() / gc.num_iterations, masked_sum(st["clipped"], m),
                                     masked_sum(st["kl"], m) if "kl" in st else torch.zeros((), device=m.device),
                                     masked_sum(ent, m), m.sum(),
                                     masked_sum(gap, m) if mb.engine_logp is not None else torch.zeros((), device=m.device),
                                     masked_sum(tis, m) if mb.engine_logp is not None else torch.zeros((), device=m.device),
                                     ]).to(sums.device)
            info = engine.step()
            scheduler.step()
            grad_norm = info["grad_norm"]
            skipped += int(info["skipped"])
            bad_total += int(info["bad"])
            bad_in_a_row = bad_in_a_row + 1 if info["bad"] else 0
            if bad_in_a_row >= oc.max_bad_steps:
                raise TrainingError(f"{stage_label}, step {step + 1}: {bad_in_a_row} optimizer steps in a row had a "
                                    f"non-finite loss or gradient norm and were skipped (optim.max_bad_steps="
                                    f"{oc.max_bad_steps}); lower optim.lr or check the rewards, then continue "
                                    f"with --resume from the last checkpoint")
        t_train = time.time() - t_train
        counters.step += 1
        counters.samples += ro.prompts_per_step * G

        # 5. metrics, reduced over processes; rank 0 writes them
        red = acc.reduce(sums.clone(), reduction="sum")
        lengths = acc.gather(batch.completion_mask.sum(-1).to(acc.device).float()).cpu()
        trunc = acc.gather(batch.truncated.to(acc.device).float()).cpu()
        part_means = {}
        for name, vals in batch.reward_parts.items():
            allv = acc.gather(vals.to(acc.device)).cpu()
            ok = ~torch.isnan(allv)
            if ok.any():
                part_means[f"reward/{name}"] = allv[ok].mean().item()
                part_means[f"reward/{name}_std"] = allv[ok].std().item() if ok.sum() > 1 else 0.0
        if multi_turn:  # per-episode means: turns, tool calls, tool errors, policy and prompt tokens
            for name, vals in batch.episode_stats.items():
                part_means[f"episode/{name}"] = acc.gather(vals.to(acc.device)).cpu().mean().item()
        step_time = time.time() - t_start
        gen_tokens = float(lengths.sum())
        metrics = {
            "stage": job.index + 1, "stage_step": counters.step,
            "reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(), **part_means,
            "loss": red[0].item(), "clip_ratio": red[1].item() / max(red[4].item(), 1),
            "kl": red[2].item() / max(red[4].item(), 1), "entropy": red[3].item() / max(red[4].item(), 1),
            "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
            "skipped_steps": skipped, "bad_steps_total": bad_total,
            "completion_len_mean": lengths.mean().item(), "completion_len_max": lengths.max().item(),
            "truncated_frac": trunc.mean().item(), **adv_stats,
            "step_time": step_time, "gen_time": t_gen, "train_time": t_train,
            "tokens_per_s": gen_tokens / step_time, "completions_per_s": all_rewards.numel() / step_time,
            "peak_memory_mb": peak.mb,
        }
        if batch.engine_logp is not None:  # how far the engine's numbers are from the trainer's
            metrics.update({"engine/logp_abs_diff": red[5].item() / max(red[4].item(), 1),
                            "engine/tis_weight": red[6].item() / max(red[4].item(), 1),
                            **({"weight_push_time": persistent.push_seconds} if persistent else {})})
        if "dtype" in probe and not probe.get("logged"):  # once per stage: what the training forward computes in
            metrics["train_compute_dtype"] = str(probe["dtype"]).removeprefix("torch.")
            probe["logged"] = True
        if skipped:
            print0(f"[stagewise] {stage_label}, step {counters.step}: non-finite loss or gradient norm, "
                   f"update skipped on every rank ({bad_in_a_row} in a row, limit optim.max_bad_steps={oc.max_bad_steps})")
        if cfg.logging.dump_rollouts:
            dump_rollouts(acc, job, counters.step, batch, mine, G)
        job.curve.append(metrics["reward"])
        if counters.step % cfg.logging.log_every == 0 or counters.step == total_steps or "train_compute_dtype" in metrics:
            job.tracker.log(metrics, step=job.global_step_offset + counters.step)
        bar.update(1, reward=metrics["reward"], loss=metrics["loss"], tok_s=metrics["tokens_per_s"])

        # 6. checkpoint (collective) mid-stage, and honour a requested stop
        signalled = agreed_stop(acc.device)  # SIGTERM / SIGINT on any rank (collective)
        stopping = counters.step < total_steps and (signalled or (job.stop_after is not None
                                                                  and counters.step >= job.stop_after))
        if counters.step < total_steps and ((cfg.checkpoint.every and counters.step % cfg.checkpoint.every == 0) or stopping):
            save_checkpoint(engine, job.out_dir, counters.step, {"stage": job.index, "stage_name": stage.name,
                                                                 "total_steps": total_steps},
                            cfg.checkpoint.keep_last, counters=counters)
        if stopping:
            bar.close()
            peak.stop()
            acc.free_memory()
            return {"stopped": True, "step": counters.step, "steps": total_steps}
    bar.close()
    job.tracker.log({"stage": job.index + 1, "stage_peak_memory_mb": peak.stop()}, step=job.global_step_offset + total_steps)
    export_model(engine, tok, job.out_dir / "model", init_path=job.init_path, model_cfg=cfg.model,
                 extra={"stage": job.index, "steps": total_steps})
    result = {"stopped": False, "step": counters.step, "steps": total_steps, "model": str(job.out_dir / "model")}
    acc.free_memory()
    return result


register("stage", "grpo")(StageKind(train=train_grpo_stage, check=check_grpo_stage))

"""One SFT stage: the training loop to read top to bottom.

    result = train_sft_stage(job)      # called by the curriculum for every `kind: sft` stage

Data: the stage's domains' training conversations (plus replay from earlier stages' domains) are
tokenized once with an assistant-only loss mask, shuffled per epoch with a seeded RNG and packed
into rows of at most ``sft.max_seq_len`` tokens. The rows of step s are a pure function of
(seed, stage, s), so the data position is the step counter (exact resume, any process count).

Each step: the step's ``sft.batch_size`` rows, each process its contiguous share  ->  micro-batches
with gradient accumulation  ->  token-mean NLL over the whole step's learnt tokens (a global
normaliser, so micro-batch x accumulation x processes does not change the gradient)  ->  clip,
AdamW, schedule  ->  metrics, checkpoint.

``sft.micro_batch_size: auto`` probes the largest micro-batch that fits before training: full-length
rows, forward + backward + an optimizer step (so AdamW's states are counted), from the per-process
batch down, backing off on out-of-memory as accelerate's ``find_executable_batch_size`` does. Every
rank probes the same sizes and they agree on the result (all-reduced). Limitation: a rank that runs
out of memory alone inside a collective leaves its peers waiting until ``dist.timeout_s``.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from contextlib import nullcontext
from functools import lru_cache

import torch

from stagewise import faults
from stagewise.checkpoint import MANIFEST, export_model, latest_checkpoint, load_checkpoint, save_checkpoint
from stagewise.config import RunConfig
from stagewise.continual.stage import StageJob, StageKind
from stagewise.domains import Domain
from stagewise.errors import ConfigError, TrainingError
from stagewise.models import load_model, load_model_config
from stagewise.optim import make_adamw, make_scheduler
from stagewise.parallel import runtime
from stagewise.parallel.engine import TrainEngine
from stagewise.parallel.stop import agreed_stop
from stagewise.registry import register
from stagewise.sft.data import PackedRow, pack, tokenize_conversation
from stagewise.sft.loss import SFTLoss, collate
from stagewise.tracking import PeakMemory, StepProgress, print0


def check_sft_stage(cfg: RunConfig, i: int, world: int) -> None:
    st, sc = cfg.stages[i], cfg.stage_part(i, "sft")
    if st.tasks_per_domain is not None:
        raise ConfigError(f"stages.{i}.tasks_per_domain: an sft stage is measured in steps or epochs")
    if sc.batch_size % world:
        raise ConfigError(f"stages.{i}: sft.batch_size={sc.batch_size} must be divisible by the {world} processes")
    per = sc.batch_size // world
    if sc.micro_batch_size != "auto" and per % sc.micro_batch_size:
        raise ConfigError(f"stages.{i}: sft.micro_batch_size={sc.micro_batch_size} must divide the {per} rows "
                          f"each process trains on per step")


# --- data ------------------------------------------------------------------------------------------


class RowStream:
    """The stage's packed rows, epoch after epoch: epoch e is the examples shuffled with a seeded RNG
    and packed. ``step_rows(s, B)`` are rows s*B .. (s+1)*B of that endless stream."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], *, seed: int, stage: int, max_len: int,
                 packing: bool):
        self.examples, self.seed, self.stage, self.max_len, self.packing = examples, seed, stage, max_len, packing
        self.epoch = lru_cache(maxsize=4)(self._epoch)

    def _epoch(self, e: int) -> list[PackedRow]:
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:{self.stage}:epoch{e}").shuffle(order)
        return pack([self.examples[i] for i in order], self.max_len, self.packing)

    def step_rows(self, step: int, batch: int) -> list[PackedRow]:
        out, start, e = [], step * batch, 0
        while len(out) < batch:
            rows = self.epoch(e)
            if start < len(rows):
                take = rows[start:start + batch - len(out)]
                out += take
                start = 0
            else:
                start -= len(rows)
            e += 1
        return out


def training_examples(job: StageJob, tok, max_len: int) -> tuple[list, dict]:
    """Tokenized (ids, learnt-mask) examples of the stage's domains, plus replay; and counts."""
    st = job.cfg.stages[job.index]
    own = [(d, ex) for d in job.domains for ex in d.train]
    rng = random.Random(f"{job.cfg.seed}:{job.index}:replay")
    replay_pool = [(d, ex) for d in job.replay_domains for ex in d.train]
    n_replay = round(len(own) * st.replay / (1 - st.replay)) if replay_pool and st.replay else 0
    chosen = own + [replay_pool[rng.randrange(len(replay_pool))] for _ in range(n_replay)]
    examples, too_long = [], 0
    for _, ex in chosen:
        t = tokenize_conversation(tok, Domain.conversation(ex), max_len)
        if t is None:
            too_long += 1
        else:
            examples.append(t)
    if not examples:
        raise ConfigError(f"{job.label}: no training example fits in sft.max_seq_len={max_len}")
    return examples, {"examples": len(examples), "replay_examples": n_replay, "dropped_too_long": too_long}


# --- micro-batch --------------------------------------------------------------------------------


def is_oom(e: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(e, torch.OutOfMemoryError) or should_reduce_batch_size(e)


def choose_micro_batch(job: StageJob, per_process: int, build) -> tuple[int, list[int]]:
    """The largest divisor of the per-process rows whose probe step fits in memory, and the sizes
    that did not. ``build(micro, gas)`` -> TrainEngine."""
    sc = job.cfg.stage_part(job.index, "sft")
    too_big: list[int] = []
    for micro in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
        engine, failed = None, False
        try:
            engine = build(micro, 1)
            dev = engine.acc.device
            faults.maybe_oom(stage=job.index + 1, micro=micro, rank=engine.acc.process_index)
            V = engine.lm.config.vocab_size
            rows = [PackedRow(ids=[(7 * k + r) % V for k in range(sc.max_seq_len)],
                              positions=list(range(sc.max_seq_len)),
                              targets=[(7 * k + 7 + r) % V for k in range(sc.max_seq_len)]) for r in range(micro)]
            with engine.accumulate():
                nll = engine.model(**collate(rows, 0, dev))
                engine.backward(nll.mean(), last=True)
            engine.step()  # allocates AdamW's states (the probe's weights are thrown away)
        except Exception as e:
            if not is_oom(e):
                raise
            failed = True
        finally:
            if engine is not None:
                engine.acc.free_memory()
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        votes = runtime.reduce_sum(torch.tensor([float(failed)], device=runtime.device()))
        if votes.item() == 0:
            return micro, too_big
        too_big.append(micro)
    raise TrainingError(f"{job.label}: even a micro-batch of 1 row of {sc.max_seq_len} tokens runs out of memory; "
                        f"lower sft.max_seq_len, enable model.gradient_checkpointing, or use zero3 with offload")


# --- the stage ---------------------------------------------------------------------------------


def train_sft_stage(job: StageJob) -> dict:
    cfg, tok = job.cfg, job.tokenizer
    sc, oc = cfg.stage_part(job.index, "sft"), cfg.stage_part(job.index, "optim")
    st = cfg.stages[job.index]
    world = runtime.world_size_from_env()
    per_process = sc.batch_size // world

    examples, counts = training_examples(job, tok, sc.max_seq_len)
    stream = RowStream(examples, seed=cfg.seed, stage=job.index, max_len=sc.max_seq_len, packing=sc.packing)
    rows_per_epoch = len(stream.epoch(0))
    total_steps = st.steps if st.steps is not None else max(1, math.ceil(st.epochs * rows_per_epoch / sc.batch_size))
    hidden = getattr(load_model_config(job.init_path, cfg.model.trust_remote_code), "hidden_size", 1024)

    def build(micro: int, gas: int) -> TrainEngine:
        acc = runtime.build_accelerator(cfg.dist, grad_accum=gas, micro_batch=micro, max_grad_norm=oc.max_grad_norm,
                                        hidden_size=hidden, output_dir=str(job.run_dir), stage_dir=str(job.out_dir))

        return TrainEngine.create(acc, cfg.dist.strategy, SFTLoss(load_model(job.init_path, cfg.model), sc.loss_chunk),
                                  lambda params: make_adamw(params, oc, cfg.dist.strategy),
                                  lambda opt: make_scheduler(opt, oc, total_steps), max_grad_norm=oc.max_grad_norm,
                                  mixed_precision=cfg.dist.mixed_precision)

    ckpt = latest_checkpoint(job.out_dir) if job.resume else None
    saved_micro = json.loads((ckpt / MANIFEST).read_text()).get("micro_batch") if ckpt else None
    if sc.micro_batch_size == "auto" and saved_micro:  # resume with the size the stage started with
        micro, too_big = int(saved_micro), []
    elif sc.micro_batch_size == "auto":
        micro, too_big = choose_micro_batch(job, per_process, build)
        print0(f"[stagewise] {job.label}: automatic micro-batch: {micro} rows of {sc.max_seq_len} tokens fit"
               + (f" ({', '.join(map(str, too_big))} ran out of memory)" if too_big else ""))
    else:
        micro, too_big = sc.micro_batch_size, []
    gas = per_process // micro
    engine = build(micro, gas)
    acc = engine.acc
    print0(f"[stagewise] {job.label}: {runtime.describe(acc, cfg.dist.strategy, micro, gas)}; {counts['examples']} "
           f"examples -> {rows_per_epoch} rows of <= {sc.max_seq_len} tokens per epoch, {total_steps} steps")
    counters = job.counters
    counters.step, counters.samples = 0, 0
    if ckpt is not None:
        load_checkpoint(engine, ckpt, job.counters)
        print0(f"[stagewise] {job.label}: resumed from {ckpt} (step {counters.step}/{total_steps})")
    job.tracker.log({"stage": job.index + 1, "kind": "sft", "micro_batch": micro, "accumulation": gas,
                     "micro_batch_too_big": too_big, "rows_per_epoch": rows_per_epoch, **counts,
                     "master_dtype": str(engine.master_dtype()).removeprefix("torch.")}, step=job.global_step_offset)

    bar = StepProgress(total_steps, f"stage {job.index + 1} {st.name or '+'.join(st.domains)} (sft)",
                       cfg.logging.progress, start=counters.step)
    with PeakMemory() as peak:
        stopped = _train_steps(job, engine, stream, bar, peak, total_steps=total_steps, micro=micro, gas=gas)
    bar.close()
    if stopped:
        acc.free_memory()
        return {"stopped": True, "step": counters.step, "steps": total_steps}
    job.tracker.log({"stage": job.index + 1, "stage_peak_memory_mb": peak.mb}, step=job.global_step_offset + total_steps)
    export_model(engine, tok, job.out_dir / "model", init_path=job.init_path, model_cfg=cfg.model,
                 extra={"stage": job.index, "steps": total_steps, "kind": "sft"})
    acc.free_memory()
    return {"stopped": False, "step": counters.step, "steps": total_steps, "model": str(job.out_dir / "model")}


def _train_steps(job: StageJob, engine: TrainEngine, stream: RowStream, bar, peak, *, total_steps: int, micro: int,
                 gas: int) -> bool:
    """The step loop; True when it stopped early (--stop-after), after checkpointing."""
    cfg, tok, st = job.cfg, job.tokenizer, job.cfg.stages[job.index]
    sc, oc = cfg.stage_part(job.index, "sft"), cfg.stage_part(job.index, "optim")
    acc, model, scheduler, counters = engine.acc, engine.model, engine.scheduler, job.counters
    world, rank = acc.num_processes, acc.process_index
    per_process = sc.batch_size // world
    bad_in_a_row, bad_total, probe = 0, 0, {}
    while counters.step < total_steps:
        step, t_start = counters.step, time.time()
        where = dict(stage=job.index + 1, step=step + 1, rank=rank)
        faults.maybe_raise(**where)
        rows = stream.step_rows(step, sc.batch_size)[rank * per_process:(rank + 1) * per_process]
        n_local = sum(sum(t != -100 for t in r.targets) for r in rows)
        n_tok = int(runtime.reduce_sum(torch.tensor([float(n_local)], device=acc.device)).item())
        sums = torch.zeros(2, device=acc.device)  # loss, learnt tokens
        for k in range(gas):
            batch = collate(rows[k * micro:(k + 1) * micro], tok.pad_token_id, acc.device)
            first = not probe and k == 0
            with engine.accumulate(), (engine.compute_dtype_probe(probe) if first else nullcontext()):
                nll = model(**batch)
                loss = nll.sum() / max(n_tok, 1)
                if faults.active("nan_loss", **where):
                    loss = loss * float("nan")
                # accelerate divides by gas and DDP/ZeRO/FSDP average over processes: undo both
                engine.backward(loss * world * gas, last=k == gas - 1)
            sums += torch.stack([loss.detach().float(), torch.tensor(float(nll.numel()), device=acc.device)])
        info = engine.step()
        scheduler.step()
        bad_total += int(info["bad"])
        bad_in_a_row = bad_in_a_row + 1 if info["bad"] else 0
        if bad_in_a_row >= oc.max_bad_steps:
            raise TrainingError(f"{job.label}, step {step + 1}: {bad_in_a_row} optimizer steps in a row had a non-finite "
                                f"loss or gradient norm and were skipped (optim.max_bad_steps={oc.max_bad_steps}); "
                                f"lower optim.lr or check the data, then continue with --resume")
        counters.step += 1
        counters.samples += sc.batch_size
        red = runtime.reduce_sum(sums)
        all_tokens = runtime.reduce_sum(torch.tensor([float(sum(len(r) for r in rows))], device=acc.device))
        step_time = time.time() - t_start
        metrics = {"stage": job.index + 1, "stage_step": counters.step, "loss": red[0].item(),
                   "grad_norm": info["grad_norm"], "lr": scheduler.get_last_lr()[0], "skipped_steps": int(info["skipped"]),
                   "bad_steps_total": bad_total, "learnt_tokens": n_tok, "tokens_per_s": all_tokens.item() / step_time,
                   "learnt_tokens_per_s": n_tok / step_time, "step_time": step_time, "peak_memory_mb": peak.mb}
        if "dtype" in probe and not probe.get("logged"):
            metrics["train_compute_dtype"] = str(probe["dtype"]).removeprefix("torch.")
            probe["logged"] = True
        if info["skipped"]:
            print0(f"[stagewise] {job.label}, step {counters.step}: non-finite loss or gradient norm, update skipped "
                   f"on every rank ({bad_in_a_row} in a row, limit optim.max_bad_steps={oc.max_bad_steps})")
        job.curve.append(metrics["loss"])
        if counters.step % cfg.logging.log_every == 0 or counters.step == total_steps or "train_compute_dtype" in metrics:
            job.tracker.log(metrics, step=job.global_step_offset + counters.step)
        bar.update(1, loss=metrics["loss"], tok_s=metrics["tokens_per_s"])

        signalled = agreed_stop(engine.acc.device)  # SIGTERM / SIGINT on any rank (collective)
        stopping = counters.step < total_steps and (signalled or (job.stop_after is not None
                                                                  and counters.step >= job.stop_after))
        if counters.step < total_steps and ((cfg.checkpoint.every and counters.step % cfg.checkpoint.every == 0) or stopping):
            save_checkpoint(engine, job.out_dir, counters.step, {"stage": job.index, "stage_name": st.name,
                                                                 "total_steps": total_steps, "micro_batch": micro},
                            cfg.checkpoint.keep_last, counters=counters)
        if stopping:
            return True
    return False


register("stage", "sft")(StageKind(train=train_sft_stage, check=check_sft_stage, needs_reward=False))

"""One SFT stage: the training loop to read top to bottom.

    result = train_sft_stage(job)      # called by the curriculum for every `kind: sft` stage

Data: the stage's domains' training conversations (plus replay from earlier stages' domains) are
tokenized once with an assistant-only loss mask, shuffled per epoch with a seeded RNG and packed
into rows of at most ``sft.max_seq_len`` tokens. The rows of step s are a pure function of
(seed, stage, s), so the data position is the step counter (exact resume, any process count).

Each step: the step's ``sft.batch_size`` rows, each process its contiguous share  ->  micro-batches
(when every row of the step holds one example, as agent episodes too long to pack do, each
micro-batch's common opening runs once: ``sft.shared_prefix``, ``prefix_sharing.py``)
with gradient accumulation  ->  token-mean NLL over the whole step's learnt tokens (a global
normaliser, so micro-batch x accumulation x processes does not change the gradient)  ->  clip,
AdamW, schedule  ->  metrics, checkpoint. What every stage kind shares (the Accelerator, resume,
the loss scaling, bad steps, stopping, checkpoints, export) is the stage scaffold's (``training/run.py``).

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
from functools import lru_cache

import torch

from stagewise import faults
from stagewise.checkpoint import MANIFEST
from stagewise.config import RunConfig
from stagewise.errors import ConfigError, TrainingError
from stagewise.models import load_model
from stagewise.parallel import runtime
from stagewise.parallel.collectives import device, reduce_sum
from stagewise.seeds import epoch_rng, replay_rng
from stagewise.sft.data import PackedRow, pack, tokenize_example
from stagewise.sft.loss import SFTLoss, collate
from stagewise.tracking import print0
from stagewise.training.run import StageRun, build_strategy, resume_checkpoint
from stagewise.training.stage import StageJob, StageResult
from stagewise.training.step_stats import reduce_step_stats

# --- the stage ---------------------------------------------------------------------------------


def train_sft_stage(job: StageJob) -> StageResult:
    cfg, tok, sft_cfg = job.cfg, job.tokenizer, job.part("sft")
    world = runtime.world_size_from_env()
    per_process = sft_cfg.batch_size // world

    examples, counts = training_examples(job, tok, sft_cfg.max_seq_len)
    stream = RowStream(examples, seed=cfg.seed, stage=job.index, max_len=sft_cfg.max_seq_len, packing=sft_cfg.packing,
                       group=sft_cfg.batch_size if sft_cfg.shared_prefix and not sft_cfg.packing else 0)
    rows_per_epoch = len(stream.epoch(0))
    stage = job.stage
    total_steps = stage.steps if stage.steps is not None else max(1, math.ceil(stage.epochs * rows_per_epoch
                                                                               / sft_cfg.batch_size))
    checkpoint = resume_checkpoint(job)
    micro, too_big = micro_batch_size(job, per_process, total_steps, checkpoint)
    accumulation = per_process // micro
    run = StageRun(job, lambda: SFTLoss(load_model(job.init_path, cfg.model), sft_cfg.loss_chunk), micro_batch=micro,
                   accumulation=accumulation, total_steps=total_steps, checkpoint=checkpoint,
                   describe=f"{counts['examples']} examples -> {rows_per_epoch} rows of <= {sft_cfg.max_seq_len} "
                            f"tokens per epoch, {total_steps} steps",
                   start_log={"micro_batch_too_big": too_big, "rows_per_epoch": rows_per_epoch, **counts})

    while not run.finished:
        step = run.begin_step()
        step_rows = stream.step_rows(step, sft_cfg.batch_size)
        # every rank sees the whole step's rows, so all take the same path (ZeRO-3 / FSDP gather per body call)
        shared = sft_cfg.shared_prefix and all(r.single for r in step_rows)
        rows = step_rows[run.rank * per_process:(run.rank + 1) * per_process]
        learnt_local = sum(sum(t != -100 for t in r.targets) for r in rows)
        n_tok = int(reduce_sum(torch.tensor([float(learnt_local)], device=run.device)).item())
        loss_sum = torch.zeros((), device=run.device)
        for k in range(accumulation):
            batch = collate(rows[k * micro:(k + 1) * micro], tok.pad_token_id, run.device, shared_prefix=shared)
            with run.accumulate():
                nll = run.model(**batch)
                loss = run.backward(nll.sum() / max(n_tok, 1), last=k == accumulation - 1)
            loss_sum = loss_sum + loss.detach().float()
        run.optimizer_step()

        total, _ = reduce_step_stats(run.device, rows={}, sums={
            "loss": loss_sum, "tokens": torch.tensor(float(sum(len(r) for r in rows)), device=run.device)})
        step_time = run.elapsed()
        metrics = {"loss": total["loss"], "learnt_tokens": n_tok, "tokens_per_s": total["tokens"] / step_time,
                   "learnt_tokens_per_s": n_tok / step_time, "step_time": step_time, "shared_prefix": float(shared)}
        if run.end_step(metrics, samples=sft_cfg.batch_size, curve=metrics["loss"],
                        progress={"loss": metrics["loss"], "tok_s": metrics["tokens_per_s"]}):
            return run.stopped()
    return run.finish(tok)


def check_sft_stage(cfg: RunConfig, i: int, world: int) -> None:
    stage, sft_cfg = cfg.stages[i], cfg.stage_part(i, "sft")
    if stage.tasks_per_domain is not None:
        raise ConfigError(f"stages.{i}.tasks_per_domain: an sft stage is measured in steps or epochs")
    if sft_cfg.batch_size % world:
        raise ConfigError(f"stages.{i}: sft.batch_size={sft_cfg.batch_size} must be divisible by the {world} processes")
    per = sft_cfg.batch_size // world
    if sft_cfg.micro_batch_size != "auto" and per % sft_cfg.micro_batch_size:
        raise ConfigError(f"stages.{i}: sft.micro_batch_size={sft_cfg.micro_batch_size} must divide the {per} rows "
                          f"each process trains on per step")


# --- data ------------------------------------------------------------------------------------------


class RowStream:
    """The stage's packed rows, epoch after epoch: epoch e is the examples shuffled with a seeded RNG
    and packed. ``step_rows(s, B)`` are rows s*B .. (s+1)*B of that endless stream.

    group=B (one example per row, shared prefixes on): the shuffled examples are dealt into steps of
    B by their opening (the first OPENING tokens: a domain's system prompt and tool schemas), so a
    step's rows share one prefix where the data allows; the steps are then shuffled. Each epoch
    still holds every example once, in an order that is a pure function of (seed, stage, epoch)."""

    OPENING = 256

    def __init__(self, examples: list[tuple[list[int], list[bool]]], *, seed: int, stage: int, max_len: int,
                 packing: bool, group: int = 0):
        self.examples, self.seed, self.stage, self.max_len, self.packing = examples, seed, stage, max_len, packing
        self.group = group
        self.epoch = lru_cache(maxsize=4)(self._epoch)

    def _epoch(self, e: int) -> list[PackedRow]:
        order = list(range(len(self.examples)))
        rng = epoch_rng(self.seed, self.stage, e)
        rng.shuffle(order)
        if self.group > 1:
            # the rows that finish the previous epoch's last step come first (steps run on across epochs)
            lead = -e * len(self.examples) % self.group
            order = self._by_opening(order, rng, lead)
        return pack([self.examples[i] for i in order], self.max_len, self.packing)

    def _by_opening(self, order: list[int], rng, lead: int) -> list[int]:
        """``order`` dealt into steps of ``group`` examples that share their opening, after ``lead``
        examples that complete a step begun in the previous epoch: full steps of one opening, then the
        remainders together, the steps shuffled, a short last step last."""
        buckets: dict[tuple, list[int]] = {}
        for i in order:
            buckets.setdefault(tuple(self.examples[i][0][:self.OPENING]), []).append(i)
        steps, rest = [], []
        for members in buckets.values():
            full = len(members) // self.group * self.group
            steps += [members[k:k + self.group] for k in range(0, full, self.group)]
            rest += members[full:]
        if not steps:  # no opening fills a step: the shuffled order as it is
            return order
        while len(rest) < lead and steps:  # the lead needs more than the remainders: break a full step
            rest = steps.pop() + rest
        first, rest = rest[:lead], rest[lead:]
        steps += [rest[k:k + self.group] for k in range(0, len(rest), self.group)]
        tail = steps.pop() if steps and len(steps[-1]) < self.group else None
        rng.shuffle(steps)
        return first + [i for step in steps + ([tail] if tail else []) for i in step]

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
    replay = job.stage.replay
    own = [(d, ex) for d in job.domains for ex in d.train]
    rng = replay_rng(job.cfg.seed, job.index)
    replay_pool = [(d, ex) for d in job.replay_domains for ex in d.train]
    n_replay = round(len(own) * replay / (1 - replay)) if replay_pool and replay else 0
    chosen = own + [replay_pool[rng.randrange(len(replay_pool))] for _ in range(n_replay)]
    examples, too_long = [], 0
    for _, ex in chosen:
        t = tokenize_example(tok, ex, max_len)
        if t is None:
            too_long += 1
        else:
            examples.append(t)
    if not examples:
        raise ConfigError(f"{job.label}: no training example fits in sft.max_seq_len={max_len}")
    return examples, {"examples": len(examples), "replay_examples": n_replay, "dropped_too_long": too_long}


# --- micro-batch --------------------------------------------------------------------------------


def micro_batch_size(job: StageJob, per_process: int, total_steps: int, checkpoint) -> tuple[int, list[int]]:
    """The stage's micro-batch and the sizes that ran out of memory: sft.micro_batch_size, or
    (``auto``) the size a resumed stage started with, or the largest that fits."""
    sft_cfg = job.part("sft")
    if sft_cfg.micro_batch_size != "auto":
        return sft_cfg.micro_batch_size, []
    saved = json.loads((checkpoint / MANIFEST).read_text()).get("micro_batch") if checkpoint else None
    if saved:
        return int(saved), []
    micro, too_big = choose_micro_batch(job, per_process, total_steps)
    print0(f"[stagewise] {job.label}: automatic micro-batch: {micro} rows of {sft_cfg.max_seq_len} tokens fit"
           + (f" ({', '.join(map(str, too_big))} ran out of memory)" if too_big else ""))
    return micro, too_big


def is_oom(e: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    # NCCL reports a device out of memory as a DistBackendError ("... out of memory ...")
    nccl_oom = type(e).__name__ == "DistBackendError" and "out of memory" in str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or should_reduce_batch_size(e) or nccl_oom


def choose_micro_batch(job: StageJob, per_process: int, total_steps: int) -> tuple[int, list[int]]:
    """The largest divisor of the per-process rows whose probe step fits in memory, and the sizes
    that did not."""
    sft_cfg = job.part("sft")
    too_big: list[int] = []
    for micro in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
        strategy, failed = None, False
        try:
            strategy = build_strategy(job, lambda: SFTLoss(load_model(job.init_path, job.cfg.model),
                                                           sft_cfg.loss_chunk),
                                      micro_batch=micro, accumulation=1, optimizer_steps=total_steps)
            faults.maybe_oom(stage=job.index + 1, micro=micro, rank=strategy.acc.process_index)
            vocab = strategy.lm.config.vocab_size
            length = sft_cfg.max_seq_len
            rows = [PackedRow(ids=[(7 * k + r) % vocab for k in range(length)], positions=list(range(length)),
                              targets=[(7 * k + 7 + r) % vocab for k in range(length)]) for r in range(micro)]
            with strategy.accumulate():
                nll = strategy.model(**collate(rows, 0, strategy.device))
                strategy.backward(nll.mean(), last=True)
            strategy.step()  # allocates AdamW's states (the probe's weights are thrown away)
        except Exception as e:
            if not is_oom(e):
                raise
            failed = True
        finally:
            if strategy is not None:
                strategy.release()
            del strategy
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        votes = reduce_sum(torch.tensor([float(failed)], device=device()))
        if votes.item() == 0:
            return micro, too_big
        too_big.append(micro)
    raise TrainingError(f"{job.label}: even a micro-batch of 1 row of {sft_cfg.max_seq_len} tokens runs out of memory; "
                        f"lower sft.max_seq_len, enable model.gradient_checkpointing, or use zero3 with offload")

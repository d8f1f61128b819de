"""The stage scaffold: what every stage kind shares, written once, so that the invariants that must
hold identically on every rank (the loss scaling, the bad-step rule, the agreed stop) have one
implementation. A stage kind writes only its step:

    run = StageRun(job, lambda: PolicyLogprobs(load_model(...)), micro_batch=8, accumulation=2, total_steps=24)
    while not run.finished:
        run.begin_step()                                   # fault hooks, timers
        for k, mb in enumerate(micro_batches):             # the same number on every rank
            with run.accumulate():
                loss = ...                                 # this micro-batch's share of the global objective
                run.backward(loss, last=k == run.accumulation - 1)
        run.optimizer_step()                               # guarded step, schedule, bad-step rule
        if run.end_step(metrics, samples=n, curve=reward, progress={"reward": reward}):
            return run.stopped()                           # --stop-after / a signal: checkpointed
    return run.finish(job.tokenizer)                       # export the stage's model

``StageRun`` builds the stage's Accelerator, then the module (so that under ZeRO-3 transformers
creates it already partitioned: DeepSpeed's ``zero.Init``, no whole copy per process even while
loading), then the strategy (``TrainStrategy``: single, DDP, ZeRO, FSDP) with a fresh AdamW and
schedule, resumes from the stage's newest verified checkpoint when asked,
logs what each rank holds, and per step: scales every micro-batch loss by processes x accumulation
(accelerate divides by the accumulation and DDP / ZeRO / FSDP average over processes, so the summed
gradient is exactly that of the global objective), injects the test faults, skips bad steps on every
rank and stops after ``optim.max_bad_steps`` in a row, logs at ``logging.log_every``, agrees on a
stop requested by a signal on any rank or by ``--stop-after``, checkpoints every
``checkpoint.every`` steps and when stopping, and finally exports the fp32 weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from stagewise import faults
from stagewise.checkpoint import agreed_checkpoint, export_model, load_checkpoint, save_checkpoint
from stagewise.errors import TrainingError
from stagewise.models import import_model_class, load_model_config, partitioned_init
from stagewise.optim import make_adamw, make_scheduler
from stagewise.parallel import runtime
from stagewise.parallel.collectives import gather_rows
from stagewise.parallel.stop import agreed_stop
from stagewise.parallel.strategy import StepInfo, TrainStrategy
from stagewise.tracking import PeakMemory, StepProgress, print0
from stagewise.training.stage import StageJob, StageResult


def build_strategy(job: StageJob, build_module: Callable[[], torch.nn.Module], *, micro_batch: int,
                   accumulation: int, optimizer_steps: int) -> TrainStrategy:
    """The stage's Accelerator (its DeepSpeed JSON written to the run and stage directories), then
    ``build_module()`` (under ZeRO-3 inside DeepSpeed's ``zero.Init``: each parameter partitioned as it
    is created, and the checkpoint loaded into the partitions), and the strategy wrapping it, with a
    fresh AdamW and an lr schedule over ``optimizer_steps``."""
    cfg, optim_cfg = job.cfg, job.part("optim")
    hidden = getattr(load_model_config(job.init_path, cfg.model.trust_remote_code), "hidden_size", 1024)
    acc = runtime.build_accelerator(cfg.dist, grad_accum=accumulation, micro_batch=micro_batch,
                                    max_grad_norm=optim_cfg.max_grad_norm, hidden_size=hidden,
                                    output_dir=str(job.run_dir), stage_dir=str(job.out_dir))
    zero3 = acc.state.deepspeed_plugin.deepspeed_config if cfg.dist.strategy == "zero3" else None
    with partitioned_init(zero3):
        module = build_module()
    # LoRA's adapters are made after loading (small; DeepSpeed partitions them when it wraps the model)
    partitioned_at_load = all(hasattr(p, "ds_id") for n, p in module.named_parameters() if "lora_" not in n)
    offloaded_from_gpu = runtime.optimizer_offloaded_from_gpu(cfg.dist)
    strategy = TrainStrategy.create(acc, cfg.dist.strategy, module,
                                    lambda params: make_adamw(params, optim_cfg, cfg.dist.strategy,
                                                              offloaded_from_gpu=offloaded_from_gpu),
                                    lambda opt: make_scheduler(opt, optim_cfg, optimizer_steps),
                                    max_grad_norm=optim_cfg.max_grad_norm, mixed_precision=cfg.dist.mixed_precision)
    strategy.partitioned_at_load = partitioned_at_load
    return strategy


def resume_checkpoint(job: StageJob) -> Path | None:
    """The checkpoint a resumed stage continues from (the newest that verifies), or None."""
    return agreed_checkpoint(job.out_dir) if job.resume else None


class StageRun:
    """One stage's training scaffold; see the module docstring."""

    def __init__(self, job: StageJob, build_module: Callable[[], torch.nn.Module], *, micro_batch: int,
                 accumulation: int, total_steps: int, optimizer_steps: int | None = None, describe: str = "",
                 start_log: dict | None = None, checkpoint: Path | None | bool = True):
        """build_module: makes the trained module (a wrapper whose ``.lm`` is the HF model), called
        once the accelerator exists; optimizer_steps: over the stage (default: one per step);
        describe: appended to the start line; start_log: logged once with what each rank holds;
        checkpoint: where to resume from (True: the stage's newest, when the job resumes)."""
        self.job, self.cfg = job, job.cfg
        self.kind = job.stage.kind
        self.micro_batch, self.accumulation, self.total_steps = micro_batch, accumulation, total_steps
        self.optim_cfg = job.part("optim")
        # from before the model exists (its code imported): the stage's own memory is its peak less this base
        import_model_class(job.init_path, self.cfg.model.trust_remote_code)
        self._peak = PeakMemory(device="cpu" if runtime.on_cpu(self.cfg.dist) else None).start()
        try:
            self.strategy = build_strategy(job, build_module, micro_batch=micro_batch, accumulation=accumulation,
                                           optimizer_steps=optimizer_steps or total_steps)
        except BaseException:
            self._peak.stop()  # its sampling thread ends with the stage that failed to start
            raise
        acc = self.strategy.acc
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        print0(f"[stagewise] {job.label}: {runtime.describe(acc, self.cfg.dist.strategy, micro_batch, accumulation)}"
               + (f"; {describe}" if describe else ""))
        self.counters = job.counters
        self.counters.step, self.counters.samples = 0, 0
        ckpt = resume_checkpoint(job) if checkpoint is True else checkpoint
        if ckpt:
            load_checkpoint(self.strategy, ckpt, self.counters)
            print0(f"[stagewise] {job.label}: resumed from {ckpt} (step {self.counters.step}/{total_steps})")
        self._log_start(start_log or {})
        self.bad_in_a_row = self.bad_total = 0
        self._probe: dict = {}  # the dtype of the stage's first training forward (logged once)
        self._bar = StepProgress(total_steps, f"stage {job.index + 1} {job.name} ({self.kind})",
                                 self.cfg.logging.progress, start=self.counters.step)

    @property
    def model(self) -> torch.nn.Module:
        """The module the loop calls (DDP / DeepSpeed / FSDP prepared)."""
        return self.strategy.model

    @property
    def step(self) -> int:
        """Optimizer steps done in this stage: the data position."""
        return self.counters.step

    @property
    def finished(self) -> bool:
        return self.counters.step >= self.total_steps

    def _log_start(self, extra: dict) -> None:
        """Which fraction of the parameters each rank holds (1/N under ZeRO-3 / FSDP, 1 otherwise) and
        whether they were created so (ZeRO-3's zero.Init), the
        CUDA device each rank computes on (-1: CPU; each rank must have its own) and the dtype of the
        weights the optimizer updates (collective)."""
        strategy = self.strategy
        total = sum(getattr(p, "ds_numel", p.numel()) for p in strategy.model.parameters())
        cuda = torch.cuda.current_device() if self.device.type == "cuda" else -1
        per_rank = gather_rows(torch.tensor([[strategy.param_fraction(), cuda]], device=self.device)).cpu().tolist()
        master = str(strategy.master_dtype()).removeprefix("torch.")
        self.job.tracker.log({"stage": self.job.index + 1, "kind": self.kind, "micro_batch": self.micro_batch,
                              "accumulation": self.accumulation, **extra,
                              "param_fraction_per_rank": [row[0] for row in per_rank],
                              "cuda_device_per_rank": [int(row[1]) for row in per_rank],
                              "params_total": total, "master_dtype": master,
                              "partitioned_at_load": strategy.partitioned_at_load}, step=self.job.global_step_offset)

    # --- one step ----------------------------------------------------------------------------------
    def begin_step(self) -> int:
        """Start step ``self.step`` (0-based, returned): timers, and the fault hooks of its start."""
        self._t0 = time.time()
        self._skipped, self.grad_norm = 0, float("nan")
        self.where = dict(stage=self.job.index + 1, step=self.counters.step + 1, rank=self.rank)
        faults.maybe_raise(**self.where)
        return self.counters.step

    def elapsed(self) -> float:
        """Seconds since the step began."""
        return time.time() - self._t0

    @contextmanager
    def accumulate(self):
        """The context of one micro-batch's forward and backward (gradient accumulation; the stage's
        first forward also records the dtype it computes in)."""
        probe = self.strategy.compute_dtype_probe(self._probe) if "dtype" not in self._probe else nullcontext()
        with self.strategy.accumulate(), probe:
            yield

    def backward(self, loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        """Backward of one micro-batch's share of the global objective (normalised by the whole
        step's global counts); ``last`` marks the optimizer step's final micro-batch. Returns the loss
        as trained on (NaN under the ``nan_loss`` test fault)."""
        if faults.active("nan_loss", **self.where):
            loss = loss * float("nan")
        if faults.active("inf_grad", **self.where):  # a finite loss whose gradient is not
            loss.register_hook(lambda g: torch.full_like(g, float("inf")))
        # accelerate divides by the accumulation and DDP / ZeRO / FSDP average over processes:
        # undo both so the summed gradient is exactly that of the global objective
        self.strategy.backward(loss * self.world * self.accumulation, last=last)
        return loss

    def optimizer_step(self) -> StepInfo:
        """Clip, update unless the step is bad (on every rank alike), advance the schedule."""
        info = self.strategy.step()
        self.strategy.scheduler.step()
        self.grad_norm = info.grad_norm
        self._skipped += int(info.skipped)
        self.bad_total += int(info.bad)
        self.bad_in_a_row = self.bad_in_a_row + 1 if info.bad else 0
        if self.bad_in_a_row >= self.optim_cfg.max_bad_steps:
            raise TrainingError(f"{self.job.label}, step {self.where['step']}: {self.bad_in_a_row} optimizer steps in "
                                f"a row had a non-finite loss or gradient norm and were skipped (optim.max_bad_steps="
                                f"{self.optim_cfg.max_bad_steps}); lower optim.lr or check the data and rewards, then "
                                f"continue with --resume from the last checkpoint")
        return info

    def end_step(self, metrics: dict, *, samples: int, curve: float | None, progress: dict) -> bool:
        """Count the step, log it (with what every stage logs), then agree on stopping (collective):
        True when the stage must stop now, after checkpointing."""
        job, counters = self.job, self.counters
        counters.step += 1
        counters.samples += samples
        row = {"stage": job.index + 1, "stage_step": counters.step, **metrics, "grad_norm": self.grad_norm,
               "lr": self.strategy.scheduler.get_last_lr()[0], "skipped_steps": self._skipped,
               "bad_steps_total": self.bad_total, "peak_memory_mb": self._peak.mb}
        row.setdefault("step_time", self.elapsed())
        if "dtype" in self._probe and not self._probe.get("logged"):  # once per stage
            row["train_compute_dtype"] = str(self._probe["dtype"]).removeprefix("torch.")
            self._probe["logged"] = True
        if self._skipped:
            print0(f"[stagewise] {job.label}, step {counters.step}: non-finite loss or gradient norm, update skipped "
                   f"on every rank ({self.bad_in_a_row} in a row, limit optim.max_bad_steps="
                   f"{self.optim_cfg.max_bad_steps})")
        job.curve.append(curve)
        if (counters.step % self.cfg.logging.log_every == 0 or counters.step == self.total_steps
                or "train_compute_dtype" in row):
            job.tracker.log(row, step=job.global_step_offset + counters.step)
        self._bar.update(1, **progress)

        signalled = agreed_stop(self.device)  # SIGTERM / SIGINT on any rank (collective)
        more = counters.step < self.total_steps
        stopping = more and (signalled or (job.stop_after is not None and counters.step >= job.stop_after))
        every = self.cfg.checkpoint.every
        if more and ((every and counters.step % every == 0) or stopping):
            save_checkpoint(self.strategy, job.out_dir, counters.step,
                            {"stage": job.index, "stage_name": job.stage.name, "kind": self.kind,
                             "total_steps": self.total_steps, "micro_batch": self.micro_batch},
                            self.cfg.checkpoint.keep_last, counters=counters)
        return stopping

    # --- the end of the stage ------------------------------------------------------------------------
    def stopped(self) -> StageResult:
        """The stage stopped early (checkpointed by ``end_step``); nothing is exported."""
        self._close()
        self.strategy.release()
        return StageResult(stopped=True, step=self.counters.step, steps=self.total_steps)

    def finish(self, tokenizer) -> StageResult:
        """Collective. Export the stage's model (fp32 weights, the next stage starts from it)."""
        peak = self._close()
        job = self.job
        per_rank = gather_rows(torch.tensor([[peak, self._peak.base_mb]], device=self.device)).cpu().tolist()
        job.tracker.log({"stage": job.index + 1, "stage_peak_memory_mb": peak,
                         # per rank: the peak (RSS on CPU, allocator peak on GPU) and what the process
                         # held before the stage's model existed (benchmarks/strategies.py: peak - base)
                         "stage_peak_memory_mb_per_rank": [row[0] for row in per_rank],
                         "stage_base_memory_mb_per_rank": [row[1] for row in per_rank]},
                        step=job.global_step_offset + self.total_steps)
        out = job.out_dir / "model"
        export_model(self.strategy, tokenizer, out, init_path=job.init_path, model_cfg=self.cfg.model,
                     extra={"stage": job.index, "steps": self.total_steps, "kind": self.kind})
        self.strategy.release()
        return StageResult(stopped=False, step=self.counters.step, steps=self.total_steps, model=str(out))

    def _close(self) -> float:
        """End the progress bar and the memory watch; the stage's peak memory (MB)."""
        self._bar.close()
        return self._peak.stop()


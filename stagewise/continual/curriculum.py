"""The curriculum: stages in order, each handed the previous stage's exported weights, with an
evaluation of every domain before the first stage and after each one (the accuracy matrix).

    stagewise run configs/three_domains.yaml            # what `make demo` runs
    stagewise run configs/three_domains.yaml --resume   # continue after a crash or a stop

Output directory:
    config.yaml            the resolved config          metrics.jsonl   one line per step / eval
    curriculum.json        matrix rows so far (resume)  stage-<i>-<name>/checkpoints/step-N, model/
    report.md, *.png       written at the end           final_model/    the last stage's weights
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from stagewise.checkpoint import Counters, is_exported, latest_checkpoint
from stagewise.config import RunConfig, dump_config
from stagewise.domains import Domain, build_domain
from stagewise.errors import ConfigError, StagewiseError
from stagewise.evaluation import evaluate_domain
from stagewise.models import load_model, load_model_config, load_tokenizer, replicated_init, resolve_model_path
from stagewise.continual.metrics import continual_metrics
from stagewise.parallel import runtime
from stagewise.rl.grpo import StageJob, make_all_done, train_grpo_stage
from stagewise.tracking import Tracker, print0

STATE = "curriculum.json"


def check_shapes(cfg: RunConfig, world: int) -> int:
    """Validate batch divisibility for every stage; return the (common) accumulation steps."""
    gases = set()
    for i in range(len(cfg.stages)):
        ro, gc = cfg.stage_part(i, "rollout"), cfg.stage_part(i, "grpo")
        if ro.prompts_per_step % world:
            raise ConfigError(f"stages.{i}: rollout.prompts_per_step={ro.prompts_per_step} must be divisible by "
                              f"the {world} processes (groups are kept whole per process)")
        rows = ro.prompts_per_step // world * ro.num_generations
        if rows % gc.micro_batch_size:
            raise ConfigError(f"stages.{i}: grpo.micro_batch_size={gc.micro_batch_size} must divide the "
                              f"{rows} completions each process trains on per step")
        gases.add(rows // gc.micro_batch_size)
    if len(gases) > 1:
        raise ConfigError(f"stages: every stage must use the same number of micro-batches per step "
                          f"(got {sorted(gases)}); keep prompts_per_step x G / micro_batch_size equal")
    return gases.pop()


def stage_dir(cfg: RunConfig, i: int) -> Path:
    st = cfg.stages[i]
    name = st.name or "+".join(st.domains)
    return Path(cfg.output_dir) / f"stage-{i + 1}-{name}"


def _load_state(out: Path) -> dict:
    p = out / STATE
    return json.loads(p.read_text()) if p.is_file() else {"rows": {}, "stage_results": {}}


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, out / STATE)


def evaluate_row(acc, cfg: RunConfig, tok, weights_path: str, domains: list[Domain], tracker: Tracker,
                 label: str, step: int) -> tuple[list[float], dict]:
    """Greedy held-out accuracy of every domain for the weights at ``weights_path`` (collective)."""
    dtype = torch.bfloat16 if cfg.dist.mixed_precision == "bf16" else torch.float32
    with replicated_init():
        model = load_model(weights_path, cfg.model.model_copy(update={"lora": None, "gradient_checkpointing": False}),
                           dtype=dtype).to(acc.device).eval()
    all_done = make_all_done(acc, False)
    row, samples = [], {}
    t0 = time.time()
    for dom in domains:
        accuracy, smp = evaluate_domain(model, tok, dom, max_new_tokens=cfg.eval.max_new_tokens,
                                        batch_size=cfg.eval.batch_size, rank=acc.process_index,
                                        world=acc.num_processes, device=acc.device,
                                        reduce_sum=lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu(),
                                        all_done=all_done)
        row.append(accuracy)
        samples[dom.name] = smp
    tracker.log({"eval_row": label, **{f"eval/{d.name}": a for d, a in zip(domains, row)},
                 "eval_time": time.time() - t0}, step=step)
    print0(f"[stagewise] eval {label}: " + "  ".join(f"{d.name} {a:.3f}" for d, a in zip(domains, row)))
    del model
    return row, samples


RUN_MARKER = ".stagewise-run"


def holds_run(out: Path) -> bool:
    """Whether ``out`` is a stagewise output directory (only those may be resumed or overwritten)."""
    return (out / RUN_MARKER).is_file() or (out / STATE).is_file()


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run by accident, and to delete a directory that is not a run at all."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not holds_run(out):
        what = "--overwrite refuses to delete it" if overwrite else ("there is no run to resume" if resume else
                                                                    "refusing to write into it")
        raise StagewiseError(f"{out} exists and does not hold a stagewise run (no {RUN_MARKER}); {what}: "
                             f"set output_dir to a new or empty directory")
    if not resume and not overwrite:
        raise StagewiseError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                             f"start again, or set output_dir")


def run_curriculum(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                   stop_after: int | None = None) -> dict:
    """Run (or continue) every stage; returns {"matrix", "metrics", "stopped"}.

    Everything that can be checked without a process group is checked first (shapes, output
    directory, plugins, domains, model path), identically on every rank; then the Accelerator is
    built and the run always ends through ``runtime.end_run`` on every rank.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars: our own bar shows progress
    out = Path(cfg.output_dir)
    world = runtime.world_size_from_env()
    if world == 1 and (warning := runtime.one_process_launch_warning()):
        print0(f"[stagewise] {warning}")
    dist, note = runtime.resolve_strategy(cfg.dist, world)
    if note:
        cfg = cfg.model_copy(update={"dist": dist})
        print0(f"[stagewise] {note}")
    runtime.check(cfg.dist, world)
    gas = check_shapes(cfg, world)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    for mod in cfg.plugins:
        __import__(mod)
    domains = [build_domain(spec, cfg.seed) for spec in cfg.domains]
    # model conversion (GGUF -> safetensors cache) happens once, before the process group exists
    # on every rank; the file lock in models.convert_gguf makes concurrent ranks wait for one.
    base_path = resolve_model_path(cfg.model.name_or_path)
    hidden = getattr(load_model_config(base_path, cfg.model.trust_remote_code), "hidden_size", 1024)

    gc0 = cfg.stage_part(0, "grpo")
    acc, tracker, ok = None, None, False
    try:
        acc = runtime.build_accelerator(cfg.dist, grad_accum=gas, micro_batch=gc0.micro_batch_size,
                                        max_grad_norm=cfg.stage_part(0, "optim").max_grad_norm, hidden_size=hidden,
                                        output_dir=str(out),
                                        log_with=["tensorboard"] if cfg.logging.tensorboard else None)
        if acc.is_main_process:
            if overwrite and not resume and out.exists():
                for p in out.glob("*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                (out / RUN_MARKER).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / RUN_MARKER).write_text("written by stagewise; marks this directory as a run output\n")
            dump_config(cfg, out / "config.yaml")
        acc.wait_for_everyone()
        tracker = Tracker(acc, out, tensorboard=cfg.logging.tensorboard, run_name=cfg.name,
                          config=cfg.model_dump(mode="json", exclude={"ablations"}))
        result = _run_stages(cfg, acc, tracker, domains, base_path, gas, resume=resume, stop_after=stop_after)
        ok = True
        return result
    finally:
        runtime.end_run(acc, tracker, ok)


def _run_stages(cfg: RunConfig, acc, tracker: Tracker, domains: list[Domain], base_path: str, gas: int, *,
                resume: bool, stop_after: int | None) -> dict:
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    by_name = {d.name: d for d in domains}
    print0(f"[stagewise] {runtime.describe(acc, cfg.dist.strategy, cfg.stage_part(0, 'grpo').micro_batch_size, gas)}")
    print0(f"[stagewise] model {cfg.model.name_or_path} -> {base_path}; output {out}")
    tok = load_tokenizer(base_path, cfg.model.trust_remote_code)
    counters = Counters()
    acc.register_for_checkpointing(counters)
    state = _load_state(out) if resume else {"rows": {}, "stage_results": {}}

    offset = 0
    samples = state.get("samples", {})
    if cfg.eval.before_first_stage and "0" not in state["rows"]:
        state["rows"]["0"], samples["base"] = evaluate_row(acc, cfg, tok, base_path, domains, tracker, "base", 0)
        if acc.is_main_process:
            _save_state(out, {**state, "samples": samples})
    prev_path = base_path
    stopped = False
    for i, st in enumerate(cfg.stages):
        sdir = stage_dir(cfg, i)
        steps = cfg.stage_steps(i)
        done = is_exported(sdir / "model") and str(i + 1) in state["rows"]
        if not done:
            if not is_exported(sdir / "model"):
                if stop_after is not None and offset >= stop_after:
                    stopped = True
                    break
                gc = cfg.stage_part(i, "grpo")
                ref_path = None if gc.beta == 0 else (base_path if gc.reference == "base" else prev_path)
                replay = [by_name[d] for s in cfg.stages[:i] for d in s.domains if d not in st.domains]
                job = StageJob(cfg=cfg, index=i, accelerator=acc, tokenizer=tok,
                               domains=[by_name[d] for d in st.domains], replay_domains=list(dict.fromkeys(replay)),
                               init_path=prev_path, ref_path=ref_path, out_dir=sdir, tracker=tracker,
                               counters=counters, resume=resume and latest_checkpoint(sdir) is not None,
                               stop_after=None if stop_after is None else stop_after - offset,
                               global_step_offset=offset)
                t0 = time.time()
                print0(f"[stagewise] stage {i + 1}/{len(cfg.stages)}: {st.kind} on {', '.join(st.domains)} "
                       f"for {steps} steps" + (f", replay {st.replay:.0%}" if st.replay else ""))
                res = train_grpo_stage(job)
                if res["stopped"]:
                    stopped = True
                    break
                state["stage_results"][str(i + 1)] = {"steps": steps, "seconds": time.time() - t0,
                                                      "reward_curve": job.curve}
            row, samples[f"stage {i + 1}"] = evaluate_row(acc, cfg, tok, str(sdir / "model"), domains, tracker,
                                                          f"after stage {i + 1}", offset + steps)
            state["rows"][str(i + 1)] = row
            if acc.is_main_process:
                _save_state(out, {**state, "samples": samples})
            acc.wait_for_everyone()
        prev_path = str(sdir / "model")
        offset += steps

    result = {"stopped": stopped, "output_dir": str(out)}
    if not stopped:
        present = [k for k in range(len(cfg.stages) + 1) if str(k) in state["rows"]]
        rows = [state["rows"][str(k)] for k in present]
        result["matrix"] = rows
        if len(rows) == len(cfg.stages) + 1:
            own = [[[d.name for d in domains].index(n) for n in st.domains] for st in cfg.stages]
            result["metrics"] = continual_metrics(rows, own)
        if acc.is_main_process:
            final = out / "final_model"
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(prev_path, final)
            state["metrics"] = result.get("metrics")
            _save_state(out, {**state, "samples": samples})
            from stagewise.report import write_report

            write_report(out, cfg, [d.name for d in domains])
            print_matrix(cfg, [d.name for d in domains], present, rows, result.get("metrics"))
    else:
        print0(f"[stagewise] stopped after {stop_after} steps; continue with --resume")
    return result


def print_matrix(cfg: RunConfig, names: list[str], present: list[int], rows: list[list[float]],
                 metrics: dict | None) -> None:
    from rich.table import Table

    from stagewise.tracking import _console

    t = Table(title="accuracy matrix R[row, domain] (greedy, held-out)")
    t.add_column("after")
    for n in names:
        t.add_column(n, justify="right")
    labels = ["base"] + [f"stage {i + 1} ({'+'.join(s.domains)})" for i, s in enumerate(cfg.stages)]
    for lab, row in zip([labels[k] for k in present], rows):
        t.add_row(lab, *(f"{x:.3f}" for x in row))
    _console.print(t)
    if metrics:
        _console.print("  ".join(f"{k} {v:+.3f}" if v is not None else f"{k} n/a" for k, v in metrics.items()))

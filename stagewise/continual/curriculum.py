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
import shutil
import time
from pathlib import Path

from stagewise import faults
from stagewise.checkpoint import agreed_checkpoint, is_exported
from stagewise.config import RunConfig, dump_config
from stagewise.continual import preflight
from stagewise.continual.metrics import continual_metrics, loss_metrics
from stagewise.continual.model_card import write_model_card
from stagewise.continual.run_dir import RUN_MARKER, check_output_dir, check_resume_config, load_state, save_state
from stagewise.domains.base import Domain
from stagewise.envs.users import set_policy_weights
from stagewise.evaluation import evaluate_row
from stagewise.models import load_model_config, load_tokenizer, resolve_model_path
from stagewise.parallel import runtime
from stagewise.parallel.collectives import barrier
from stagewise.parallel.stop import StopRequest, stopped_by
from stagewise.registry import lookup
from stagewise.tracking import Tracker, print0
from stagewise.training.stage import StageJob, stage_name


def stage_dir(cfg: RunConfig, i: int) -> Path:
    return Path(cfg.output_dir) / f"stage-{i + 1}-{stage_name(cfg, i)}"


def run_curriculum(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                   stop_after: int | None = None, force: bool = False) -> dict:
    """Run (or continue) every stage; returns {"matrix", "metrics", "stopped"}.

    Everything that can be checked without a process group is checked first (names, shapes, output
    directory, plugins, domains, model path), identically on every rank; then the process group is
    started and the run always ends through ``runtime.end_run`` on every rank.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars: our own bar shows progress
    out = Path(cfg.output_dir)
    world = runtime.world_size_from_env()
    if world == 1 and (warning := runtime.one_process_launch_warning()):
        print0(f"[stagewise] {warning}")
    for resolve in (lambda d: runtime.resolve_strategy(d, world), runtime.resolve_precision):
        dist, note = resolve(cfg.dist)
        if note:
            cfg = cfg.model_copy(update={"dist": dist})
            print0(f"[stagewise] {note}")
    preflight.check_config(cfg, world)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    saved_domains = check_resume_config(out, cfg, force) if resume else None
    domains = preflight.build_domains(cfg)
    # model conversion (GGUF -> safetensors cache) happens once, before the process group exists
    # on every rank; the file lock in models.convert_gguf makes concurrent ranks wait for one.
    base_path = resolve_model_path(cfg.model.name_or_path)
    load_model_config(base_path, cfg.model.trust_remote_code)  # one clear line now if it cannot load

    tracker, ok = None, False
    stop = StopRequest.install()  # SIGTERM / SIGINT: finish the step, checkpoint, exit 0
    try:
        dist_state = runtime.start_run(cfg.dist)
        if dist_state.is_main_process:
            if overwrite and not resume and out.exists():
                for p in out.glob("*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                (out / RUN_MARKER).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / RUN_MARKER).write_text("written by stagewise; marks this directory as a run output\n")
            dump_config(cfg, out / "config.yaml")
        barrier()
        tracker = Tracker(out, cfg.logging.report_to, config=cfg.model_dump(mode="json", exclude={"ablations"}),
                          name=f"{cfg.name}-{cfg.ablation}" if cfg.ablation else cfg.name,
                          project=cfg.logging.project, resume=resume)
        skipped = {f"data_skipped/{d.name}": len(d.skipped) for d in domains if d.skipped}
        if skipped:
            tracker.log(skipped, step=0)
        result = _run_stages(cfg, dist_state, tracker, domains, base_path, resume=resume, stop_after=stop_after,
                             saved_domains=saved_domains)
        ok = True
        return result
    finally:
        stop.restore()
        runtime.end_run(tracker, ok)


def _run_stages(cfg: RunConfig, dist_state, tracker: Tracker, domains: list[Domain], base_path: str, *,
                resume: bool, stop_after: int | None, saved_domains: list[str] | None = None) -> dict:
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    by_name = {d.name: d for d in domains}
    print0(f"[stagewise] {cfg.dist.strategy} x{dist_state.num_processes} on {dist_state.device}; "
           f"model {cfg.model.name_or_path} -> {base_path}; output {out}")
    tok = load_tokenizer(base_path, cfg.model.trust_remote_code)
    state = (load_state(out, saved_domains, [d.name for d in domains]) if resume
             else {"rows": {}, "loss_rows": {}, "stage_results": {}})
    if resume and saved_domains is not None and dist_state.is_main_process:
        save_state(out, state)  # its rows in this config's domain order (a --force resume may change them)
    samples = state.get("samples", {})

    def evaluate(weights: str, started_from: str, key: str, label: str, step: int) -> None:
        """One row of the matrices for ``weights`` (the model that stage ``key`` ended with)."""
        faults.maybe_kill("eval", stage=int(key), rank=dist_state.process_index)
        set_policy_weights(started_from)  # a `model: policy` customer: the evaluated stage's starting weights
        state["rows"][key], state["loss_rows"][key], samples[label], details = evaluate_row(
            dist_state, cfg, tok, weights, domains, tracker, label if key == "0" else f"after {label}", step)
        state.setdefault("detail_rows", {})[key] = details
        if dist_state.is_main_process:
            save_state(out, {**state, "samples": samples})
            log_matrix(tracker, cfg, domains, state["rows"], step)
        barrier()

    offset = 0
    prev_path = base_path
    if cfg.eval.before_first_stage and "0" not in state["rows"]:
        evaluate(base_path, base_path, "0", "base", 0)
    stopped = False
    for i, stage in enumerate(cfg.stages):
        sdir = stage_dir(cfg, i)
        if not is_exported(sdir / "model"):
            if stopped_by() is not None:  # a signal arrived in the previous stage's last step
                stopped = True
                break
            if stop_after is not None and offset >= stop_after:
                stopped = True
                break
            set_policy_weights(prev_path)
            grpo_cfg = cfg.stage_part(i, "grpo")
            ref_path = None if grpo_cfg.beta == 0 else (base_path if grpo_cfg.reference == "base" else prev_path)
            replay, left_out = preflight.replay_pool(cfg, i, by_name) if stage.replay else ([], {})
            job = StageJob(cfg=cfg, index=i, tokenizer=tok, domains=[by_name[d] for d in stage.domains],
                           replay_domains=replay, init_path=prev_path, ref_path=ref_path,
                           out_dir=sdir, run_dir=out, tracker=tracker,
                           resume=resume and agreed_checkpoint(sdir, quiet=True) is not None,
                           stop_after=None if stop_after is None else stop_after - offset,
                           global_step_offset=offset, domains_by_name=by_name)
            t0 = time.time()
            length = f"{cfg.stage_steps(i)} steps" if cfg.stage_steps(i) else f"{stage.epochs:g} epochs"
            print0(f"[stagewise] stage {i + 1}/{len(cfg.stages)}: {stage.kind} on {', '.join(stage.domains)} for "
                   f"{length}" + (f", replay {stage.replay:.0%} of {', '.join(d.name for d in replay)}"
                                  if replay else "")
                   + "".join(f" ({n} not replayed: it {why})" for n, why in left_out.items()))
            result = lookup("stage", stage.kind).train(job)
            if result.stopped:
                stopped = True
                break
            state["stage_results"][str(i + 1)] = {"kind": stage.kind, "steps": result.steps,
                                                  "seconds": time.time() - t0, "curve": job.curve}
        steps = json.loads((sdir / "model" / "stagewise.json").read_text())["steps"]
        if str(i + 1) not in state["rows"]:
            evaluate(str(sdir / "model"), prev_path, str(i + 1), f"stage {i + 1}", offset + steps)
            if dist_state.is_main_process:  # the stage's model says what it is, its row included
                write_model_card(sdir / "model", cfg, state, [d.name for d in domains], stages_done=i + 1)
        prev_path = str(sdir / "model")
        offset += steps
    result = _finish(cfg, dist_state, state, samples, domains, prev_path, stopped, stop_after)
    if not stopped:  # the report's plots, once they exist
        tracker.images({f"report/{p.stem}": p for p in sorted(out.glob("*.png"))}, step=offset)
    return result


def log_matrix(tracker: Tracker, cfg: RunConfig, domains: list[Domain], rows: dict, step: int) -> None:
    """The accuracy matrix so far (one row per evaluation: base, after each stage) as a table."""
    labels = ["base"] + [f"stage {i + 1} ({'+'.join(s.domains)})" for i, s in enumerate(cfg.stages)]
    table = [[labels[k], *rows[str(k)]] for k in range(len(labels)) if str(k) in rows]
    tracker.table("eval/accuracy_matrix", ["after", *(d.name for d in domains)], table, step)


def _finish(cfg: RunConfig, dist_state, state: dict, samples: dict, domains: list[Domain], final_path: str,
            stopped: bool, stop_after: int | None) -> dict:
    """The run's result; when every stage is done: the continual-learning metrics, final_model/, the report."""
    out = Path(cfg.output_dir)
    result = {"stopped": stopped, "output_dir": str(out)}
    if not stopped:
        present = [k for k in range(len(cfg.stages) + 1) if str(k) in state["rows"]]
        rows = [state["rows"][str(k)] for k in present]
        losses = [state["loss_rows"].get(str(k)) for k in present]
        result["matrix"] = rows
        if any(x is not None for row in losses if row for x in row):
            result["loss_matrix"] = losses
        if len(rows) == len(cfg.stages) + 1:
            own = [[[d.name for d in domains].index(n) for n in stage.domains] for stage in cfg.stages]
            result["metrics"] = continual_metrics(rows, own)
            if "loss_matrix" in result:
                result["loss_metrics"] = loss_metrics(losses, own)
        if dist_state.is_main_process:
            from stagewise.report import print_matrix, write_report  # matplotlib: only where a report is written

            final = out / "final_model"
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(final_path, final)
            state["metrics"] = result.get("metrics")
            state["loss_metrics"] = result.get("loss_metrics")
            save_state(out, {**state, "samples": samples})
            write_model_card(final, cfg, state, [d.name for d in domains], stages_done=len(cfg.stages))
            write_report(out, cfg, [d.name for d in domains])
            print_matrix(cfg, [d.name for d in domains], present, rows, result.get("metrics"), losses)
    elif stopped_by() is not None:
        result["signal"] = stopped_by()
        print0(f"[stagewise] stopped by {stopped_by()}: the current step finished and was checkpointed; "
               f"continue with --resume")
    else:
        print0(f"[stagewise] stopped after {stop_after} steps; continue with --resume")
    return result

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
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from stagewise import faults
from stagewise import stages  # noqa: F401  (registers the stage kinds)
from stagewise.checkpoint import is_exported, latest_checkpoint
from stagewise.config import RunConfig, dump_config
from stagewise.continual.stage import StageJob
from stagewise.domains import Domain, build_domain
from stagewise.errors import ConfigError, StagewiseError
from stagewise.evaluation import evaluate_domain, held_out_loss
from stagewise.parallel.stop import StopRequest, stopped_by
from stagewise.rl.episodes import EpisodeLimits
from stagewise.envs.users import set_policy_weights
from stagewise.models import load_model, load_model_config, load_tokenizer, replicated_init, resolve_model_path
from stagewise.continual.metrics import continual_metrics, loss_metrics
from stagewise.parallel import runtime
from stagewise.registry import lookup
from stagewise.tracking import Tracker, print0

STATE = "curriculum.json"


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


def evaluate_row(state, cfg: RunConfig, tok, weights_path: str, domains: list[Domain], tracker: Tracker,
                 label: str, step: int) -> tuple[list, list, dict]:
    """Held-out accuracy (greedy) of every domain with a metric, and held-out loss of every domain's
    answers when ``eval.held_out_loss`` (default: the run has an sft stage), for the weights at
    ``weights_path``. Collective. state: the run's process state. -> (accuracy row, loss row, samples);
    a cell is None where it is not defined."""
    dtype = torch.bfloat16 if cfg.dist.mixed_precision == "bf16" else torch.float32
    with replicated_init():
        model = load_model(weights_path, cfg.model.model_copy(update={"lora": None, "gradient_checkpointing": False}),
                           dtype=dtype).to(state.device).eval()
    with_loss = cfg.eval.held_out_loss if cfg.eval.held_out_loss is not None else cfg.has_kind("sft")
    max_len = max((cfg.stage_part(i, "sft").max_seq_len for i, s in enumerate(cfg.stages) if s.kind == "sft"),
                  default=cfg.sft.max_seq_len)
    reduce = lambda t: runtime.reduce_sum(t.to(state.device)).cpu()  # noqa: E731
    row, losses, samples, pass_k_logs = [], [], {}, {}
    t0 = time.time()
    engine = None
    if cfg.eval_engine == "vllm" and any(d.metric is not None for d in domains):
        from stagewise.rl import vllm_engine

        engine = vllm_engine.holding(weights_path, model, cfg.rollout.vllm, cfg.seed, state.device)
    for dom in domains:
        accuracy = None
        if dom.metric is not None:
            trials = cfg.eval.trials if dom.environment is not None else 1
            accuracy, samples[dom.name], pass_k = evaluate_domain(
                model, tok, dom, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                rank=state.process_index, world=state.num_processes, device=state.device, reduce_sum=reduce,
                limits=EpisodeLimits(max_turns=cfg.rollout.max_turns, max_tokens=cfg.rollout.max_episode_tokens,
                                     max_tool_errors=cfg.rollout.max_tool_errors),
                trials=trials, temperature=cfg.rollout.temperature, seed=cfg.seed,
                prefix_cache_gib=cfg.rollout.prefix_cache_gib, engine=engine)
            if trials > 1:
                pass_k_logs.update({f"eval/{dom.name}/pass^{k}": v for k, v in pass_k.items()})
        row.append(accuracy)
        losses.append(held_out_loss(model, tok, dom, max_len=max_len, rank=state.process_index,
                                    world=state.num_processes, device=state.device, reduce_sum=reduce)
                      if with_loss else None)
    tracker.log({"eval_row": label, **{f"eval/{d.name}": a for d, a in zip(domains, row) if a is not None},
                 **{f"eval_loss/{d.name}": x for d, x in zip(domains, losses) if x is not None},
                 **{f"eval_perplexity/{d.name}": math.exp(min(x, 50.0)) for d, x in zip(domains, losses) if x is not None},
                 **pass_k_logs, "eval_time": time.time() - t0}, step=step)
    if engine is not None:
        engine.sleep()
    shown = [f"{d.name} {a:.3f}" for d, a in zip(domains, row) if a is not None]
    shown += [f"{d.name} loss {x:.3f}" for d, x in zip(domains, losses) if x is not None]
    shown += [f"{k.removeprefix('eval/')} {v:.3f}" for k, v in pass_k_logs.items() if not k.endswith("/pass^1")]
    print0(f"[stagewise] eval {label}: " + "  ".join(shown))
    del model
    return row, losses, samples


RUN_MARKER = ".stagewise-run"
# what a resumed run must share with the run it continues: otherwise the checkpoints and the data
# position mean something else (other weights, other prompts, another batch). Logging, evaluation,
# checkpointing and optimizer settings may change.
RESUME_MUST_MATCH = re.compile(
    r"^(seed|model\..*|domains\..*|data\..*|stages\.\d+\.(name|kind|domains|steps|epochs|replay|tasks_per_domain)(\..*)?"
    r"|(stages\.\d+\.)?(rollout\.(prompts_per_step|num_generations)|sft\.(batch_size|max_seq_len|packing)))$")


def _flatten(x, prefix: str = "") -> dict:
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        return {k: v for i, val in enumerate(x) for k, v in _flatten(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: x}


def resume_differences(saved: dict, new: dict) -> list[str]:
    """The keys that a resume may not change, where the saved config.yaml and the new config differ."""
    a, b = _flatten(saved), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if RESUME_MUST_MATCH.match(k))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys if a.get(k) != b.get(k)]


def check_resume_config(out: Path, cfg: RunConfig, force: bool) -> None:
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    import yaml

    saved = yaml.safe_load(saved_path.read_text()) or {}
    new = cfg.model_dump(mode="json", exclude={"ablations"})
    diffs = resume_differences({k: v for k, v in saved.items() if k != "ablations"}, new)
    if diffs and not force:
        raise StagewiseError(f"--resume: the config differs from the run's {saved_path} in {len(diffs)} key(s) that "
                             f"must not change mid-run: {'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''} "
                             f"(add --force to resume anyway)")
    if diffs:
        print0(f"[stagewise] warning: --force: resuming with changed {', '.join(d.split(':')[0] for d in diffs)}")


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
                   stop_after: int | None = None, force: bool = False) -> dict:
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
    for i, st in enumerate(cfg.stages):
        lookup("stage", st.kind).check(cfg, i, world)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        check_resume_config(out, cfg, force)
    for mod in cfg.plugins:
        __import__(mod)
    domains = [build_domain(spec, cfg.seed, on_error=cfg.data.on_error) for spec in cfg.domains]
    for d in domains:
        if d.skipped:
            print0(f"[stagewise] domains.{d.name}: skipped {len(d.skipped)} malformed record(s) (data.on_error=skip); "
                   f"first: {d.skipped[0]}")
    for i, st in enumerate(cfg.stages):
        for name in st.domains:
            dom = next(d for d in domains if d.name == name)
            if st.kind == "sft" and dom.environment is not None and not all("messages" in t for t in dom.train):
                raise ConfigError(f"stages.{i}: domain {name!r} is an environment; an sft stage needs reference "
                                  f"conversations (tasks with 'messages'), so train it with a grpo stage")
        if lookup("stage", st.kind).needs_reward:
            for name in st.domains:
                if not next(d for d in domains if d.name == name).rewards:
                    raise ConfigError(f"stages.{i}: domain {name!r} defines no reward, and a {st.kind} stage learns "
                                      f"from one (set domains[].rewards or args.reward)")
    # model conversion (GGUF -> safetensors cache) happens once, before the process group exists
    # on every rank; the file lock in models.convert_gguf makes concurrent ranks wait for one.
    base_path = resolve_model_path(cfg.model.name_or_path)
    load_model_config(base_path, cfg.model.trust_remote_code)  # one clear line now if it cannot load

    tracker, ok = None, False
    stop = StopRequest.install()  # SIGTERM / SIGINT: finish the step, checkpoint, exit 0
    try:
        state = runtime.start_run(cfg.dist)
        if state.is_main_process:
            if overwrite and not resume and out.exists():
                for p in out.glob("*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                (out / RUN_MARKER).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / RUN_MARKER).write_text("written by stagewise; marks this directory as a run output\n")
            dump_config(cfg, out / "config.yaml")
        runtime.barrier()
        tracker = Tracker(out, tensorboard=cfg.logging.tensorboard, config=cfg.model_dump(mode="json", exclude={"ablations"}))
        skipped = {f"data_skipped/{d.name}": len(d.skipped) for d in domains if d.skipped}
        if skipped:
            tracker.log(skipped, step=0)
        result = _run_stages(cfg, state, tracker, domains, base_path, resume=resume, stop_after=stop_after)
        ok = True
        return result
    finally:
        stop.restore()
        runtime.end_run(tracker, ok)


def _run_stages(cfg: RunConfig, dist_state, tracker: Tracker, domains: list[Domain], base_path: str, *,
                resume: bool, stop_after: int | None) -> dict:
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    by_name = {d.name: d for d in domains}
    print0(f"[stagewise] {cfg.dist.strategy} x{dist_state.num_processes} on {dist_state.device}; "
           f"model {cfg.model.name_or_path} -> {base_path}; output {out}")
    tok = load_tokenizer(base_path, cfg.model.trust_remote_code)
    state = _load_state(out) if resume else {"rows": {}, "loss_rows": {}, "stage_results": {}}
    state.setdefault("loss_rows", {})

    def evaluate(path: str, key: str, label: str, step: int) -> None:
        faults.maybe_kill("eval", stage=int(key), rank=dist_state.process_index)
        set_policy_weights(prev_path)  # a `model: policy` customer: the evaluated stage's starting weights
        state["rows"][key], state["loss_rows"][key], samples[label] = evaluate_row(
            dist_state, cfg, tok, path, domains, tracker, label if key == "0" else f"after {label}", step)
        if dist_state.is_main_process:
            _save_state(out, {**state, "samples": samples})
        runtime.barrier()

    offset = 0
    samples = state.get("samples", {})
    prev_path = base_path
    if cfg.eval.before_first_stage and "0" not in state["rows"]:
        evaluate(base_path, "0", "base", 0)
    stopped = False
    for i, st in enumerate(cfg.stages):
        sdir = stage_dir(cfg, i)
        if not is_exported(sdir / "model"):
            if stopped_by() is not None:  # a signal arrived in the previous stage's last step
                stopped = True
                break
            if stop_after is not None and offset >= stop_after:
                stopped = True
                break
            set_policy_weights(prev_path)
            gc = cfg.stage_part(i, "grpo")
            ref_path = None if gc.beta == 0 else (base_path if gc.reference == "base" else prev_path)
            replay = [by_name[d] for s in cfg.stages[:i] for d in s.domains if d not in st.domains]
            job = StageJob(cfg=cfg, index=i, tokenizer=tok, domains=[by_name[d] for d in st.domains],
                           replay_domains=list(dict.fromkeys(replay)), init_path=prev_path, ref_path=ref_path,
                           out_dir=sdir, run_dir=out, tracker=tracker,
                           resume=resume and latest_checkpoint(sdir, quiet=True) is not None,
                           stop_after=None if stop_after is None else stop_after - offset,
                           global_step_offset=offset)
            t0 = time.time()
            length = f"{cfg.stage_steps(i)} steps" if cfg.stage_steps(i) else f"{st.epochs:g} epochs"
            print0(f"[stagewise] stage {i + 1}/{len(cfg.stages)}: {st.kind} on {', '.join(st.domains)} for {length}"
                   + (f", replay {st.replay:.0%}" if st.replay else ""))
            res = lookup("stage", st.kind).train(job)
            if res["stopped"]:
                stopped = True
                break
            state["stage_results"][str(i + 1)] = {"kind": st.kind, "steps": res["steps"], "seconds": time.time() - t0,
                                                  "curve": job.curve}
        steps = json.loads((sdir / "model" / "stagewise.json").read_text())["steps"]
        if str(i + 1) not in state["rows"]:
            evaluate(str(sdir / "model"), str(i + 1), f"stage {i + 1}", offset + steps)
        prev_path = str(sdir / "model")
        offset += steps

    result = {"stopped": stopped, "output_dir": str(out)}
    if not stopped:
        present = [k for k in range(len(cfg.stages) + 1) if str(k) in state["rows"]]
        rows = [state["rows"][str(k)] for k in present]
        losses = [state["loss_rows"].get(str(k)) for k in present]
        result["matrix"] = rows
        if any(x is not None for row in losses if row for x in row):
            result["loss_matrix"] = losses
        if len(rows) == len(cfg.stages) + 1:
            own = [[[d.name for d in domains].index(n) for n in st.domains] for st in cfg.stages]
            result["metrics"] = continual_metrics(rows, own)
            if "loss_matrix" in result:
                result["loss_metrics"] = loss_metrics(losses, own)
        if dist_state.is_main_process:
            final = out / "final_model"
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(prev_path, final)
            state["metrics"] = result.get("metrics")
            state["loss_metrics"] = result.get("loss_metrics")
            _save_state(out, {**state, "samples": samples})
            from stagewise.report import write_report

            write_report(out, cfg, [d.name for d in domains])
            print_matrix(cfg, [d.name for d in domains], present, rows, result.get("metrics"), losses)
    elif stopped_by() is not None:
        result["signal"] = stopped_by()
        print0(f"[stagewise] stopped by {stopped_by()}: the current step finished and was checkpointed; "
               f"continue with --resume")
    else:
        print0(f"[stagewise] stopped after {stop_after} steps; continue with --resume")
    return result


def print_matrix(cfg: RunConfig, names: list[str], present: list[int], rows: list[list], metrics: dict | None,
                 losses: list | None = None) -> None:
    from rich.table import Table

    from stagewise.tracking import _console

    labels = ["base"] + [f"stage {i + 1} ({'+'.join(s.domains)})" for i, s in enumerate(cfg.stages)]
    for title, table_rows in (("accuracy matrix R (greedy, held-out)", rows),
                              ("held-out loss L (assistant tokens, mean NLL)", losses or [])):
        if not any(x is not None for row in table_rows if row for x in row):
            continue
        t = Table(title=title)
        t.add_column("after")
        for n in names:
            t.add_column(n, justify="right")
        for lab, row in zip([labels[k] for k in present], table_rows):
            t.add_row(lab, *("-" if x is None else f"{x:.3f}" for x in (row or [None] * len(names))))
        _console.print(t)
    if metrics:
        _console.print("  ".join(f"{k} {v:+.3f}" if v is not None else f"{k} n/a" for k, v in metrics.items()))

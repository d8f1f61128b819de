"""`stagewise eval`: a run's evaluation (one row of its matrices) for any model, outside a run.

    stagewise eval runs/x/config.yaml --model runs/x/stage-1-add/model --out stage1.json
    stagewise eval configs/three_domains.yaml --model bundled:smollm2-135m-instruct --name smollm2 --out smol.json
    stagewise eval CONFIG --model M --domains add,max --trials 4 eval.max_new_tokens=32
    stagewise eval CONFIG --model M --num-processes 4       # relaunches itself under `accelerate launch`
    accelerate launch --multi_gpu --num_processes 4 -m stagewise eval CONFIG --model M   # the same
    stagewise report runs/x --baseline smol.json             # the row in the run's report, labelled

The row is ``evaluation.evaluate_row``'s, the function the curriculum calls before the first stage and
after each one, with the config's domains (the held-out split is a function of the seed and the
domain's spec), eval settings and precision: the row of a stage's exported model equals that stage's
row in the run (a ``model: policy`` simulated user is the evaluated model here, the stage's starting
weights in a run). The model is replicated on every process whatever ``dist.strategy`` says
(evaluation never shards, see evaluation.py), so this runs as ``single``, or ``ddp`` under a launcher.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from stagewise.config import DomainSpec, RunConfig, read_config, resolve_raw, validate
from stagewise.errors import ConfigError, ModelLoadError
from stagewise.tracking import print0, show0


@dataclass
class EvalRequest:
    """What `stagewise eval` was asked, checked: everything here is known before any model loads."""

    config_path: str
    cfg: RunConfig
    model: str  # as given: a model directory, a .gguf file, a bundled: name or a hub id
    model_path: str  # what from_pretrained loads (a GGUF is converted once, before any process group)
    domains: list[tuple[int, DomainSpec]]  # (place in cfg.domains, spec), in the config's order
    name: str
    out: str | None = None
    overrides: list[str] = field(default_factory=list)  # the user's, and --trials as eval.trials


def check_request(config: str, overrides: list[str], *, model: str | None = None, domains: str | None = None,
                  trials: int | None = None, name: str | None = None, out: str | None = None) -> EvalRequest:
    """The config, the domains and the model path, each refused in one line (ConfigError /
    ModelLoadError) before a model or a process group exists."""
    import stagewise.builtins  # noqa: F401  (every built-in name, as a run has them)
    from stagewise.continual.preflight import check_names, import_plugins
    from stagewise.models import load_model_config, resolve_model_path

    overrides = list(overrides) + ([f"eval.trials={trials}"] if trials is not None else [])
    raw = resolve_raw(read_config(config), overrides)
    if not raw.get("domains"):  # before the schema, whose complaint would be about the stages
        raise ConfigError(f"{config}: the config has no domains to evaluate (`domains:` is empty)")
    cfg = validate(raw)
    have = [s.name for s in cfg.domains]
    wanted = [x.strip() for x in domains.split(",") if x.strip()] if domains is not None else have
    unknown = [x for x in wanted if x not in have]
    if unknown or not wanted:
        raise ConfigError(f"--domains: unknown domain {unknown[0]!r} (the config has {', '.join(have)})" if unknown
                          else f"--domains: no domain named (the config has {', '.join(have)})")
    import_plugins(cfg)
    check_names(cfg)
    model = model or cfg.model.name_or_path
    try:
        path = resolve_model_path(model)
        load_model_config(path, cfg.model.trust_remote_code)
    except ModelLoadError as e:  # its messages name the config key; here the model came from --model
        raise ModelLoadError(str(e).replace("model.name_or_path", "--model", 1)) from None
    picked = [(i, s) for i, s in enumerate(cfg.domains) if s.name in wanted]
    return EvalRequest(config_path=str(config), cfg=cfg, model=model, model_path=path, domains=picked,
                       name=name or model, out=out, overrides=overrides)


class _Kept:
    """A tracker that keeps what ``evaluate_row`` logs (pass^k, details, perplexity): the JSON's metrics."""

    def __init__(self):
        self.logged: dict = {}

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.logged.update(metrics)


def evaluate_model(req: EvalRequest) -> dict:
    """The row for ``req.model`` on this process's share of the held-out tasks. Collective: under a
    launcher every rank calls it. The main process prints the row and writes ``req.out``."""
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    from stagewise.domains.base import build_domain
    from stagewise.envs.users import set_policy_weights
    from stagewise.evaluation import evaluate_row
    from stagewise.models import load_tokenizer
    from stagewise.parallel import runtime

    hf_logging.disable_progress_bar()
    world = runtime.world_size_from_env()
    if world == 1 and (warning := runtime.one_process_launch_warning()):
        print0(f"[stagewise] {warning}")
    dist, note = runtime.resolve_precision(
        req.cfg.dist.model_copy(update={"strategy": "ddp" if world > 1 else "single"}))
    if note:
        print0(f"[stagewise] {note}")
    cfg = req.cfg.model_copy(update={"dist": dist})
    domains = [build_domain(spec, cfg.seed, on_error=cfg.data.on_error, where=f"domains.{i}")
               for i, spec in req.domains]
    tok = load_tokenizer(req.model_path, cfg.model.trust_remote_code)
    kept, ok = _Kept(), False
    try:
        # a launch profile may have asked for DeepSpeed / FSDP: evaluation replicates the model, so
        # the process group is a plain one (end_run restores the variables)
        runtime.set_env("ACCELERATE_USE_DEEPSPEED", None)
        runtime.set_env("ACCELERATE_USE_FSDP", None)
        state = runtime.start_run(cfg.dist)
        set_seed(cfg.seed)  # as the curriculum does before its evaluations
        set_policy_weights(req.model_path)
        t0 = time.time()
        row, losses, samples, details = evaluate_row(state, cfg, tok, req.model_path, domains, kept, req.name, 0)
        result = eval_result(req, [d.name for d in domains], row, losses, samples, details, kept.logged,
                             world=state.num_processes, seconds=time.time() - t0)
        if state.is_main_process:
            print_row(result)
            if req.out:
                Path(req.out).parent.mkdir(parents=True, exist_ok=True)
                Path(req.out).write_text(json.dumps(result, indent=2) + "\n")
                print0(f"[stagewise] eval: wrote {req.out} (add it to a run's report: stagewise report RUN_DIR "
                       f"--baseline {req.out})")
        ok = True
        return result
    finally:
        runtime.end_run(None, ok)


def eval_result(req: EvalRequest, names: list[str], row: list, losses: list, samples: dict, details: dict,
                logged: dict, *, world: int, seconds: float) -> dict:
    """The JSON of one evaluation: cells by domain (None where a domain has no metric / no loss)."""
    from stagewise.machine import package_version

    pass_k = {}
    for d in names:
        prefix = f"eval/{d}/pass^"
        ks = {k[len(prefix):]: v for k, v in logged.items() if k.startswith(prefix)}
        if ks:
            pass_k[d] = ks
    return {
        "name": req.name, "model": req.model, "model_path": req.model_path, "config_path": req.config_path,
        "domains": names,
        "accuracy": dict(zip(names, row)), "loss": dict(zip(names, losses)), "pass_k": pass_k, "details": details,
        "metrics": {k: v for k, v in logged.items() if k not in ("eval_row", "eval_time")},
        "trials": req.cfg.eval.trials, "num_processes": world, "seconds": round(seconds, 3),
        "stagewise": package_version("stagewise"),
        # what made the held-out tasks and the decoding: `report --baseline` checks it against the run's
        "config": req.cfg.model_dump(mode="json", exclude={"ablations"}),
        "samples": samples,
    }


def print_row(result: dict) -> None:
    """The row as a small table: accuracy, held-out loss and pass^k (k > 1) per domain."""
    from rich.table import Table

    names = result["domains"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    t = Table(title=f"stagewise eval: {result['name']}")
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    t.add_row("accuracy", *(fmt(result["accuracy"][n]) for n in names))
    if any(x is not None for x in result["loss"].values()):
        t.add_row("held-out loss", *(fmt(result["loss"][n]) for n in names))
    for k in sorted({k for ks in result["pass_k"].values() for k in ks}, key=int):
        if k != "1":
            t.add_row(f"pass^{k}", *(fmt(result["pass_k"].get(n, {}).get(k)) for n in names))
    show0(t)


def relaunch(req: EvalRequest, num_processes: int, port: int | None = None) -> int:
    """Become ``accelerate launch --multi_gpu --num_processes N -m stagewise eval ...`` (the same
    request, each rank checks it again: cheap, and a GGUF is already converted)."""
    from types import SimpleNamespace

    from stagewise.parallel.launch import build_launch_command, run_command
    from stagewise.parallel.runtime import _free_port

    args = ["--model", req.model, "--domains", ",".join(s.name for _, s in req.domains), "--name", req.name]
    args += ["--out", req.out] if req.out else []
    # one machine: any free port will do (a fixed default collides with a run already on this machine)
    launch = SimpleNamespace(entry="eval", config=req.config_path, rest=[*args, *req.overrides], strategy="ddp",
                             offload=None, num_processes=num_processes, num_machines=1, machine_rank=0,
                             main_process_ip="127.0.0.1", main_process_port=port or _free_port(),
                             launcher="accelerate")
    cmd, env = build_launch_command(launch)
    return run_command(cmd, env)

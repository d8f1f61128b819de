"""The `stagewise` command.

    stagewise run CONFIG [key=value ...] [--ablation NAME] [--resume] [--overwrite] [--stop-after N]
    stagewise continual [--model M] [--tasks-per-domain N] [key=value ...]   # built-in 3-domain run
    stagewise sweep CONFIG [--only a,b] [key=value ...]      # every named ablation, compared
    stagewise launch --strategy S --num-processes N [...] CONFIG [key=value ...]
    stagewise slurm --nodes N --gpus-per-node G CONFIG [key=value ...] > job.sbatch
    stagewise report OUTPUT_DIR [--baseline FILE.json ...]   # + rows of `stagewise eval`, labelled
    stagewise eval CONFIG --model PATH [--domains a,b] [--trials k] [--out FILE.json] [--num-processes N]
    stagewise demos CONFIG --domain NAME --agent oracle|model|endpoint --out FILE.jsonl   # SFT demonstrations
    stagewise plan CONFIG [--num-processes N] [--device-memory 80GB] [--recommend] [key=value ...]
    stagewise doctor CONFIG [launch options] [key=value ...] | doctor --selftest   # every check before a long run
    stagewise env                                             # versions, devices, backends: paste into an issue

A user error (bad config, missing file) prints one line ``error: ...`` and exits with status 2; a
run that had to stop (repeated non-finite steps, a lost peer process) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stagewise.errors import StagewiseError

REPO = Path(__file__).resolve().parents[1]
THREE_DOMAINS = REPO / "configs" / "three_domains.yaml"


def _run(args) -> int:
    from stagewise.config import load_config

    cfg = load_config(args.config, args.overrides, args.ablation)  # fail fast, before heavy imports
    from stagewise.continual.curriculum import run_curriculum

    run_curriculum(cfg, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, force=args.force)
    return 0


def _continual(args) -> int:
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    if not THREE_DOMAINS.is_file():
        raise StagewiseError(f"built-in config not found at {THREE_DOMAINS}")
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.tasks_per_domain:
        import yaml

        n = len(yaml.safe_load(THREE_DOMAINS.read_text())["stages"])
        for i in range(n):
            overrides += [f"stages.{i}.tasks_per_domain={args.tasks_per_domain}", f"stages.{i}.steps=null"]
    cfg = load_config(THREE_DOMAINS, overrides, args.ablation)
    run_curriculum(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    return 0


def _demos(args) -> int:
    from stagewise.config import load_config

    cfg = load_config(args.config, args.overrides)
    from stagewise.continual.preflight import check_config
    from stagewise.demos import write_demos
    from stagewise.domains.base import build_domain
    from stagewise.errors import ConfigError

    check_config(cfg, 1)
    specs = [(i, s) for i, s in enumerate(cfg.domains) if s.name == args.domain]
    if not specs:  # only this domain is built: another may read the file being written
        raise ConfigError(f"--domain {args.domain}: the config has no such domain "
                          f"(has {', '.join(s.name for s in cfg.domains)})")
    i, spec = specs[0]
    domain = build_domain(spec, cfg.seed, on_error=cfg.data.on_error, where=f"domains.{i}")
    stats = write_demos(cfg, [domain], domain=args.domain, split=args.split, agent=args.agent, out=Path(args.out),
                        model=args.model, url=args.url, trials=args.trials, temperature=args.temperature,
                        min_reward=args.min_reward, limit=args.limit, corrections=args.corrections)
    print(f"[stagewise] demos: kept {stats.kept} of {stats.episodes} episodes (mean reward {stats.mean_reward:.3f}) "
          f"-> {args.out} in {stats.seconds:.0f} s")
    if stats.token_mismatches:
        print(f"[stagewise] demos: {stats.token_mismatches} record(s) render to other tokens than their episode "
              f"sampled (the agent wrote a non-canonical tokenisation); SFT learns the canonical one")
    return 0


def _sweep(args) -> int:
    from stagewise.sweep import run_sweep

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    run_sweep(args.config, args.overrides, only)
    return 0


def _report(args) -> int:
    from stagewise.config import load_config
    from stagewise.report import write_report

    out = Path(args.output_dir)
    cfg = load_config(out / "config.yaml")
    if args.baseline:
        from stagewise.report import add_baselines

        print(f"baselines: {', '.join(add_baselines(out, args.baseline, [d.name for d in cfg.domains]))}")
    print(write_report(out, cfg, [d.name for d in cfg.domains]))
    return 0


def _eval(args) -> int:
    from stagewise.continual.evaluate_model import check_request, evaluate_model, relaunch
    from stagewise.parallel.runtime import world_size_from_env

    request = check_request(args.config, args.overrides, model=args.model, domains=args.domains, trials=args.trials,
                            name=args.name, out=args.out)  # every one-line refusal, before any model loads
    if args.num_processes > 1 and world_size_from_env() == 1:
        return relaunch(request, args.num_processes)
    evaluate_model(request)
    return 0


def _launch(args) -> int:
    from stagewise.config import load_config
    from stagewise.doctor import Launch
    from stagewise.parallel.launch import build_launch_command, launch_overrides, run_command

    # the config the ranks will run, checked here for their number: a bad name or shape stops now,
    # not once every process has imported torch
    if "--dry-run" in (args.rest or []):  # also after the config: never passed on to the ranks
        args.rest = [r for r in args.rest if r != "--dry-run"]
        args.dry_run = True
    cfg = load_config(args.config, launch_overrides(args), _flag_value(args.rest, "--ablation"))
    _refuse_on_problems(cfg, Launch(processes=args.num_processes, machines=args.num_machines,
                                    machine_rank=args.machine_rank, main_ip=args.main_process_ip,
                                    main_port=args.main_process_port))
    cmd, env = build_launch_command(args)
    if args.dry_run:
        import shlex

        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + (" " if env else "") + shlex.join(cmd))
        return 0
    return run_command(cmd, env)


def _plan(args) -> int:
    from stagewise.continual.preflight import check_config
    from stagewise.doctor import Context, Launch
    from stagewise.planning.plan import GIB, plan_run, recommend
    from stagewise.planning.prompts import environment_names
    from stagewise.planning.tables import format_plans, format_recommendation, parse_memory

    cfg = _config_with_strategy(args)
    launch = Launch(processes=args.num_processes, machines=args.num_machines, prompt_tokens=args.prompt_tokens,
                    device_memory=parse_memory(args.device_memory) if args.device_memory else None)
    check_config(cfg, launch.world)
    ctx = Context(cfg, launch)
    config, shape = ctx.shape()
    domains, problems = ctx.domains()
    for problem in problems:  # data not here yet (demonstrations to make first): planned without it
        print(f"[stagewise] plan: {problem}: planned as a single-turn domain")
    prompt_tokens, note = ctx.prompt_tokens()  # RL rows and evaluation start from the domains' prompts
    if prompt_tokens is None:
        prompt_tokens = 1024
        note += f"; planned with {prompt_tokens} prompt tokens (--prompt-tokens N to set)"
    print(f"[stagewise] plan: {note}")
    print(f"[stagewise] plan: {shape.name}: {shape.params / 1e9:.3f} B parameters"
          f"{f' ({shape.trainable / 1e6:.1f} M trainable, LoRA)' if shape.lora_params else ''}, "
          f"{shape.layers} layers, vocabulary {shape.vocab}; {launch.world} process(es)")
    device_memory = ctx.device_memory()
    if args.recommend:
        memory = device_memory or 80 * GIB
        print(format_recommendation(recommend(cfg, shape, config, device_memory=memory, prompt_tokens=prompt_tokens,
                                              environments=environment_names(domains)), memory))
        return 0
    plans = plan_run(cfg, shape, config, world=launch.world, prompt_tokens=prompt_tokens,
                     environments=environment_names(domains), device_memory=device_memory)
    print(format_plans(plans, device_memory))
    return 0


def _config_with_strategy(args):
    """The config with the command's --strategy / --offload applied (plan, doctor)."""
    from stagewise.config import load_config

    overrides = list(args.overrides) + ([f"dist.strategy={args.strategy}"] if args.strategy else []) \
        + ([f"dist.offload={args.offload}"] if args.offload else [])
    return load_config(args.config, overrides)


def _env(args) -> int:
    from stagewise.machine import machine_report

    print(machine_report())
    return 0


def _visible_device_memory() -> float | None:
    try:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001  (no CUDA runtime: no default)
        return None


def _refuse_on_problems(cfg, launch, skip=()) -> None:
    """doctor's checks before anything starts: every problem on its own line, then a refusal."""
    from stagewise.doctor import diagnose
    from stagewise.errors import ConfigError

    findings = diagnose(cfg, launch, skip=skip)
    for f in findings:
        if f.warn:
            print(f"warning: {f.check}: {f.message}", file=sys.stderr)
    failed = [f for f in findings if not f.ok]
    if failed:
        lines = [f.message if f.check == "config" else f"{f.check}: {f.message}" for f in failed]
        for line in lines[:-1]:
            print(f"error: {line}", file=sys.stderr)
        raise ConfigError(lines[-1])  # printed as the last "error: ..." line


def _doctor(args) -> int:
    from stagewise.doctor import Launch, diagnose, selftest
    from stagewise.planning.tables import parse_memory

    if args.selftest:
        findings = selftest(args.backend)
    else:
        if not args.config:
            raise StagewiseError("doctor: give a CONFIG (or --selftest)")
        cfg = _config_with_strategy(args)
        findings = diagnose(cfg, Launch(processes=args.num_processes, machines=args.num_machines,
                                        machine_rank=args.machine_rank, main_ip=args.main_process_ip,
                                        main_port=args.main_process_port, prompt_tokens=args.prompt_tokens,
                                        device_memory=parse_memory(args.device_memory) if args.device_memory else None))
    for f in findings:
        print(f.line())
    failed, warned = sum(not f.ok for f in findings), sum(f.warn for f in findings)
    print((f"{failed} problem(s)" if failed else "no problems found") + (f", {warned} warning(s)" if warned else ""))
    return 1 if failed else 0


def _flag_value(rest: list[str] | None, flag: str) -> str | None:
    """The value of ``flag`` among the run flags passed through (``--ablation x`` or ``--ablation=x``)."""
    rest = rest or []
    for k, item in enumerate(rest):
        if item == flag and k + 1 < len(rest):
            return rest[k + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def _slurm(args) -> int:
    from stagewise.config import load_config
    from stagewise.doctor import Launch
    from stagewise.parallel.launch import launch_overrides, slurm_script

    # the job's config checked for its nodes x GPUs now, not after the queue wait (the rendezvous is
    # the allocation's first node, known only then)
    cfg = load_config(args.config, launch_overrides(args), _flag_value(args.rest, "--ablation"))
    _refuse_on_problems(cfg, Launch(processes=args.gpus_per_node, machines=args.nodes), skip=("rendezvous",))
    text = slurm_script(args)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def _at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is less than {lo}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stagewise", description="Continual GRPO post-training on Accelerate.")
    sub = p.add_subparsers(dest="command", required=True)

    def run_flags(sp):
        sp.add_argument("--ablation", help="apply the named override set from the config's `ablations:`")
        sp.add_argument("--resume", action="store_true", help="continue from the last complete stage/step")
        sp.add_argument("--overwrite", action="store_true", help="start again in an output_dir that holds a run")
        sp.add_argument("--force", action="store_true",
                        help="with --resume: continue even though model, data, batch or seed changed")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 stages.0.steps=10")

    r = sub.add_parser("run", help="run a config (one or more stages)")
    r.add_argument("config")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps in total (checkpointed; continue with --resume)")
    run_flags(r)
    r.set_defaults(fn=_run)

    c = sub.add_parser("continual", help="the built-in three-domain continual run (configs/three_domains.yaml)")
    c.add_argument("--model", help="model.name_or_path (HF dir, hub id in the local cache, .gguf, bundled:...)")
    c.add_argument("--tasks-per-domain", type=int, help="training prompts per domain, per stage")
    c.add_argument("--output-dir")
    run_flags(c)
    c.set_defaults(fn=_continual)

    sw = sub.add_parser("sweep", help="run every named ablation of a config and compare them (sweep.md/csv/png)")
    sw.add_argument("config")
    sw.add_argument("--only", help="comma-separated ablation names (default: all)")
    sw.add_argument("overrides", nargs="*", help="dotted overrides applied to every ablation")
    sw.set_defaults(fn=_sweep)

    rep = sub.add_parser("report", help="rewrite report.md and plots of an output directory")
    rep.add_argument("output_dir")
    rep.add_argument("--baseline", action="append", default=[], metavar="FILE.json",
                     help="a `stagewise eval --out` result: kept in OUTPUT_DIR/baselines/, shown as a labelled row")
    rep.set_defaults(fn=_report)

    ev = sub.add_parser("eval", help="the config's held-out evaluation (one matrix row) of any model: table, JSON")
    ev.add_argument("config")
    ev.add_argument("--model", help="model dir, .gguf, bundled:... or hub id (default: the config's model)")
    ev.add_argument("--domains", help="comma-separated domain names of the config (default: all)")
    ev.add_argument("--trials", type=_at_least(1), default=None, help="episodes per environment task (eval.trials)")
    ev.add_argument("--name", help="the row's label (default: --model)")
    ev.add_argument("--out", help="write the row as JSON here (for `stagewise report RUN --baseline`)")
    ev.add_argument("--num-processes", type=_at_least(1), default=1,
                    help="evaluate on N local processes (relaunches itself under accelerate launch)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. eval.max_new_tokens=64")
    ev.set_defaults(fn=_eval)

    de = sub.add_parser("demos", help="write successful episodes of a domain as chat SFT records (demonstrations)")
    de.add_argument("config")
    de.add_argument("--domain", required=True, help="a domain name of the config")
    de.add_argument("--split", choices=["train", "eval"], default="train")
    de.add_argument("--agent", choices=["oracle", "model", "endpoint"], default="oracle")
    de.add_argument("--model", help="model: a local model (default: the config's); endpoint: the server's model name")
    de.add_argument("--url", help="endpoint: an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    de.add_argument("--trials", type=_at_least(1), default=1, help="episodes per task (1: greedy; more: sampled)")
    de.add_argument("--temperature", type=float, default=1.0, help="with --trials > 1")
    de.add_argument("--min-reward", type=float, default=None,
                    help="keep episodes whose reward reaches this (default: those whose metric passes)")
    de.add_argument("--limit", type=_at_least(1), default=None, help="the first N tasks of the split")
    de.add_argument("--corrections", action="store_true",
                    help="oracle: also play each task with one wrong call (a tool error) before the right one; "
                         "the wrong turn is written with weight 0 (shown, not learnt)")
    de.add_argument("--out", required=True, help="the JSONL file to write")
    de.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    de.set_defaults(fn=_demos)

    la = sub.add_parser("launch", help="launch a config on N processes / machines")
    la.add_argument("--strategy", required=True, choices=["single", "ddp", "fsdp", "zero1", "zero2", "zero3"])
    la.add_argument("--num-processes", type=_at_least(1), default=1, help="processes per machine")
    la.add_argument("--num-machines", type=_at_least(1), default=1)
    la.add_argument("--machine-rank", type=_at_least(0), default=0)
    la.add_argument("--main-process-ip", default="127.0.0.1")
    la.add_argument("--main-process-port", type=int, default=29500)
    la.add_argument("--launcher", choices=["accelerate", "torchrun", "deepspeed"], default="accelerate")
    la.add_argument("--offload", choices=["none", "optimizer", "optimizer_and_params"], default=None)
    la.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    la.add_argument("config")
    la.add_argument("rest", nargs=argparse.REMAINDER, help="overrides and run flags passed through")
    la.set_defaults(fn=_launch)

    pl = sub.add_parser("plan", help="memory per device for a config's stages, or which strategies fit (--recommend)")
    pl.add_argument("--num-processes", type=_at_least(1), default=1, help="processes per machine")
    pl.add_argument("--num-machines", type=_at_least(1), default=1)
    pl.add_argument("--strategy", choices=["single", "ddp", "fsdp", "zero1", "zero2", "zero3"], default=None)
    pl.add_argument("--offload", choices=["none", "optimizer", "optimizer_and_params"], default=None)
    pl.add_argument("--device-memory", default=None,
                    help="memory per device: 80GB (10^9 bytes) or 80GiB (default: the visible GPU's)")
    pl.add_argument("--prompt-tokens", type=_at_least(1), default=None,
                    help="RL prompt length (default: the longest measured with the model's tokenizer)")
    pl.add_argument("--recommend", action="store_true", help="for 1-16 devices: the strategies that fit, fastest first")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.set_defaults(fn=_plan)

    do = sub.add_parser("doctor", help="every check before a long run, each problem on one line with its fix")
    do.add_argument("--num-processes", type=_at_least(1), default=1, help="processes per machine")
    do.add_argument("--num-machines", type=_at_least(1), default=1)
    do.add_argument("--machine-rank", type=_at_least(0), default=0)
    do.add_argument("--main-process-ip", default="127.0.0.1")
    do.add_argument("--main-process-port", type=int, default=29500)
    do.add_argument("--strategy", choices=["single", "ddp", "fsdp", "zero1", "zero2", "zero3"], default=None)
    do.add_argument("--offload", choices=["none", "optimizer", "optimizer_and_params"], default=None)
    do.add_argument("--device-memory", default=None, help="memory per device (default: the visible GPU's)")
    do.add_argument("--prompt-tokens", type=_at_least(1), default=None)
    do.add_argument("--selftest", action="store_true",
                    help="all-reduce, barrier and broadcast between 2 local processes, timed (no config needed)")
    do.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                    help="selftest backend (default: nccl on GPUs)")
    do.add_argument("config", nargs="?")
    do.add_argument("overrides", nargs="*")
    do.set_defaults(fn=_doctor)

    en = sub.add_parser("env", help="versions, devices, CPU bf16, backends, accelerate config, NCCL/MASTER variables")
    en.set_defaults(fn=_env)

    sl = sub.add_parser("slurm", help="write an sbatch script (one task per node, srun + accelerate launch)")
    sl.add_argument("--strategy", default="zero2", choices=["ddp", "fsdp", "zero1", "zero2", "zero3"])
    sl.add_argument("--nodes", type=_at_least(1), required=True)
    sl.add_argument("--gpus-per-node", type=_at_least(1), required=True)
    sl.add_argument("--job-name", default="stagewise")
    sl.add_argument("--time", default="24:00:00")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--port", type=int, default=29500)
    sl.add_argument("--output", "-o", help="write the script here instead of stdout")
    sl.add_argument("config")
    sl.add_argument("rest", nargs=argparse.REMAINDER)
    sl.set_defaults(fn=_slurm)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after flags: collect key=value leftovers for run/continual
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except StagewiseError as e:
        print(f"error: {_rank_prefix()}{_first_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as e:
        if not _lost_peer(e):
            raise
        if _timed_out(e):
            print(f"error: {_rank_prefix()}another process did not answer within the collective timeout "
                  f"(dist.timeout_s): it is stuck or gone ({_first_line(e)[:200]}); its log has the cause",
                  file=sys.stderr)
        else:
            print(f"error: {_rank_prefix()}lost contact with another process ({_first_line(e)[:200]}); it failed or "
                  f"was stopped first: its log has the cause", file=sys.stderr)
        return 1


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rank_prefix() -> str:
    import os

    return f"rank {os.environ.get('RANK', '?')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _timed_out(e: BaseException) -> bool:
    text = str(e).lower()  # gloo: "Timed out waiting ...", c10d: "Socket Timeout", NCCL: "timed out after"
    return "timed out" in text or "timeout" in text


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because a peer process died, left, or timed out (not a bug on this rank)."""
    td = sys.modules.get("torch.distributed")
    if td is not None and isinstance(e, getattr(td, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
        "Timed out waiting", "timed out after", "NCCL communicator was aborted"))


if __name__ == "__main__":
    sys.exit(main())

"""Launcher commands (accelerate | torchrun | deepspeed) and SLURM scripts from a strategy name.

    stagewise launch --strategy zero2 --num-processes 2 --dry-run configs/three_domains.yaml
    stagewise slurm --nodes 2 --gpus-per-node 8 --strategy zero3 configs/three_domains.yaml > job.sbatch

Every launcher starts the same entry point, ``python -m stagewise run CONFIG ... dist.strategy=S``;
the runtime module then builds the matching Accelerator.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from stagewise.errors import StagewiseError

ZERO = {"zero1": 1, "zero2": 2, "zero3": 3}


def _strategy_overrides(args) -> list[str]:
    extra = [f"dist.strategy={args.strategy}"]
    if getattr(args, "offload", None):
        extra.append(f"dist.offload={args.offload}")
    return extra


def launch_overrides(args) -> list[str]:
    """The dotted overrides the launched ranks apply: the user's, then the launch's strategy."""
    rest = [r for r in (args.rest or []) if r != "--"]
    flags_with_value = {"--ablation", "--stop-after"}
    given = [r for k, r in enumerate(rest) if "=" in r and not r.startswith("-")
             and not (k and rest[k - 1] in flags_with_value)]
    return given + _strategy_overrides(args)


def _entry(args) -> list[str]:
    rest = [r for r in (args.rest or []) if r != "--"]
    # the ranks run `stagewise run` (or `args.entry`: `stagewise eval --num-processes N` relaunches itself)
    return [getattr(args, "entry", "run"), args.config, *rest, *_strategy_overrides(args)]


def _tool(name: str) -> list[str]:
    """Prefer the launcher installed next to this Python (the project's venv)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return [here] if os.path.exists(here) else [shutil.which(name) or name]


def accelerate_strategy_flags(strategy: str, world: int, machines: int) -> list[str]:
    """``accelerate launch`` flags for a strategy. Several machines under DeepSpeed take the
    torchrun-style launcher (one per machine, ``standard``): accelerate's default there is DeepSpeed's
    pdsh runner, which without a hostfile runs every machine as a job of its own."""
    if strategy in ZERO:
        flags = ["--use_deepspeed", "--zero_stage", str(ZERO[strategy])]
        if machines > 1:
            flags += ["--deepspeed_multinode_launcher", "standard"]
        return flags
    if strategy == "fsdp":
        return ["--use_fsdp", "--fsdp_version", "2"]
    if strategy == "ddp" or world > 1:
        return ["--multi_gpu"]
    return []


def build_launch_command(args) -> tuple[list[str], dict[str, str]]:
    """-> (argv, extra environment)."""
    n, m = args.num_processes, args.num_machines
    entry = _entry(args)
    env: dict[str, str] = {}
    if args.launcher == "accelerate":
        cmd = _tool("accelerate") + ["launch", "--num_processes", str(n * m), "--num_machines", str(m),
                                     "--machine_rank", str(args.machine_rank),
                                     "--main_process_ip", args.main_process_ip,
                                     "--main_process_port", str(args.main_process_port)]
        cmd += accelerate_strategy_flags(args.strategy, n * m, m)
        if m > 1 or args.main_process_ip not in ("127.0.0.1", "localhost"):
            cmd += ["--rdzv_backend", "static", "--same_network"]
        return cmd + ["-m", "stagewise", *entry], env
    if args.launcher == "torchrun":
        cmd = _tool("torchrun") + ["--nnodes", str(m), "--nproc_per_node", str(n),
                                   "--node_rank", str(args.machine_rank),
                                   "--master_addr", args.main_process_ip, "--master_port", str(args.main_process_port),
                                   "-m", "stagewise", *entry]
        return cmd, env
    if args.launcher == "deepspeed":
        if m > 1:
            # DeepSpeed's runner reads a hostfile even with --no_ssh; without one it falls back to
            # this machine alone and raises "Num nodes is >1 but no extra nodes available via hostfile"
            raise StagewiseError("--launcher deepspeed runs on one machine here (DeepSpeed's runner needs a "
                                 "hostfile of every node for more); for several machines use --launcher "
                                 "accelerate (the default) or torchrun, which start one launcher per machine")
        cmd = _tool("deepspeed") + ["--num_nodes", str(m), "--num_gpus", str(n), "--node_rank", str(args.machine_rank),
                                    "--master_addr", args.main_process_ip, "--master_port", str(args.main_process_port),
                                    "--no_ssh", "--no_local_rank", "--module", "stagewise", *entry]
        return cmd, env
    raise ValueError(args.launcher)


def run_command(cmd: list[str], env: dict[str, str]) -> int:
    """Become the launcher (exec, not a child process): a scheduler or user that signals or kills
    `stagewise launch` then reaches the launcher itself, and its ranks follow it (they exit when their
    launcher is gone, parallel/runtime.exit_with_launcher)."""
    print("+ " + shlex.join(cmd), flush=True)
    # exec keeps this pid: the ranks know their launcher's pid even if it is killed before they start
    env = {**os.environ, **env, "STAGEWISE_LAUNCHER_PID": str(os.getpid())}
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        raise StagewiseError(f"cannot start {cmd[0]}: {e.strerror}") from None


def slurm_script(args) -> str:
    """An sbatch script: one task per node; srun starts `accelerate launch` (this environment's) on
    each node with that node's rank. ``$SLURM_NODEID`` is escaped so it expands on each node, not at submission."""
    flags = shlex.join(accelerate_strategy_flags(args.strategy, args.nodes * args.gpus_per_node, args.nodes)
                       or ["--multi_gpu"])
    accelerate = shlex.quote(_tool("accelerate")[0])
    rest = " ".join(shlex.quote(r) for r in (args.rest or []) if r != "--")
    partition = f"#SBATCH --partition={args.partition}\n" if args.partition else ""
    return f"""#!/bin/bash
#SBATCH --job-name={args.job_name}
#SBATCH --nodes={args.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={args.gpus_per_node}
#SBATCH --time={args.time}
#SBATCH --output=%x-%j.out
{partition}
# Generated by `stagewise slurm`. One task per node; each runs `accelerate launch` for its
# {args.gpus_per_node} GPUs. The first node of the allocation is the rendezvous point.
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={args.port}
export NUM_PROCESSES=$(( SLURM_NNODES * {args.gpus_per_node} ))

srun --kill-on-bad-exit=1 bash -c "{accelerate} launch \\
  --num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES \\
  --machine_rank \\$SLURM_NODEID \\
  --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \\
  --rdzv_backend static --same_network {flags} \\
  -m stagewise run {shlex.quote(args.config)} {rest} dist.strategy={args.strategy}"
"""

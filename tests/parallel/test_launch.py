import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stagewise.cli import build_parser
from stagewise.parallel.launch import build_launch_command, slurm_script

DEMO = Path(__file__).resolve().parents[2] / "configs" / "three_domains.yaml"


def parse(*argv):
    args, extra = build_parser().parse_known_args(list(argv))
    return args


def test_accelerate_zero3_two_machines():
    args = parse("launch", "--strategy", "zero3", "--num-processes", "4", "--num-machines", "2", "--machine-rank", "1",
                 "--main-process-ip", "10.1.2.3", "--main-process-port", "6000", "cfg.yaml", "optim.lr=1e-5")
    cmd, _ = build_launch_command(args)
    s = shlex.join(cmd)
    assert "launch --num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip 10.1.2.3" in s
    assert "--use_deepspeed --zero_stage 3" in s
    assert s.endswith("-m stagewise run cfg.yaml optim.lr=1e-5 dist.strategy=zero3")


@pytest.mark.parametrize("launcher, fragments", [
    ("torchrun", ["--nnodes 1 --nproc_per_node 2 --node_rank 0", "-m stagewise run cfg.yaml dist.strategy=ddp"]),
    ("deepspeed", ["--num_nodes 1 --num_gpus 2",
                   "--no_ssh --no_local_rank --module stagewise run cfg.yaml dist.strategy=ddp"]),
    ("accelerate", ["--multi_gpu -m stagewise run cfg.yaml dist.strategy=ddp"]),
])
def test_same_entry_point_for_every_launcher(launcher, fragments):
    cmd, _ = build_launch_command(parse("launch", "--strategy", "ddp", "--num-processes", "2", "--launcher", launcher,
                                        "cfg.yaml"))
    s = shlex.join(cmd)
    for f in fragments:
        assert f in s, s


def test_dry_run_prints_command():
    r = subprocess.run([sys.executable, "-m", "stagewise", "launch", "--strategy", "zero2", "--num-processes", "2",
                        "--offload", "optimizer", "--dry-run", str(DEMO)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--use_deepspeed --zero_stage 2" in r.stdout and "dist.offload=optimizer" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    # the demo's 4 prompts per step cannot be split over 8 processes: refused before any rank starts
    (["--strategy", "ddp", "--num-processes", "8"], "error: stages.0: rollout.prompts_per_step=4 must be divisible "
                                                    "by the 8 processes"),
    (["--strategy", "ddp", "--num-processes", "2", str(DEMO), "grpo.loss=dapoo"],
     "error: grpo.loss: unknown loss 'dapoo'"),
    (["--strategy", "ddp", "--num-processes", "2", "no_such.yaml"], "error: config: file not found: no_such.yaml"),
])
def test_launch_checks_the_config_for_its_processes_before_starting_them(args, fragment):
    argv = args if any(a.endswith(".yaml") for a in args) else [*args, str(DEMO)]
    r = subprocess.run([sys.executable, "-m", "stagewise", "launch", "--dry-run", *argv], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert "accelerate" not in r.stdout  # no command printed, nothing started


def test_slurm_script_text():
    text = slurm_script(parse("slurm", "--nodes", "2", "--gpus-per-node", "8", "--strategy", "zero3",
                              "--partition", "gpu", "cfg.yaml", "optim.lr=2e-5"))
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu"):
        assert line in text
    assert "NUM_PROCESSES=$(( SLURM_NNODES * 8 ))" in text
    # escaped: expands on each node inside srun's bash -c, not once at submission
    assert "--machine_rank \\$SLURM_NODEID" in text
    assert "srun --kill-on-bad-exit=1 bash -c" in text
    assert ("--use_deepspeed --zero_stage 3" in text
            and "-m stagewise run cfg.yaml optim.lr=2e-5 dist.strategy=zero3" in text)
    # the script is valid bash
    r = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

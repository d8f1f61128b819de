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


def accelerate_plan(argv: list[str]):
    """What `accelerate launch argv` would start, through accelerate's own parser and DeepSpeed
    command builder: (deepspeed runner argv or None for torchrun, the parsed args)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(argv)
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed
    # as accelerate's launch_command does before deepspeed_launcher
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
    cmd, _env = prepare_deepspeed_cmd_env(args)
    return cmd, args


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_two_machine_zero_launch_is_torchrun_style_not_pdsh(strategy):
    # accelerate's default for DeepSpeed on several machines is its pdsh runner, which without a
    # hostfile runs each machine as a job of its own (same output_dir, no error)
    args = parse("launch", "--strategy", strategy, "--num-processes", "8", "--num-machines", "2", "--machine-rank", "1",
                 "--main-process-ip", "10.0.0.1", "cfg.yaml")
    cmd, _ = build_launch_command(args)
    assert cmd[1] == "launch"
    runner, parsed = accelerate_plan(cmd[2:])
    assert runner is None, runner
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node) == ("2", 1, "8")
    assert (parsed.master_addr, parsed.master_port) == ("10.0.0.1", "29500")


def test_slurm_script_runs_a_torchrun_style_deepspeed_launch_on_each_node(tmp_path):
    """The script run by bash with srun / scontrol stubbed; the argv it gives accelerate on node 1,
    through accelerate's parser."""
    text = slurm_script(parse("slurm", "--nodes", "2", "--gpus-per-node", "8", "--strategy", "zero2", "cfg.yaml"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    argv_file = tmp_path / "argv.json"
    stubs = {
        "scontrol": "#!/bin/bash\necho node-a; echo node-b\n",
        # srun: run the task as node 1 of the allocation would
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n',
        "fake-accelerate": (f"#!{sys.executable}\nimport json, sys\n"
                            f"json.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))\n"),
    }
    for name, body in stubs.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    accelerate = shlex.quote(str(Path(sys.executable).parent / "accelerate"))
    assert f"{accelerate} launch" in text  # this environment's accelerate, not whichever is on PATH
    text = text.replace(f"{accelerate} launch", f"{bindir / 'fake-accelerate'} launch")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2"}
    r = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import json

    argv = json.loads(argv_file.read_text())
    assert argv[0] == "launch"
    runner, parsed = accelerate_plan(argv[1:])
    assert runner is None, runner
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node, parsed.master_addr) == ("2", 1, "8", "node-a")
    assert parsed.training_script_args[-1] == "dist.strategy=zero2"


def test_deepspeed_launcher_refuses_several_machines():
    args = parse("launch", "--strategy", "zero2", "--num-processes", "8", "--num-machines", "2",
                 "--launcher", "deepspeed", "cfg.yaml")
    from stagewise.errors import StagewiseError

    with pytest.raises(StagewiseError, match="hostfile.*--launcher accelerate"):
        build_launch_command(args)


def documented_launches() -> list[str]:
    """Every `stagewise launch` / `stagewise slurm` command a config header or the README gives."""
    root = Path(__file__).resolve().parents[2]
    lines = []
    for path in sorted((root / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("# "))
    lines += (root / "README.md").read_text().splitlines()
    commands = []
    for line in lines:
        line = line.split("#")[0].split(">")[0].strip()
        for prefix in (".venv/bin/stagewise ", "stagewise "):
            if line.startswith(prefix + "launch ") or line.startswith(prefix + "slurm "):
                commands.append(line[len(prefix):])
                break
    return commands


def write_missing_demonstrations(config: Path) -> None:
    """The chat files a config's header makes in its first step (stagewise demos), four records each."""
    import json

    import yaml

    for spec in yaml.safe_load(config.read_text()).get("domains", []):
        path = Path(spec.get("args", {}).get("path", ""))
        if spec.get("type") == "chat" and not path.is_absolute() and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {k}"},
                                                             {"role": "assistant", "content": "hello"}]}) + "\n"
                                    for k in range(4)))


def test_every_documented_launch_passes_doctor_for_its_world_size(capsys, tmp_path, monkeypatch):
    """Run where a user runs them (here: a fresh directory), after the header's earlier steps."""
    from stagewise.cli import main

    commands = documented_launches()
    assert any("tau2_three_domains.yaml" in c for c in commands) and any(c.startswith("slurm") for c in commands)
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        for a in shlex.split(command):
            if a.endswith(".yaml"):
                write_missing_demonstrations(root / a)
        argv = shlex.split(command)
        argv = [str(root / a) if a.endswith(".yaml") else a for a in argv]
        if argv[0] == "launch":
            argv.append("--dry-run")
        assert main(argv) == 0, command
    assert "error" not in capsys.readouterr().err


def test_dry_run_after_the_config_is_still_a_dry_run():
    r = subprocess.run([sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "2",
                        str(DEMO), "optim.lr=1e-5", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--dry-run" not in r.stdout and r.stdout.rstrip().endswith("optim.lr=1e-5 dist.strategy=ddp")


def test_slurm_checks_the_config_for_nodes_times_gpus():
    r = subprocess.run([sys.executable, "-m", "stagewise", "slurm", "--nodes", "2", "--gpus-per-node", "8", str(DEMO)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "rollout.prompts_per_step=4 must be divisible by the 16 processes" in r.stderr
    assert "#!/bin/bash" not in r.stdout


def test_multi_node_accelerate_config_is_torchrun_style():
    config = Path(__file__).resolve().parents[2] / "accelerate_configs" / "multi_node_example.yaml"
    runner, parsed = accelerate_plan(["--config_file", str(config), "--machine_rank", "1",
                                      "-m", "stagewise", "run", "cfg.yaml"])
    assert runner is None, runner
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node) == ("2", 1, "8")

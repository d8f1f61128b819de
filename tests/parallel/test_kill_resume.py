"""SIGKILL at random moments, resume, repeat: the final weights and accuracy matrix equal an
uninterrupted run's, bit for bit.

Each round restarts the run with ``--resume`` and either kills it after a random delay (any moment:
start-up, sampling, a backward pass, a checkpoint write) or arms a kill at a named point through the
fault hooks (``STAGEWISE_FAULTS=kill@at=...``): inside a checkpoint write (files written but no
manifest; manifest written but not renamed; renamed but old ones not pruned), half-way through a
stage's export, or at evaluation between stages. The points are chosen ahead of the run's progress so
that they are reached. Two processes: the launcher and both ranks are killed, or one rank only (the
launcher then stops the other), or the launcher only (the ranks exit by themselves).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import load_weights, tiny_raw
from tests.parallel.test_multiprocess import free_port

pytestmark = pytest.mark.slow

STEPS = 12  # per stage, 2 stages
KILLS = 20
IN_WRITE = ("ckpt_state", "ckpt_manifest", "ckpt_renamed", "export")


def write(tmp: Path, model_dir: Path, name: str, strategy: str) -> Path:
    raw = tiny_raw(model_dir, tmp / name, stages=2, steps=STEPS)
    raw["checkpoint"] = {"every": 1, "keep_last": 2}
    raw["eval"]["before_first_stage"] = True
    raw["logging"] = {"progress": False}
    if strategy != "single":
        raw["rollout"]["prompts_per_step"] = 2
        raw["dist"] = {"strategy": strategy}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def command(cfg: Path, strategy: str) -> list[str]:
    if strategy == "single":
        return [sys.executable, "-m", "stagewise", "run", str(cfg), "--resume"]
    return [sys.executable, "-m", "stagewise", "launch", "--strategy", strategy, "--num-processes", "2",
            "--main-process-port", str(free_port()), str(cfg), "--resume"]


def progress(out: Path) -> tuple[int, int]:
    """(stage being trained, 1-based; its newest complete checkpoint step), or (3, 0) when both are exported."""
    for s in (1, 2):
        sdir = out / f"stage-{s}-{'add' if s == 1 else 'max'}"
        if not (sdir / "model" / "stagewise.json").is_file():
            steps = [int(p.name[5:]) for p in (sdir / "checkpoints").glob("step-*") if (p / "manifest.json").is_file()]
            return s, max(steps, default=0)
    return 3, 0


def descendants(root: int) -> list[int]:
    """Every process below root. torch elastic starts its workers in sessions of their own, so killing
    the launcher's process group would leave them running (and writing into the run's directory)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def worker_pids(launcher: int) -> list[int]:
    """The launcher's descendants that are training ranks (LOCAL_RANK in their environment)."""
    found = []
    for pid in descendants(launcher):
        try:
            if any(e.startswith(b"LOCAL_RANK=") for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                found.append(pid)
        except OSError:
            continue
    return found


def kill_tree(root: int) -> None:
    for pid in [root, *descendants(root)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_and_resume(cfg: Path, strategy: str, seed: int, check) -> dict:
    """Kill and resume until KILLS kills are done, then finish. A run that completes before (a timed
    kill came too late) is checked against the reference and started over."""
    rng = random.Random(seed)
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    tally = {"kills": 0, "in_checkpoint_writes": 0, "timed": 0, "armed": 0, "one_rank": 0, "rounds": 0}
    history = []  # what each round did, shown when a check fails
    while True:
        tally["rounds"] += 1
        assert tally["rounds"] < 80, tally
        stage, last = progress(out)
        env = {k: v for k, v in os.environ.items() if k != "STAGEWISE_FAULTS"}
        plan = "finish" if tally["kills"] >= KILLS else rng.choice(["timed", "armed"] if strategy != "single" else ["timed", "armed", "armed"])
        point = None
        if plan == "armed":
            state = out / "curriculum.json"
            evaluated = json.loads(state.read_text())["rows"] if state.is_file() else {}
            options = [("eval", f"stage={stage - 1}")] if stage <= 3 and str(stage - 1) not in evaluated else []
            if stage <= 2 and last + 1 < STEPS:
                step = rng.randint(last + 1, min(last + 3, STEPS - 1))
                options += [(p, f"step={step}") for p in ("ckpt_state", "ckpt_manifest", "ckpt_renamed")]
            if stage <= 2:
                options.append(("export", f"stage={stage}"))
            if not options:
                plan = "finish" if tally["kills"] >= KILLS else "timed"
            else:
                point, where = rng.choice(options)
                # one rank only, where both ranks pass the point (renames and exports are the main process's)
                both = point in ("ckpt_state", "ckpt_manifest", "eval")
                rank = f",rank={rng.randint(0, 1)}" if strategy != "single" and both and rng.random() < 0.5 else ""
                env["STAGEWISE_FAULTS"] = f"kill@at={point},{where}{rank}"
        proc = subprocess.Popen(command(cfg, strategy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        if plan == "timed":
            deadline = time.time() + rng.uniform(3.0, 12.0 if strategy == "single" else 20.0)
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            if proc.poll() is None:
                how = rng.choice(["tree", "one_rank", "launcher"]) if strategy != "single" else "tree"
                victims = worker_pids(proc.pid) if how == "one_rank" else []
                if victims:
                    os.kill(rng.choice(victims), signal.SIGKILL)  # one rank only: the launcher stops the other
                    tally["one_rank"] += 1
                elif how == "launcher":
                    # the launcher only: its ranks must notice and exit by themselves (re-parented, they
                    # are out of kill_tree's reach, and communicate() below waits for their output pipe)
                    os.kill(proc.pid, signal.SIGKILL)
                    tally["launcher_only"] = tally.get("launcher_only", 0) + 1
                else:
                    kill_tree(proc.pid)  # the launcher and every rank
                tally["kills"] += 1
                tally["timed"] += 1
                inside = any(out.rglob(".tmp-step-*")) or any(out.rglob("model.tmp"))
                tally["in_checkpoint_writes"] += int(inside)
        try:
            text, _ = proc.communicate(timeout=600)
        finally:
            kill_tree(proc.pid)  # no rank may outlive its launcher into the next round
        if plan == "armed":
            assert proc.returncode != 0, f"armed kill at {point} was not reached:\n{text[-3000:]}"
            tally["kills"] += 1
            tally["armed"] += 1
            tally["in_checkpoint_writes"] += int(point in IN_WRITE)
            tally["one_rank"] += int("rank=" in env["STAGEWISE_FAULTS"])
        history.append((plan, env.get("STAGEWISE_FAULTS"), progress(out), proc.returncode))
        if plan == "finish" or (plan == "timed" and proc.returncode == 0):
            assert proc.returncode == 0, text[-3000:]
            try:
                check(out)
            except AssertionError as e:
                raise AssertionError(f"{e}\nrounds: {history}") from None
            tally["completed_runs"] = tally.get("completed_runs", 0) + 1
            if tally["kills"] >= KILLS:
                return tally
            import shutil

            shutil.rmtree(out)  # finished before enough kills: the same run again from scratch


def reference(tmp: Path, model_dir: Path, strategy: str) -> Path:
    cfg = write(tmp, model_dir, "reference", strategy)
    r = subprocess.run(command(cfg, strategy), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "reference"


# Two processes: the harness kills the whole tree, one rank, or the launcher alone. An earlier version
# killed only the launcher's process group; torch elastic's ranks (sessions of their own) lived on and
# wrote into the resumed run: ranks now exit when their launcher is gone (exit_with_launcher).
STRATEGIES = ["single", "ddp", "zero2"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_kills_then_resume_equal_an_uninterrupted_run(tmp_path, tiny_model_dir, strategy):
    ref = reference(tmp_path, tiny_model_dir, strategy)
    rows = lambda p: json.loads((p / "curriculum.json").read_text())["rows"]  # noqa: E731

    def same_as_reference(out: Path) -> None:
        a, b = load_weights(ref / "final_model"), load_weights(out / "final_model")
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert rows(ref) == rows(out)

    tally = kill_and_resume(write(tmp_path, tiny_model_dir, "killed", strategy), strategy, seed=0, check=same_as_reference)
    print(f"{strategy}: {tally}")
    assert tally["kills"] >= KILLS and tally["in_checkpoint_writes"] >= 5, tally

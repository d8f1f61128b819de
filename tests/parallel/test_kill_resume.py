"""SIGKILL at random moments, resume, repeat: the final weights and accuracy matrix equal an
uninterrupted run's, bit for bit.

Each round restarts the run with ``--resume`` and kills it once more, until every kind of kill has
happened once (``kill_plan``): armed at a named point through the fault hooks
(``STAGEWISE_FAULTS=kill@at=...``), inside a checkpoint write (files written but no manifest;
manifest written but not renamed; renamed but old ones not pruned), half-way through a stage's export,
or at an evaluation; then at a random moment: during start-up, or just after a checkpoint (sampling,
a backward pass, the next checkpoint write). The armed points are placed ahead of the run's progress so
that they are reached.
Two processes: the launcher and both ranks are killed, or one rank only (the launcher then stops the
other), or the launcher only (the ranks exit by themselves).
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

STEPS = 6  # per stage, 2 stages: a checkpoint every step, so every kill point is reached in each
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


def kill_plan(strategy: str) -> list[str]:
    """Every kind of kill, once: each named point inside a write or between stages, then at a random
    moment the whole tree, and with two processes one rank alone and the launcher alone. ZeRO-2 repeats
    what differs under it only: the sharded checkpoint writes and a rank dying mid-step (evaluation,
    export and the launcher's end are the same code for DDP and ZeRO-2)."""
    if strategy == "zero2":
        return ["ckpt_state", "ckpt_manifest", "ckpt_renamed", "timed:one_rank"]
    timed = ["tree"] if strategy == "single" else ["tree", "one_rank", "launcher"]
    return ["eval", "ckpt_state", "ckpt_manifest", "ckpt_renamed", "export"] + [f"timed:{how}" for how in timed]


def armed_point(point: str, out: Path, rng: random.Random) -> str | None:
    """The fault condition that makes the run reach ``point`` from where it stands, or None when it
    cannot be reached any more (``where`` of STAGEWISE_FAULTS)."""
    stage, last = progress(out)
    state = out / "curriculum.json"
    evaluated = json.loads(state.read_text())["rows"] if state.is_file() else {}
    if point == "eval":
        return f"stage={stage - 1}" if stage <= 3 and str(stage - 1) not in evaluated else None
    if point == "export":
        return f"stage={stage}" if stage <= 2 else None
    if stage <= 2 and last + 1 < STEPS:  # a checkpoint write of a step ahead
        return f"step={rng.randint(last + 1, min(last + 3, STEPS - 1))}"
    return None


def kill_and_resume(cfg: Path, strategy: str, seed: int, check) -> dict:
    """Kill and resume until every kill of ``kill_plan`` has happened, then finish. A run that
    completes before (a timed kill came too late) is checked against the reference and started over."""
    rng = random.Random(seed)
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    todo = kill_plan(strategy)
    tally = {"kills": 0, "in_checkpoint_writes": 0, "timed": 0, "armed": 0, "one_rank": 0, "rounds": 0, "done": []}
    history = []  # what each round did, shown when a check fails
    while True:
        tally["rounds"] += 1
        assert tally["rounds"] < 40, tally
        env = {k: v for k, v in os.environ.items() if k != "STAGEWISE_FAULTS"}
        plan, point, how = "finish", None, None
        for item in todo:  # the first kill still to do that the run can still reach
            if item.startswith("timed:"):
                plan, how = "timed", item.split(":", 1)[1]
                break
            where = armed_point(item, out, rng)
            if where is not None:
                plan, point = "armed", item
                # one rank only, where both ranks pass the point (renames and exports are the main process's)
                both = point in ("ckpt_state", "ckpt_manifest", "eval")
                rank = f",rank={rng.randint(0, 1)}" if strategy != "single" and both and rng.random() < 0.5 else ""
                env["STAGEWISE_FAULTS"] = f"kill@at={point},{where}{rank}"
                break
        else:
            if todo:  # the armed points left are behind the run: start it again to reach them
                plan = "restart"
        if plan == "restart":
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            continue
        proc = subprocess.Popen(command(cfg, strategy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        if plan == "timed":
            if how == "tree":  # early: start-up, model loading, the first evaluation
                deadline = time.time() + rng.uniform(1.0, 5.0)
            else:  # mid-training: shortly after this round's first new checkpoint (the ranks are up)
                start = progress(out)
                while progress(out) == start and proc.poll() is None:
                    time.sleep(0.05)
                deadline = time.time() + rng.uniform(0.0, 1.5)
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            if proc.poll() is None:
                victims = worker_pids(proc.pid) if how == "one_rank" else []
                if victims:
                    os.kill(rng.choice(victims), signal.SIGKILL)  # one rank only: the launcher stops the other
                    tally["one_rank"] += 1
                    done = "one_rank"
                elif how == "launcher":
                    # the launcher only: its ranks must notice and exit by themselves (re-parented, they
                    # are out of kill_tree's reach, and communicate() below waits for their output pipe)
                    os.kill(proc.pid, signal.SIGKILL)
                    done = "launcher"
                else:
                    kill_tree(proc.pid)  # the launcher and every rank
                    done = "tree"
                tally["kills"] += 1
                tally["timed"] += 1
                tally["done"].append(f"timed:{done}")
                if f"timed:{done}" in todo:
                    todo.remove(f"timed:{done}")
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
            tally["done"].append(point)
            todo.remove(point)
        history.append((plan, env.get("STAGEWISE_FAULTS"), how, progress(out), proc.returncode))
        if plan == "finish" or (plan == "timed" and proc.returncode == 0):
            assert proc.returncode == 0, text[-3000:]
            try:
                check(out)
            except AssertionError as e:
                raise AssertionError(f"{e}\nrounds: {history}") from None
            tally["completed_runs"] = tally.get("completed_runs", 0) + 1
            if not todo:
                return tally
            import shutil

            shutil.rmtree(out)  # finished before every kill was done: the same run again from scratch


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

    tally = kill_and_resume(write(tmp_path, tiny_model_dir, "killed", strategy), strategy, seed=0,
                            check=same_as_reference)
    print(f"{strategy}: {tally}")
    assert sorted(tally["done"]) == sorted(kill_plan(strategy)), tally  # every kind of kill happened
    assert tally["in_checkpoint_writes"] >= sum(p in IN_WRITE for p in kill_plan(strategy)), tally

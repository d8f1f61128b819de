"""SIGTERM / SIGINT (what schedulers send before a kill): every rank finishes the current step, writes
a checkpoint and exits 0 saying how to continue; the resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import load_weights, tiny_raw
from tests.parallel.test_multiprocess import assert_clean, free_port, in_process

STEPS = 30


def write(tmp: Path, model_dir: Path, name: str) -> Path:
    raw = tiny_raw(model_dir, tmp / name, stages=1, steps=STEPS)
    raw["rollout"]["prompts_per_step"] = 4
    raw["eval"]["before_first_stage"] = False
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = out / "metrics.jsonl"
        if m.is_file() and any(json.loads(x).get("stage_step", 0) >= step for x in m.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def same_as_uninterrupted(tmp: Path, model_dir: Path, out: Path) -> None:
    in_process(write(tmp, model_dir, "ref"))
    a, b = load_weights(tmp / "ref" / "final_model"), load_weights(out / "final_model")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_exits_zero(tmp_path, tiny_model_dir, sig):
    cfg = write(tmp_path, tiny_model_dir, "run")
    proc = subprocess.Popen([sys.executable, "-m", "stagewise", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert_clean((proc.returncode, stdout + stderr), f"run stopped by {sig.name}")
    assert f"stopped by {sig.name}: the current step finished and was checkpointed; continue with --resume" in stdout
    ckpts = sorted((tmp_path / "run" / "stage-1-add" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name[5:]) < STEPS
    r = subprocess.run([sys.executable, "-m", "stagewise", "run", str(cfg), "--resume"], capture_output=True,
                       text=True, timeout=300)
    assert_clean(r, "resume")
    assert f"resumed from {ckpts[0]}" in r.stdout
    same_as_uninterrupted(tmp_path, tiny_model_dir, tmp_path / "run")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, tiny_model_dir):
    cfg = write(tmp_path, tiny_model_dir, "run")
    cmd = [sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "2",
           "--main-process-port", str(free_port()), str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "STAGEWISE_TEST_TAG": "pending"}, start_new_session=True)
    try:
        wait_for_step(tmp_path / "run", 2, proc)
        ranks = {r: p for d in Path("/proc").iterdir() if d.name.isdigit() for r, p in _rank_of(d).items()}
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)  # as a launcher or scheduler may: one rank first
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_clean((proc.returncode, stdout + stderr), "2-process run stopped by SIGTERM on rank 1")
    assert "stopped by a signal to another rank" in stdout or "stopped by SIGTERM" in stdout
    ckpts = sorted((tmp_path / "run" / "stage-1-add" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and int(ckpts[0].name[5:]) < STEPS
    r = subprocess.run(cmd[:-1] + ["--main-process-port", str(free_port()), str(cfg), "--resume"],
                       capture_output=True, text=True, timeout=600)
    assert_clean(r, "resume on 2 processes")
    assert f"resumed from {ckpts[0]}" in r.stdout and (tmp_path / "run" / "final_model").is_dir()


def _rank_of(d: Path) -> dict[int, int]:
    try:
        env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
    except OSError:
        return {}
    if env.get("STAGEWISE_TEST_TAG") == "pending" and "LOCAL_RANK" in env and "RANK" in env:
        return {int(env["RANK"]): int(d.name)}
    return {}


@pytest.mark.slow
def test_ranks_exit_when_their_launcher_is_killed(tmp_path, tiny_model_dir):
    """SIGKILL to `stagewise launch` alone (an OOM killer, `kill -9` of the job's main process): torch
    elastic starts ranks in sessions of their own, so before this they trained on as orphans and wrote
    into the run's directory next to the resumed run."""
    cfg = write(tmp_path, tiny_model_dir, "run")
    cmd = [sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "2",
           "--main-process-port", str(free_port()), str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "STAGEWISE_TEST_TAG": "pending"}, start_new_session=True)
    ranks = {}
    try:
        wait_for_step(tmp_path / "run", 2, proc)
        ranks = {r: p for d in Path("/proc").iterdir() if d.name.isdigit() for r, p in _rank_of(d).items()}
        assert sorted(ranks) == [0, 1], ranks
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only; not its process group
        output = proc.communicate(timeout=60)[0]  # the pipe closes when the last rank holding it is gone
        t0 = time.time()
        while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in ranks.values()):
            assert time.time() - t0 < 15, f"ranks still running 15 s after their launcher was killed:\n{output[-3000:]}"
            time.sleep(0.1)
    finally:
        for p in ranks.values():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "its launcher" in output and "is gone; exiting" in output, output[-3000:]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"

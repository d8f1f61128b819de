"""Stress check (not part of `make test`): the two-"machine" loopback run, N times in a row.

    .venv/bin/python scripts/stress_two_machines.py --runs 20

Each run starts two `stagewise launch --num-machines 2 --machine-rank {0,1}` launchers on
127.0.0.1 (one DDP process each) on the tiny test model with the default logging, and counts a run
as clean only when both launchers exit 0 within the time limit and neither printed a traceback or
died at exit ("terminate called", SIGABRT). Prints one line per run and the tally.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_tiny_dir  # noqa: E402
from tests.helpers import tiny_raw  # noqa: E402

BAD = ("Traceback", "terminate called", "SIGABRT", "Signal 6")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(tmp: Path, model: Path, i: int, timeout: int) -> tuple[bool, float, str]:
    raw = tiny_raw(model, tmp / f"run{i}", stages=1, steps=2)
    raw["eval"]["before_first_stage"] = False
    cfg = tmp / f"run{i}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    port = str(free_port())
    common = [sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "1",
              "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", port]
    t0 = time.time()
    procs = [subprocess.Popen([*common, "--machine-rank", str(r), str(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return False, time.time() - t0, f"timed out after {timeout} s"
    problems = [f"machine {r}: exit {p.returncode}" for r, p in enumerate(procs) if p.returncode != 0]
    problems += [f"machine {r}: {b!r}" for r, log in enumerate(logs) for b in BAD if b in log]
    return not problems, time.time() - t0, "; ".join(problems)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = make_tiny_dir(tmp / "tiny")
        clean = 0
        for i in range(1, args.runs + 1):
            ok, secs, why = one_run(tmp, model, i, args.timeout)
            clean += ok
            print(f"run {i:2d}/{args.runs}: {'clean' if ok else 'FAILED'}  {secs:5.1f} s  {why}", flush=True)
    print(f"{clean}/{args.runs} clean")
    return 0 if clean == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())

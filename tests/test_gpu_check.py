"""`make gpu-check` itself: it refuses clearly without a GPU, and its checks (run on CPU with
--cpu) work, so the script a GPU session depends on has not rotted."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_refuses_without_a_gpu():
    r = subprocess.run([sys.executable, "-m", "tests.gpu_check"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2 and "no CUDA device is visible" in r.stderr and "|" not in r.stdout


@pytest.mark.slow
def test_gpu_checks_run_on_cpu_and_compare_with_their_reference():
    r = subprocess.run([sys.executable, "-m", "tests.gpu_check", "--cpu", "--only", "sft_bf16,replica_4k,fsdp_2p"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[:2] for line in table[1:]] == [["| sft_bf16", "ok"], ["| replica_4k", "ok"],
                                                              ["| fsdp_2p", "ok"]]
    assert "devices [-1, -1]" in r.stdout

"""Run-level measurements (tracking.py)."""

import pytest


def test_peak_memory_of_a_cpu_run_on_a_gpu_machine_is_host_memory(monkeypatch):
    """dist.cpu on a machine with CUDA: the run's device decides what is measured, not availability."""
    import torch

    from stagewise.tracking import PeakMemory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: pytest.fail("measured CUDA"))
    with PeakMemory(device=torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB held in the block
    assert peak.mb > 64 and block.numel()

"""The optimizer each strategy gets: DeepSpeed's CPU Adam for an optimizer offloaded from GPUs."""

import sys
import types

import pytest
import torch

from stagewise.config import DistConfig, OptimConfig
from stagewise.optim import make_adamw
from stagewise.parallel import runtime


@pytest.fixture
def stub_cpu_adam(monkeypatch):
    """deepspeed.ops.adam with a DeepSpeedCPUAdam that records its construction (the real one
    compiles a C++ op on first use)."""
    made = []

    class DeepSpeedCPUAdam(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, lr=kw["lr"])

    module = types.ModuleType("deepspeed.ops.adam")
    module.DeepSpeedCPUAdam = DeepSpeedCPUAdam
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", module)
    return made


@pytest.mark.parametrize("strategy, offload", [("zero2", "optimizer"), ("zero3", "optimizer_and_params")])
def test_optimizer_offloaded_from_gpus_steps_with_deepspeeds_cpu_adam(monkeypatch, stub_cpu_adam, strategy, offload):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # dist.cpu unset on a GPU machine
    dist = DistConfig(strategy=strategy, offload=offload)
    assert runtime.optimizer_offloaded_from_gpu(dist)
    opt = make_adamw([torch.nn.Parameter(torch.zeros(3))], OptimConfig(lr=2e-5, weight_decay=0.1), strategy,
                     offloaded_from_gpu=runtime.optimizer_offloaded_from_gpu(dist))
    assert type(opt).__name__ == "DeepSpeedCPUAdam"
    assert stub_cpu_adam == [{"lr": 2e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "adamw_mode": True}]


def test_without_offload_or_on_cpu_torchs_adamw(monkeypatch, stub_cpu_adam):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not runtime.optimizer_offloaded_from_gpu(DistConfig(strategy="zero2"))
    assert not runtime.optimizer_offloaded_from_gpu(DistConfig(strategy="zero2", offload="optimizer", cpu=True))
    opt = make_adamw([torch.nn.Parameter(torch.zeros(3))], OptimConfig(), "zero2")
    assert type(opt) is torch.optim.AdamW and stub_cpu_adam == []


def test_a_cpu_adam_that_cannot_build_falls_back_to_adamw_and_says_so(monkeypatch, capsys):
    module = types.ModuleType("deepspeed.ops.adam")

    def broken(*a, **k):
        raise RuntimeError("ninja is required to load C++ extensions")

    module.DeepSpeedCPUAdam = broken
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", module)
    opt = make_adamw([torch.nn.Parameter(torch.zeros(3))], OptimConfig(), "zero2", offloaded_from_gpu=True)
    assert type(opt) is torch.optim.AdamW
    assert "CPU Adam is unavailable (RuntimeError: ninja" in capsys.readouterr().out


def test_an_nccl_out_of_memory_counts_as_out_of_memory_for_the_micro_batch_probe():
    from stagewise.sft.sft import is_oom

    DistBackendError = type("DistBackendError", (RuntimeError,), {})
    assert is_oom(DistBackendError("NCCL error: unhandled cuda error ... Cuda failure 'out of memory'"))
    assert not is_oom(DistBackendError("NCCL error: remote process exited"))
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))

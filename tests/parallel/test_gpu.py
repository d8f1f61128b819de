"""The GPU checks of `make gpu-check` (tests/gpu_check.py) as tests, compared with reference runs
on the same GPU, not exit codes. Only with `pytest -m gpu` (the CPU suite hides the GPUs)."""

import pytest
import torch

from tests import gpu_check

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return gpu_check.Context(tmp_path_factory.mktemp("gpu_check"), "cuda")


@pytest.mark.parametrize("name", [name for name, _ in gpu_check.checks(gpus=2)])
def test_gpu_check(context, name):
    checks = dict(gpu_check.checks(torch.cuda.device_count()))
    if checks[name] is None:
        pytest.skip(f"needs 2 GPUs ({torch.cuda.device_count()} visible)")
    try:
        row = checks[name](context)
    except gpu_check.Skip as e:
        pytest.skip(str(e))
    print(gpu_check.table([row]))

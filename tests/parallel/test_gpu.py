"""GPU-only checks (skipped on CPU): FSDP2, bf16 on CUDA, NCCL DDP. Run on a GPU machine with
`pytest -m gpu tests/parallel/test_gpu.py -s`."""

import json
import subprocess
import sys

import pytest
import torch

from stagewise.config import load_config
from stagewise.continual.curriculum import run_curriculum
from tests.helpers import load_weights, tiny_raw

pytestmark = pytest.mark.gpu


def _raw(tiny_model_dir, out, **dist):
    raw = tiny_raw(tiny_model_dir, out, stages=1, steps=3)
    raw["dist"] = {"mixed_precision": "bf16", "cpu": False, **dist}
    raw["eval"]["before_first_stage"] = False
    return raw


def test_bf16_single_gpu_learns_and_exports(tiny_model_dir, tmp_path):
    res = run_curriculum(load_config(raw=_raw(tiny_model_dir, tmp_path / "gpu")))
    assert res["matrix"]
    rows = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    print("cuda bf16 steps:", [(r["reward"], r["step_time"]) for r in rows])
    base, final = load_weights(tiny_model_dir), load_weights(tmp_path / "gpu" / "final_model")
    assert any(not torch.equal(base[k], final[k].to(base[k].dtype)) for k in base)


def test_fsdp2_one_process(tiny_model_dir, tmp_path):
    import yaml

    p = tmp_path / "fsdp.yaml"
    p.write_text(yaml.safe_dump(_raw(tiny_model_dir, tmp_path / "fsdp", strategy="fsdp")))
    r = subprocess.run([sys.executable, "-m", "stagewise", "launch", "--strategy", "fsdp", "--num-processes", "1",
                        str(p)], capture_output=True, text=True, timeout=900)
    print(r.stdout[-2000:], r.stderr[-3000:])
    assert r.returncode == 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final_model")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs 2 GPUs")
def test_nccl_ddp_two_gpus(tiny_model_dir, tmp_path):
    import yaml

    p = tmp_path / "ddp.yaml"
    p.write_text(yaml.safe_dump(_raw(tiny_model_dir, tmp_path / "ddp", strategy="ddp")))
    r = subprocess.run([sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "2",
                        str(p)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

"""Real multi-process runs on CPU (gloo): DDP, ZeRO-2, ZeRO-3 against one process, launchers,
two "machines" on loopback, and ZeRO checkpoint resume. Slow (each launch starts 2 Python
processes that import DeepSpeed), so the runs are made once per module and shared by the tests.

Tolerances: the runs use fp32 (dist.mixed_precision=no). All-reduce over 2 ranks sums in a
different order than one process, and DeepSpeed steps AdamW on flattened fp32 partitions (our
single process uses fused AdamW): parameters agree to ~1e-6 after 3 steps of lr 1e-3; we allow
atol 2e-5. Rollouts (hence rewards and advantages) are identical by construction: every
completion is sampled from its own seed, whichever process draws it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import load_weights, tiny_raw

pytestmark = pytest.mark.slow

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cfg(tmp: Path, model_dir: Path, name: str) -> Path:
    raw = tiny_raw(model_dir, tmp / name, stages=1, steps=STEPS)
    raw["logging"]["dump_rollouts"] = True
    raw["rollout"]["prompts_per_step"] = 4  # 2 groups per process with 2 processes
    raw["grpo"]["micro_batch_size"] = 4  # 2 micro-batches per process: accumulation is exercised
    raw["eval"]["before_first_stage"] = False
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def launch(cfg: Path, strategy: str, nproc: int = 2, launcher: str = "accelerate", extra=(), run_args=(),
           timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stagewise", "launch", "--strategy", strategy, "--num-processes", str(nproc),
           "--launcher", launcher, "--main-process-port", str(free_port()), *extra, str(cfg), *run_args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def steps_of(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def rollouts_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dist")
    out = {}
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    run_curriculum(load_config(write_cfg(tmp, tiny_model_dir, "single")))  # 1 process, in-process
    out["single"] = tmp / "single"
    for strategy in ("ddp", "zero2", "zero3"):
        launch(write_cfg(tmp, tiny_model_dir, strategy), strategy)
        out[strategy] = tmp / strategy
    return tmp, out


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_weights(a / "final_model"), load_weights(b / "final_model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=atol, rtol=0), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one(runs, strategy):
    _, out = runs
    one, two = steps_of(out["single"]), steps_of(out[strategy])
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert a["reward"] == b["reward"]  # identical rollouts
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert_same_weights(out["single"], out[strategy], atol=2e-5)
    # the base weights moved: equality is not the trivial "nothing trained"
    base = load_weights(Path(yaml.safe_load((out["single"] / "config.yaml").read_text())["model"]["name_or_path"]))
    final = load_weights(out[strategy] / "final_model")
    assert max((final[k] - base[k]).abs().max().item() for k in base) > 1e-4


def test_grpo_advantages_across_processes_equal_single_process(runs):
    _, out = runs
    one, two = rollouts_of(out["single"]), rollouts_of(out["ddp"])
    assert len(one) == len(two) == STEPS * 4 * 4
    key = lambda r: (r["step"], json.dumps(r["prompt"]), r["completion"])  # noqa: E731
    one, two = sorted(one, key=key), sorted(two, key=key)
    for a, b in zip(one, two):
        assert key(a) == key(b)
        assert a["reward"] == b["reward"]
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-6)


def test_zero3_shards_parameters(runs):
    _, out = runs
    rows = [json.loads(x) for x in (out["zero3"] / "metrics.jsonl").read_text().splitlines()]
    fr = next(r["param_fraction_per_rank"] for r in rows if "param_fraction_per_rank" in r)
    assert len(fr) == 2 and all(0.4 < f < 0.6 for f in fr), fr  # each rank holds about half
    fr2 = next(r["param_fraction_per_rank"] for r in map(json.loads, (out["zero2"] / "metrics.jsonl").read_text().splitlines())
               if "param_fraction_per_rank" in r)
    assert fr2 == [1.0, 1.0]  # ZeRO-2 keeps full parameters on every rank
    # the exported ZeRO-3 model is the full model, loadable by plain transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out["zero3"] / "final_model")
    exported = load_weights(out["zero3"] / "final_model")
    assert sum(v.numel() for v in exported.values()) >= sum(p.numel() for p in model.parameters()) - model.lm_head.weight.numel()
    for name, p in model.named_parameters():
        if name in exported:
            assert torch.equal(p.data, exported[name])


def test_deepspeed_config_written_with_resolved_batch(runs):
    _, out = runs
    ds = json.loads((out["zero3"] / "deepspeed_config" / "ds_config_zero3.json").read_text())
    # 4 prompts x G 4 = 16 completions / 2 processes = 8 per process = micro 4 x accumulation 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_checkpoint_resumes_with_two_processes(runs, tiny_model_dir, strategy):
    tmp, out = runs
    cfg = write_cfg(tmp, tiny_model_dir, f"{strategy}_resume")
    launch(cfg, strategy, run_args=["--stop-after", "1"])
    ckpt = tmp / f"{strategy}_resume" / "stage-1-add" / "checkpoints" / "step-1"
    assert (ckpt / "manifest.json").is_file()
    launch(cfg, strategy, run_args=["--resume"])
    assert_same_weights(out[strategy], tmp / f"{strategy}_resume", atol=0)  # identical


def test_two_machines_on_loopback(runs, tiny_model_dir):
    tmp, out = runs
    cfg = write_cfg(tmp, tiny_model_dir, "two_machines")
    port = str(free_port())
    common = [sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "1",
              "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", port]
    procs = [subprocess.Popen([*common, "--machine-rank", str(r), str(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    assert_same_weights(out["ddp"], tmp / "two_machines", atol=1e-6)


@pytest.mark.parametrize("launcher, strategy", [("torchrun", "ddp"), ("deepspeed", "zero2")])
def test_other_launchers_run_the_same_config(runs, tiny_model_dir, launcher, strategy):
    tmp, out = runs
    cfg = write_cfg(tmp, tiny_model_dir, f"{launcher}_{strategy}")
    launch(cfg, strategy, launcher=launcher)
    assert_same_weights(out[strategy], tmp / f"{launcher}_{strategy}", atol=1e-6)


@pytest.mark.parametrize("profile, strategy", [("deepspeed_zero2.yaml", "zero2"), ("multi_gpu_ddp.yaml", "ddp")])
def test_launch_profiles_work_with_plain_accelerate_launch(runs, tiny_model_dir, profile, strategy):
    """`accelerate launch --config_file accelerate_configs/X.yaml -m stagewise run cfg` with a config
    that says `single`: the profile decides the strategy."""
    tmp, out = runs
    cfg = write_cfg(tmp, tiny_model_dir, f"profile_{strategy}")
    root = Path(__file__).resolve().parents[2]
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(root / "accelerate_configs" / profile),
           "--main_process_port", str(free_port()), "-m", "stagewise", "run", str(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"dist.strategy=single -> {strategy} (from the launcher)" in r.stdout
    assert yaml.safe_load((tmp / f"profile_{strategy}" / "config.yaml").read_text())["dist"]["strategy"] == strategy
    assert_same_weights(out[strategy], tmp / f"profile_{strategy}", atol=1e-6)

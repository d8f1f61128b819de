"""`stagewise doctor`: each check fails on a deliberately bad config or environment and says the fix;
`launch` refuses to start on any of them; the 2-process collective self-test."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections import namedtuple

import pytest

from stagewise import doctor
from stagewise.doctor import Launch, diagnose
from tests.helpers import tiny_config


def findings(cfg, skip=(), **launch):
    return {f.check: f for f in diagnose(cfg, Launch(**launch), skip=skip)}


@pytest.fixture()
def cfg(tiny_model_dir, tmp_path):
    return lambda *overrides: tiny_config(tiny_model_dir, tmp_path / "run", list(overrides))


def test_a_good_config_passes_every_check(cfg):
    got = findings(cfg(), device_memory=8 * 1024**3)
    assert all(f.ok and not f.skipped for f in got.values()), [f.line() for f in got.values()]
    assert set(got) == {"config", "precision", "data", "output", "vllm", "rendezvous", "timeout", "context", "memory",
                        "disk"}


def test_config_shapes_for_the_world_size(cfg):
    f = findings(cfg(), processes=3)["config"]
    assert not f.ok and "divisible by the 3 processes" in f.message


def test_precision_fp16_on_cpu_and_bf16_on_a_cpu_or_gpu_without_it(cfg, monkeypatch):
    assert not findings(cfg("dist.mixed_precision=fp16"))["precision"].ok
    monkeypatch.setattr("stagewise.machine.cpu_flags", lambda: {"fpu", "avx2"})
    f = findings(cfg("dist.mixed_precision=bf16"))["precision"]  # slow, not wrong: a warning, nothing refused
    assert f.ok and f.warn and "dist.mixed_precision=auto (or no)" in f.message
    f = findings(cfg())["precision"]  # the default, auto: fp32 on such a CPU
    assert f.ok and f.message.startswith("auto -> no (fp32: this CPU has no AMX / AVX-512 BF16"), f.message
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    f = findings(cfg("dist.cpu=false", "dist.mixed_precision=bf16"), skip=("memory", "context", "disk"))["precision"]
    assert not f.ok and f.message == "Tesla V100-SXM2-32GB has no bf16 -> dist.mixed_precision=fp16"
    f = findings(cfg("dist.cpu=false"), skip=("memory", "context", "disk"))["precision"]
    assert f.ok and f.message == "auto -> fp16 (Tesla V100-SXM2-32GB has no bf16)"


def test_data_that_is_not_there(cfg, tmp_path):
    bad = cfg("domains.0.type=jsonl", f"domains.0.args={{path: {tmp_path}/missing.jsonl}}")
    f = findings(bad)["data"]
    assert not f.ok and "missing.jsonl" in f.message


def test_an_output_dir_that_cannot_be_written(cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    f = findings(cfg(f"output_dir={blocker}/run"))["output"]
    assert not f.ok and "output_dir=<a writable directory>" in f.message


def test_vllm_selected_but_not_installed(cfg, monkeypatch):
    real = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    f = findings(cfg("rollout.engine=vllm"))["vllm"]
    assert not f.ok and "pip install vllm" in f.message


def test_rendezvous_for_several_machines(cfg, monkeypatch):
    c = cfg("rollout.prompts_per_step=4")
    with socket.socket() as s:  # a free port: the default 29500 may be a running launch's
        s.bind(("", 0))
        free = s.getsockname()[1]
    # a warning: loopback "machines" on one host are a real test setup
    f = findings(c, machines=2, main_port=free)["rendezvous"]
    assert f.ok and f.warn and "cannot reach it" in f.message and f.line().startswith("warn rendezvous:")
    assert "does not resolve" in findings(c, machines=2, main_ip="no-such-host.invalid")["rendezvous"].message
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "in use" in findings(c, machines=2, main_ip="10.0.0.1", main_port=port)["rendezvous"].message
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
    assert "unset MASTER_ADDR" in findings(c, machines=2, main_ip="10.0.0.1")["rendezvous"].message


def test_a_collective_timeout_too_short_for_a_checkpoint_write(cfg):
    f = findings(cfg("dist.timeout_s=60", "rollout.prompts_per_step=4"), processes=2)["timeout"]
    assert f.ok and f.warn and "dist.timeout_s=1800" in f.message  # a warning: tests of hangs want short ones


def test_a_prompt_and_completion_longer_than_the_models_context(cfg):
    f = findings(cfg("rollout.max_new_tokens=600", "rollout.max_episode_tokens=600"), prompt_tokens=100)["context"]
    assert not f.ok and "exceed the model's 512 positions" in f.message


def test_the_plan_against_device_memory(cfg):
    f = findings(cfg(), device_memory=64 * 1024**2)["memory"]
    assert not f.ok and "stagewise plan CONFIG --recommend" in f.message


def test_free_disk_for_the_checkpoints_kept(cfg, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    f = findings(cfg("checkpoint.keep_last=3"))["disk"]
    assert not f.ok and "checkpoint.keep_last=3" in f.message


def test_launch_refuses_on_any_doctor_problem_one_line_each(tiny_model_dir, tmp_path):
    import yaml

    from tests.helpers import tiny_raw

    raw = tiny_raw(tiny_model_dir, tmp_path / "run")
    raw["dist"] = {"timeout_s": 60, "mixed_precision": "fp16"}  # a warning, a config error, a problem
    raw["rollout"]["prompts_per_step"] = 4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "2",
                        "--dry-run", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "accelerate" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert errors[0].startswith("error: dist.mixed_precision=fp16 needs a GPU")  # the config's own check
    assert [e.split(":")[1].strip() for e in errors[1:]] == ["precision"]
    warnings = [ln for ln in lines if not ln.startswith("error: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: timeout:")
    assert len(lines) == 3


def test_selftest_two_processes_on_gloo(capsys):
    from stagewise.cli import main

    assert main(["doctor", "--selftest", "--backend", "gloo"]) == 0
    out = capsys.readouterr().out
    assert "ok   selftest: gloo, 2 processes: init " in out and "all_reduce" in out and "broadcast" in out

"""`stagewise env`: what a bug report needs, secrets hidden."""

from __future__ import annotations

from stagewise.cli import main
from stagewise.machine import cpu_bf16, relevant_environment


def test_the_report_names_versions_devices_backends_and_the_variables_that_matter(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("MASTER_PORT", "29501")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("UNRELATED_THING", "x")
    config = tmp_path / "default_config.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    monkeypatch.setattr("accelerate.commands.config.config_args.default_config_file", str(config))
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for needle in ("- torch 2.", "- accelerate 1.", "- transformers ", "- deepspeed ", "process-group backends: gloo",
                   "CPU bf16 in hardware:", "NCCL_DEBUG=INFO", "MASTER_PORT=29501", "num_processes: 8",
                   "HF_TOKEN=<set, hidden>"):
        assert needle in out, needle
    assert "hf_secret_value" not in out and "UNRELATED_THING" not in out


def test_cpu_bf16_reads_the_flags():
    assert cpu_bf16({"fpu", "amx_bf16", "avx512_bf16"}) == "yes (amx_bf16, avx512_bf16)"
    assert cpu_bf16({"fpu", "avx2"}).startswith("no")
    assert cpu_bf16(set()).startswith("unknown")


def test_only_distributed_variables_are_listed():
    env = relevant_environment({"LOCAL_RANK": "3", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1", "MY_API_KEY": "k"})
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_RANK": "3"}

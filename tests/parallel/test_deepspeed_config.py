import json

import pytest

from stagewise.config import DistConfig
from stagewise.errors import ConfigError
from stagewise.parallel.deepspeed_config import check_user_config, load_user_config, make_deepspeed_config, write_config


def make(strategy="zero3", on_gpu=False, **kw):
    kw.setdefault("mixed_precision", "bf16")
    return make_deepspeed_config(DistConfig(strategy=strategy, **kw), micro_batch=4, grad_accum=3, world_size=2,
                                 max_grad_norm=0.5, hidden_size=64, on_gpu=on_gpu)


def test_auto_precision_is_what_the_hardware_computes(monkeypatch):
    """dist.mixed_precision: auto (the default): bf16 on GPUs and on CPUs with AMX / AVX-512 BF16, fp32 on
    other CPUs, where PyTorch emulates bf16 (70x slower than fp32 on an AVX2 EPYC)."""
    monkeypatch.setattr("stagewise.machine.cpu_flags", lambda: {"fpu", "avx2"})
    auto = make(on_gpu=False, mixed_precision="auto")
    assert auto["bf16"]["enabled"] is False and auto["fp16"]["enabled"] is False
    assert make(on_gpu=True, mixed_precision="auto")["bf16"]["enabled"] is True
    monkeypatch.setattr("stagewise.machine.cpu_flags", lambda: {"fpu", "avx2", "amx_bf16"})
    assert make(on_gpu=False, mixed_precision="auto")["bf16"]["enabled"] is True


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_on_a_gpu_machine_by_default_offload_is_pinned_and_reduction_overlaps(monkeypatch, strategy):
    """dist.cpu unset on a machine with CUDA: what a GPU user runs (CUDA patched in)."""
    import torch

    from stagewise.parallel import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    offload = "optimizer_and_params" if strategy == "zero3" else "optimizer"
    ds = runtime.deepspeed_json(DistConfig(strategy=strategy, offload=offload), micro_batch=1,
                                grad_accum=1, world_size=8, max_grad_norm=1.0, hidden_size=64)
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is True and z["offload_optimizer"]["pin_memory"] is True
    assert strategy == "zero2" or z["offload_param"]["pin_memory"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same config on a CPU machine (gloo)
    z = runtime.deepspeed_json(DistConfig(strategy=strategy, offload="optimizer"), micro_batch=1, grad_accum=1,
                               world_size=2, max_grad_norm=1.0, hidden_size=64)["zero_optimization"]
    assert z["overlap_comm"] is False and z["offload_optimizer"]["pin_memory"] is False


def test_batch_numbers_resolved_and_buckets_from_hidden_size():
    ds = make()
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 64 * 64
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64) and z["stage3_param_persistence_threshold"] == 640
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_offload_sections():
    z = make(offload="optimizer_and_params")["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    z = make("zero2", offload="optimizer", offload_device="nvme", nvme_path="/nvme")["zero_optimization"]
    assert (z["offload_optimizer"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme"}
            and "offload_param" not in z)
    assert "stage3_prefetch_bucket_size" not in z


def test_user_config_auto_values_filled_and_disagreements_fail():
    expected = make()
    ok = check_user_config({"train_batch_size": "auto", "zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}},
                           expected, "my.json")
    assert ok["train_batch_size"] == 24 and ok["gradient_accumulation_steps"] == 3 and ok["bf16"]["enabled"] is True
    assert ok["bf16"]["check_grad_overflow"] is True  # bad steps are skipped through it
    with pytest.raises(ConfigError, match="my.json: bf16.check_grad_overflow=false"):
        check_user_config({"bf16": {"enabled": True, "check_grad_overflow": False}}, expected, "my.json")
    with pytest.raises(ConfigError, match="my.json: train_batch_size=32 but the run uses 24"):
        check_user_config({"train_batch_size": 32}, expected, "my.json")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=1 but the run uses 3"):
        check_user_config({"gradient_accumulation_steps": 1}, expected, "my.json")
    with pytest.raises(ConfigError, match="fp16.enabled=True but dist.mixed_precision asks for no fp16"):
        check_user_config({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, expected, "my.json")
    with pytest.raises(ConfigError, match="bf16.enabled=False"):
        check_user_config({"bf16": {"enabled": False}}, expected, "my.json")
    with pytest.raises(ConfigError, match="zero_optimization.stage=2 but dist.strategy is zero3"):
        check_user_config({"zero_optimization": {"stage": 2}}, expected, "my.json")


def test_load_and_write(tmp_path):
    p = write_config(make(), tmp_path / "deepspeed_config", "zero3")
    assert p == tmp_path / "deepspeed_config" / "ds_config_zero3.json"
    assert load_user_config(str(p))["train_batch_size"] == 24
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_user_config(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="file not found"):
        load_user_config(str(tmp_path / "none.json"))


def test_strategy_checks():
    from stagewise.parallel.runtime import check

    check(DistConfig(strategy="fsdp", cpu=True), 2)  # FSDP2 runs on CPU (gloo): parallel/fsdp.py
    with pytest.raises(Exception, match="fsdp supports mixed_precision bf16 or no"):
        DistConfig(strategy="fsdp", mixed_precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check(DistConfig(mixed_precision="fp16", cpu=True), 1)
    with pytest.raises(Exception, match="needs a ZeRO strategy"):
        DistConfig(strategy="ddp", offload="optimizer")


def test_launch_profile_env_sets_strategy(monkeypatch):
    from stagewise.parallel.runtime import resolve_strategy

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    d, note = resolve_strategy(DistConfig(), 2)
    assert (d.strategy, d.offload) == ("zero3", "optimizer_and_params") and "zero3" in note
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert resolve_strategy(DistConfig(), 2)[0].strategy == "ddp"
    assert resolve_strategy(DistConfig(), 1) == (DistConfig(), None)


def test_user_json_end_to_end_check_is_clear(tmp_path):
    from stagewise.config import load_config

    (tmp_path / "ds.json").write_text(json.dumps({"gradient_accumulation_steps": 7}))
    # the check itself runs when the accelerator is built; the file path is validated in config
    cfg = load_config(raw={"domains": [{"name": "add"}], "stages": [{"domains": ["add"], "steps": 1}],
                           "dist": {"strategy": "zero2", "deepspeed_config": str(tmp_path / "ds.json")}})
    with pytest.raises(ConfigError, match="ds.json: gradient_accumulation_steps=7 but the run uses 1"):
        check_user_config(load_user_config(cfg.dist.deepspeed_config),
                          make("zero2") | {"gradient_accumulation_steps": 1}, cfg.dist.deepspeed_config)

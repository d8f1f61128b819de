"""The planner on a config: phases, what each holds, the recommendation pinned for Qwen3-4B, and the
`stagewise plan` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagewise.cli import main
from stagewise.config import load_config
from stagewise.planning.plan import GIB, RESERVED, plan_run, plan_stage, prefix_cache_bytes, recommend
from stagewise.planning.shapes import model_shape, read_model_config
from stagewise.planning.tables import format_recommendation, parse_memory

ROOT = Path(__file__).resolve().parents[2]
QWEN3_4B = ROOT / "tests" / "data" / "model_configs" / "qwen3-4b.json"
RECIPE = ROOT / "configs" / "tau2_qwen3_4b.yaml"


@pytest.fixture(scope="module")
def qwen():
    config = read_model_config(str(QWEN3_4B))
    return config, model_shape(config, "Qwen3-4B")


def grpo_config(**over):
    overrides = [f"model.name_or_path={QWEN3_4B}", "model.gradient_checkpointing=true"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return load_config(ROOT / "configs" / "three_domains.yaml", overrides)


def test_the_rollout_phase_frees_gradients_and_holds_the_sampling_copy(qwen):
    config, shape = qwen
    plan = plan_stage(grpo_config(), 0, shape, config, world=1, prompt_tokens=200)
    train, rollout, evaluation = plan.phases
    assert [p.name for p in plan.phases] == ["train", "rollout", "eval"]
    assert "gradients" in train.device and "gradients" not in rollout.device
    assert rollout.device["bf16 sampling copy"] == 2 * shape.params
    assert evaluation.device["bf16 evaluation copy"] == 2 * shape.params
    assert plan.peak is max(plan.phases, key=lambda p: p.total)


def test_a_kl_reference_is_planned_only_when_beta_is_positive(qwen):
    config, shape = qwen
    without = plan_stage(grpo_config(), 0, shape, config, world=1, prompt_tokens=200)
    with_kl = plan_stage(grpo_config(**{"grpo.beta": 0.04}), 0, shape, config, world=1, prompt_tokens=200)
    assert "KL reference model" not in without.phases[0].device
    assert with_kl.phases[0].device["KL reference model"] == 2 * shape.params
    sharded = plan_stage(grpo_config(**{"grpo.beta": 0.04, "dist.strategy": "zero3"}), 0, shape, config, world=4,
                         prompt_tokens=200)
    assert sharded.phases[0].device["KL reference model"] == 2 * shape.params / 4


def test_vllm_takes_its_share_of_the_device_while_awake(qwen):
    config, shape = qwen
    cfg = grpo_config(**{"rollout.engine": "vllm", "rollout.vllm.gpu_memory_utilization": 0.4})
    plan = plan_run(cfg, shape, config, world=1, prompt_tokens=200, device_memory=80 * GIB)[0]
    rollout = plan.phases[1]
    assert rollout.device["vLLM (weights + KV cache: gpu_memory_utilization)"] == pytest.approx(0.4 * 80 * GIB)
    assert not any("vLLM" in k for k in plan.phases[0].device)  # asleep while training


def test_checkpointing_and_more_zero3_devices_never_cost_memory(qwen):
    config, shape = qwen
    on = plan_stage(grpo_config(), 0, shape, config, world=1, prompt_tokens=2000)
    off = plan_stage(grpo_config(**{"model.gradient_checkpointing": "false"}), 0, shape, config, world=1,
                     prompt_tokens=2000)
    assert on.phases[0].total < off.phases[0].total
    peaks = [plan_stage(grpo_config(**{"dist.strategy": "zero3"}), 0, shape, config, world=n,
                        prompt_tokens=2000).peak.total for n in (1, 2, 4, 8, 16)]
    assert all(b <= a for a, b in zip(peaks, peaks[1:])), peaks


def test_qwen3_4b_recipe_recommendation_on_80gb_devices(qwen):
    """Pinned: the GPU recipe (configs/tau2_qwen3_4b.yaml) with 5,200-token prompts on 80 GB devices."""
    config, shape = qwen
    cfg = load_config(RECIPE, [f"model.name_or_path={QWEN3_4B}"])
    choices = recommend(cfg, shape, config, device_memory=80e9, prompt_tokens=5200)
    fits = {n: [c.strategy + ("+" + c.offload if c.offload != "none" else "") for c in choices
                if c.devices == n and c.fits] for n in (1, 2, 4, 8, 16)}
    assert fits == {
        1: ["zero2+optimizer", "zero3+optimizer", "zero3+optimizer_and_params"],
        2: ["zero1", "zero2", "fsdp", "zero3", "zero2+optimizer", "zero3+optimizer", "zero3+optimizer_and_params"],
        4: ["zero1", "zero2", "fsdp", "zero3", "zero2+optimizer", "zero3+optimizer", "zero3+optimizer_and_params"],
        8: ["zero1", "zero2", "fsdp", "zero3", "zero2+optimizer", "zero3+optimizer", "zero3+optimizer_and_params"],
        16: ["zero1", "zero2", "fsdp", "zero3", "zero2+optimizer", "zero3+optimizer", "zero3+optimizer_and_params"],
    }
    assert all(c.fits == (c.peak <= 80e9 - RESERVED) for c in choices)
    text = format_recommendation(choices, 80e9)
    assert text.splitlines()[1].startswith("   1: zero2+opt ")


@pytest.mark.parametrize("text, value", [("80GB", 80e9), ("80GiB", 80 * GIB), ("141 GB", 141e9), ("24", 24 * GIB),
                                         ("512MiB", 512 * 1024**2)])
def test_device_memory_sizes(text, value):
    assert parse_memory(text) == value


def test_the_plan_command_prints_every_stage_and_refuses_a_bad_size(capsys):
    args = ["plan", str(RECIPE), f"model.name_or_path={QWEN3_4B}", "--num-processes", "8", "--strategy", "zero2",
            "--prompt-tokens", "5200", "--device-memory", "80GB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("stage ") >= 9 and "peak " in out and "4.022 B parameters" in out
    assert main(args[:-1] + ["eighty"]) == 2
    assert "--device-memory 'eighty'" in capsys.readouterr().err


def test_the_prompt_cache_is_what_a_rollout_stores_not_its_cap():
    """Prompts under one prefill block are never stored (3 steps of `add` held no cache while the plan
    said 1 GiB); longer ones are kept whole, once per rank, episodes once per turn, up to the cap."""
    rollout = load_config(raw={"stages": [{"kind": "grpo", "domains": ["add"], "steps": 1}],
                               "domains": [{"name": "add"}]}).rollout
    kv = 1000.0  # K and V elements per token
    assert prefix_cache_bytes(rollout, kv, rows=8, prompt_tokens=100, env=False) == 0
    assert prefix_cache_bytes(rollout, kv, rows=8, prompt_tokens=600, env=False) == 8 * 600 * kv * 2
    turns = rollout.max_turns * (600 + rollout.max_episode_tokens)
    assert prefix_cache_bytes(rollout, kv, rows=2, prompt_tokens=600, env=True) == min(2 * turns * kv * 2, GIB)
    assert prefix_cache_bytes(rollout, 1e6, rows=64, prompt_tokens=5000, env=False) == rollout.prefix_cache_gib * GIB
    off = rollout.model_copy(update={"prefix_cache_gib": 0.0})
    assert prefix_cache_bytes(off, kv, rows=8, prompt_tokens=600, env=False) == 0

"""The byte formulas: the ZeRO paper's worked example, and what each strategy holds as stagewise runs it."""

from __future__ import annotations

import pytest

from stagewise.planning import memory


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_the_zero_papers_worked_example(stage, gb):
    # Rajbhandari et al. 2020, figure 1: Psi = 7.5B parameters, N_d = 64 devices, K = 12
    assert memory.zero_paper(7.5e9, 64, stage) / 1e9 == pytest.approx(gb, abs=0.05)


def device_total(strategy, world, offload="none", params=4_000_000_000, trainable=None):
    states = memory.model_states(strategy, world=world, params=params, trainable=trainable or params,
                                 weight_bytes=4, compute_bytes=2, offload=offload, layer_params=params // 40,
                                 outside_params=params // 10, hidden=2560)
    return sum(dev for dev, _ in states.values()), sum(host for _, host in states.values())


def test_single_is_sixteen_bytes_per_parameter_in_fp32_with_autocast():
    assert device_total("single", 1)[0] == 16 * 4e9


def test_deepspeed_stages_shard_what_the_paper_says_plus_the_fp32_gradient_partition():
    p, n = 4e9, 8
    bucket = 2 * 2 * 2560**2  # two reduce buckets of hidden^2 bf16 elements
    assert device_total("zero1", n)[0] == pytest.approx(2 * p + 2 * p + (4 + 8 + 4) * p / n)
    # DeepSpeed's estimate_zero2_model_states_mem_needs without offload: 2P + 18P/N
    assert device_total("zero2", n)[0] == pytest.approx(2 * p + 18 * p / n + bucket)


def test_offload_moves_the_optimizer_to_the_host_and_params_too_under_zero3():
    on_device, host = device_total("zero2", 8, "optimizer")
    assert host == pytest.approx((4 + 8 + 4) * 4e9 / 8)
    assert on_device == pytest.approx(2 * 4e9 + 2 * 2 * 2560**2)  # DeepSpeed's estimate with offload: 2P (+ buckets)
    dev3, host3 = device_total("zero3", 8, "optimizer_and_params")
    assert host3 == pytest.approx((2 + 4 + 8 + 4) * 4e9 / 8)
    assert dev3 < device_total("zero3", 8, "optimizer")[0]


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3", "fsdp"])
def test_more_devices_never_need_more_memory_per_device(strategy):
    totals = [device_total(strategy, n)[0] for n in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert all(b <= a for a, b in zip(totals, totals[1:])), totals


def test_lora_keeps_no_gradient_or_optimizer_state_for_the_frozen_base():
    full = device_total("single", 1)[0]
    lora = device_total("single", 1, trainable=10_000_000)[0]
    assert lora == pytest.approx(4 * 4e9 + 12 * 10_000_000)
    assert lora < full


def test_communication_zero3_gathers_every_micro_batch_ddp_once_per_step():
    kw = dict(world=8, params=4e9, trainable=4e9, compute_bytes=2)
    ddp = memory.comm_per_step("ddp", grad_bytes=4, micro_batches=4, **kw)
    z2 = memory.comm_per_step("zero2", grad_bytes=2, micro_batches=4, **kw)
    z3_1 = memory.comm_per_step("zero3", grad_bytes=2, micro_batches=1, **kw)
    z3_4 = memory.comm_per_step("zero3", grad_bytes=2, micro_batches=4, **kw)
    assert ddp == pytest.approx(2 * 7 / 8 * 4e9 * 4)
    assert z2 == pytest.approx(2 * 7 / 8 * 4e9 * 2)  # reduce-scatter + all-gather = one bf16 all-reduce
    assert z3_1 == pytest.approx(1.5 * z2) and z3_4 == pytest.approx(4 * z3_1)
    assert memory.comm_per_step("zero3", grad_bytes=2, micro_batches=4, **{**kw, "world": 1}) == 0

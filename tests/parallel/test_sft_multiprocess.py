"""SFT across processes (CPU, gloo): 2-process ZeRO-2, ZeRO-3, FSDP2 and DDP equal 1 process (fp32, so the
comparison is of arithmetic), with processes != accumulation (2 x 2 micro-batches vs 1 x 4), and
every rank exits 0 with the default logging."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.helpers import load_weights
from tests.parallel.test_multiprocess import assert_same_weights, launch
from tests.sft.test_sft_stage import sft_raw, write_data

pytestmark = pytest.mark.slow


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "stage_step" in r]


COMMON = dict(steps=3, sft={"batch_size": 8, "micro_batch_size": 2}, dist={"mixed_precision": "no"},
              eval={"before_first_stage": False})


@pytest.fixture(scope="module")
def one_process(tiny_chat_dir, tmp_path_factory):
    """The 1-process reference run every strategy is compared with, and its data file."""
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    tmp = tmp_path_factory.mktemp("sft_one")
    data = write_data(tmp / "d.jsonl")
    run_curriculum(load_config(raw=sft_raw(tiny_chat_dir, tmp / "one", data, **COMMON)))
    return tmp / "one", data


def test_two_process_zero3_shared_prefix_sft_equals_one_process_plain(tiny_chat_dir, tmp_path, one_process):
    """One example per row (packing off): the 2 ZeRO-3 processes run each micro-batch's common
    opening once (two gathered body calls per micro-batch on every rank); the reference runs the
    plain forward in one process."""
    _, data = one_process
    plain = dict(COMMON, sft={**COMMON["sft"], "packing": False, "shared_prefix": False})
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum
    run_curriculum(load_config(raw=sft_raw(tiny_chat_dir, tmp_path / "one", data, **plain)))
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(sft_raw(tiny_chat_dir, tmp_path / "two", data,
                                          **dict(COMMON, sft={**COMMON["sft"], "packing": False}))))
    launch(cfg, "zero3")
    steps = [r for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())
             if "stage_step" in r]
    assert [r["shared_prefix"] for r in steps] == [1.0] * 3
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=2e-5)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp", "ddp"])
def test_two_process_sft_equals_one_process(tiny_chat_dir, tmp_path, one_process, strategy):
    one, data = one_process
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(sft_raw(tiny_chat_dir, tmp_path / "two", data, **COMMON)))
    launch(cfg, strategy)
    assert losses(one) == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    assert_same_weights(one, tmp_path / "two", atol=2e-5)
    start = next(r for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())
                 if "micro_batch" in r)
    assert (start["micro_batch"], start["accumulation"]) == (2, 2)  # 8 rows = 2 x 2 x 2 processes
    base, final = load_weights(tiny_chat_dir), load_weights(tmp_path / "two" / "final_model")
    assert any(not torch.equal(base[k], final[k]) for k in base)

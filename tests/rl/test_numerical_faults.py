"""Numerical faults injected into real runs of the tiny model (single process, the product's
default bf16 autocast): a step with a non-finite loss or gradient norm must change nothing, be
counted, and a run of them must stop with one line naming stage and step.

The faults come from stagewise/faults.py (STAGEWISE_FAULTS); the multi-process versions, where
only one rank sees the fault, are in tests/parallel/test_multiprocess.py."""

import json

import pytest
import torch

from stagewise.continual.curriculum import run_curriculum
from stagewise.errors import TrainingError
from stagewise.faults import _parse, active
from tests.helpers import load_weights, tiny_config

# constant lr from step 1 on, so a 3-step run whose last step is skipped must end exactly where a
# 2-step run ends
SCHEDULE = ["optim.schedule=constant", "optim.warmup_steps=0", "eval.before_first_stage=false"]


def steps_of(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def two_steps(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "two"
    run_curriculum(tiny_config(tiny_model_dir, out, stages=1, steps=2, overrides=SCHEDULE))
    return load_weights(out / "final_model")


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_bad_last_step_changes_nothing(tiny_model_dir, tmp_path, monkeypatch, two_steps, fault):
    monkeypatch.setenv("STAGEWISE_FAULTS", f"{fault}@stage=1,step=3")
    out = tmp_path / fault
    run_curriculum(tiny_config(tiny_model_dir, out, stages=1, steps=3, overrides=SCHEDULE))
    final = load_weights(out / "final_model")
    for k in two_steps:
        assert torch.equal(final[k], two_steps[k]), k  # the bad step applied no update at all
    rows = steps_of(out)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1]
    assert [r["bad_steps_total"] for r in rows] == [0, 0, 1]
    if fault == "inf_grad":  # the loss was finite, only the gradient was not
        assert rows[2]["loss"] is not None and rows[2]["grad_norm"] is None  # non-finite -> null in JSON
    base = load_weights(tiny_model_dir)
    assert any(not torch.equal(final[k], base[k]) for k in base)  # steps 1-2 did train


def test_bad_steps_in_a_row_stop_the_run_with_stage_and_step(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STAGEWISE_FAULTS", "nan_loss@step=2-3")
    cfg = tiny_config(tiny_model_dir, tmp_path / "abort", stages=1, steps=4,
                      overrides=SCHEDULE + ["optim.max_bad_steps=2"])
    with pytest.raises(TrainingError, match=r"stage 1 \(add\), step 3: 2 optimizer steps in a row had a non-finite"):
        run_curriculum(cfg)
    # one bad step alone does not stop it
    monkeypatch.setenv("STAGEWISE_FAULTS", "nan_loss@step=2")
    run_curriculum(tiny_config(tiny_model_dir, tmp_path / "one", stages=1, steps=3,
                               overrides=SCHEDULE + ["optim.max_bad_steps=2"]))
    assert [r["skipped_steps"] for r in steps_of(tmp_path / "one")] == [0, 1, 0]


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.setenv("STAGEWISE_FAULTS", "nan_loss@stage=2,step=1-3;raise@rank=1")
    assert active("nan_loss", stage=2, step=3, rank=0) and not active("nan_loss", stage=1, step=2, rank=0)
    assert not active("nan_loss", stage=2, step=4, rank=0)
    assert active("raise", stage=5, step=9, rank=1) and not active("raise", stage=5, step=9, rank=0)
    monkeypatch.delenv("STAGEWISE_FAULTS")
    assert not active("nan_loss", stage=2, step=3, rank=0)
    with pytest.raises(ValueError, match="unknown fault 'oops'"):
        _parse("oops@step=1")
    with pytest.raises(ValueError, match="bad condition"):
        _parse("raise@when=1")

"""The stage scaffold carries the invariants, not the stage kinds: a third kind that only measures
(tests/plugins.py ``probe``: no optimizer step, no checkpoint or stop code of its own) stops after
``--stop-after``, checkpoints, and resumes at the right data position on 2 processes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tests.helpers import load_weights, tiny_raw
from tests.parallel.test_multiprocess import launch
from tests.plugins import logprob_sum, probe_rows

pytestmark = pytest.mark.slow
STEPS = 4


def test_a_stage_kind_on_the_scaffold_stops_checkpoints_and_resumes_on_two_processes(tmp_path, tiny_model_dir):
    raw = tiny_raw(tiny_model_dir, tmp_path / "probe", stages=1, steps=STEPS)
    raw["stages"] = [{"name": "probe", "kind": "probe", "domains": ["add"], "steps": STEPS}]
    raw["eval"]["before_first_stage"] = False
    raw["dist"] = {"mixed_precision": "no"}
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "probe"

    first = launch(cfg, "ddp", run_args=["--stop-after", "2"])
    ckpts = sorted(p.name for p in (out / "stage-1-probe" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-2"] and not (out / "final_model").exists()
    manifest = json.loads((out / "stage-1-probe" / "checkpoints" / "step-2" / "manifest.json").read_text())
    assert manifest["kind"] == "probe" and manifest["counters"]["step"] == 2 and manifest["num_processes"] == 2
    assert "stopped after 2 steps" in first.stdout

    resumed = launch(cfg, "ddp", run_args=["--resume"])
    assert "resumed from" in resumed.stdout and "(step 2/4)" in resumed.stdout
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "probe" in r]
    assert [r["stage_step"] for r in rows] == [1, 2, 3, 4]  # steps 3 and 4 after the resume, none repeated
    assert all(r["ddp_bucket_view"] == 1.0 for r in rows)  # DDP wrapped it with gradient_as_bucket_view
    starts = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "params_total" in r]
    assert [r["cuda_device_per_rank"] for r in starts] == [[-1, -1]] * 2  # both launches, both ranks (CPU)

    # every step scored its own rows (the data position is the step counter), both ranks together
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for r in rows:
        total, count = logprob_sum(model, probe_rows(0, r["stage_step"] - 1, model.config.vocab_size), "cpu")
        assert r["probe"] == pytest.approx((total / count).item(), abs=1e-5)
    assert len({round(r["probe"], 6) for r in rows}) == STEPS
    # the stage trained nothing: its export is the weights it started from, whole and in fp32
    final, base = load_weights(out / "final_model"), load_weights(tiny_model_dir)
    assert all(torch.equal(final[k], base[k]) for k in base)


def test_each_ranks_peak_and_base_memory_are_logged_at_the_stage_end(tiny_model_dir, tmp_path):
    """What benchmarks/strategies.py compares with the planner: per rank, the stage's peak and what the
    process held before the stage's model existed (the model and optimizer come after the base)."""
    import json

    from stagewise.continual.curriculum import run_curriculum
    from tests.helpers import tiny_config

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", stages=1, steps=1)
    run_curriculum(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    end = next(r for r in rows if "stage_peak_memory_mb_per_rank" in r)
    (peak,), (base,) = end["stage_peak_memory_mb_per_rank"], end["stage_base_memory_mb_per_rank"]
    assert 0 < base < peak and peak == end["stage_peak_memory_mb"]

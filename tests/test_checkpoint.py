import json

import torch

from stagewise.checkpoint import list_checkpoints
from stagewise.continual.curriculum import run_curriculum
from tests.helpers import load_weights, tiny_config


def test_stop_and_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    """N steps, stop (checkpoint), resume N more == 2N uninterrupted: every parameter, exactly."""
    ref_cfg = tiny_config(tiny_model_dir, tmp_path / "ref", stages=1, steps=4,
                          overrides=["eval.before_first_stage=false", "dist.mixed_precision=bf16"])
    run_curriculum(ref_cfg)

    cfg = tiny_config(tiny_model_dir, tmp_path / "resumed", stages=1, steps=4,
                      overrides=["eval.before_first_stage=false", "dist.mixed_precision=bf16"])
    first = run_curriculum(cfg, stop_after=2)
    assert first["stopped"]
    ckpts = list_checkpoints(tmp_path / "resumed" / "stage-1-add")
    assert [c.name for c in ckpts] == ["step-2"]
    manifest = json.loads((ckpts[0] / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["total_steps"] == 4
    assert not list((tmp_path / "resumed" / "stage-1-add" / "checkpoints").glob(".tmp-*"))
    run_curriculum(cfg, resume=True)

    a = load_weights(tmp_path / "ref" / "final_model")
    b = load_weights(tmp_path / "resumed" / "final_model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    base = load_weights(tiny_model_dir)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # training really changed the weights
    # the learning-rate schedule continued too: the resumed run logged the same lr per step
    lrs = lambda p: [r["lr"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines()) if "lr" in r]  # noqa: E731
    assert lrs(tmp_path / "ref") == lrs(tmp_path / "resumed")


def test_keep_last_prunes_old_checkpoints(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "k", stages=1, steps=4,
                      overrides=["checkpoint.every=1", "checkpoint.keep_last=2", "eval.before_first_stage=false"])
    run_curriculum(cfg)
    assert [c.name for c in list_checkpoints(tmp_path / "k" / "stage-1-add")] == ["step-2", "step-3"]

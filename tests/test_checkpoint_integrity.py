"""Checkpoint integrity: every file's size and SHA-256 are in the manifest; a corrupt, truncated or
missing file makes the newest checkpoint refused with one line and the previous one used; a save
that fails (full disk) keeps the previous checkpoint and stops with one line."""

from __future__ import annotations

import json

import pytest
import torch

from stagewise.checkpoint import checkpoint_problem, latest_checkpoint, list_checkpoints
from stagewise.continual.curriculum import run_curriculum
from stagewise.errors import TrainingError
from tests.helpers import load_weights, tiny_config

OVERRIDES = ["eval.before_first_stage=false", "checkpoint.every=1", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_curriculum(tiny_config(tiny_model_dir, out, stages=1, steps=4, overrides=OVERRIDES))
    return load_weights(out / "final_model")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def damage(ckpt, how: str) -> str:
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    name = max(files, key=lambda f: files[f]["size"])  # the largest file: weights or optimizer state
    p = ckpt / name
    if how == "flip":
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif how == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        p.unlink()
    return name


def test_manifest_records_every_file(tiny_model_dir, tmp_path, reference):
    cfg = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=4, overrides=OVERRIDES)
    run_curriculum(cfg, stop_after=2)
    ckpt = list_checkpoints(tmp_path / "r" / "stage-1-add")[-1]
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(files) == on_disk and all(len(v["sha256"]) == 64 and v["size"] > 0 for v in files.values())
    assert checkpoint_problem(ckpt) is None


@pytest.mark.parametrize("how, message", [("flip", "does not match its SHA-256"),
                                          ("truncate", "bytes, the manifest says"), ("delete", "is missing")])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_model_dir, tmp_path, capsys, reference, how,
                                                              message):
    cfg = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=4, overrides=OVERRIDES)
    assert run_curriculum(cfg, stop_after=3)["stopped"]
    stage = tmp_path / "r" / "stage-1-add"
    assert [c.name for c in list_checkpoints(stage)] == ["step-2", "step-3"]
    name = damage(stage / "checkpoints" / "step-3", how)
    assert message in checkpoint_problem(stage / "checkpoints" / "step-3")
    assert latest_checkpoint(stage, quiet=True).name == "step-2"
    capsys.readouterr()
    run_curriculum(cfg, resume=True)
    out = capsys.readouterr().out
    assert f"refusing checkpoint {stage / 'checkpoints' / 'step-3'}: {name}" in out and "resumed from" in out
    assert "step-2 (step 2/4)" in out
    assert same(load_weights(tmp_path / "r" / "final_model"), reference)  # steps 3 and 4 redone, exactly


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch, reference):
    cfg = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=4, overrides=OVERRIDES)
    monkeypatch.setenv("STAGEWISE_FAULTS", "disk_full@step=3")
    with pytest.raises(TrainingError, match=r"could not write checkpoint .*step-3 \(No space left on device "
                                            r"\(injected\)\); the previous checkpoint step-2 is intact"):
        run_curriculum(cfg)
    stage = tmp_path / "r" / "stage-1-add"
    kept = list_checkpoints(stage)
    assert [c.name for c in kept] == ["step-1", "step-2"] and all(checkpoint_problem(c) is None for c in kept)
    assert not list((stage / "checkpoints").glob(".tmp-*"))
    monkeypatch.delenv("STAGEWISE_FAULTS")
    run_curriculum(cfg, resume=True)
    assert same(load_weights(tmp_path / "r" / "final_model"), reference)


def test_resume_refuses_a_changed_model_data_batch_or_seed(tiny_model_dir, tmp_path, reference):
    from stagewise.errors import StagewiseError

    cfg = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=4, overrides=OVERRIDES)
    run_curriculum(cfg, stop_after=2)
    changed = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=4, overrides=OVERRIDES + [
        "seed=1", "rollout.num_generations=2", "domains.0.args.hi=8"])
    with pytest.raises(StagewiseError,
                       match=r"in 3 key\(s\) that must not change mid-run: domains\.0\.args\.hi: 9 -> 8; "
                             r"rollout\.num_generations: 4 -> 2; seed: 0 -> 1 \(add --force"):
        run_curriculum(changed, resume=True)
    # what may change: logging, evaluation, checkpointing, learning rate, precision ...
    harmless = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=4, overrides=OVERRIDES + [
        "logging.log_every=2", "eval.batch_size=4", "checkpoint.keep_last=3"])
    run_curriculum(harmless, resume=True)
    assert same(load_weights(tmp_path / "r" / "final_model"), reference)


def test_resume_with_force_goes_on(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=3, overrides=OVERRIDES)
    run_curriculum(cfg, stop_after=2)
    changed = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=3, overrides=OVERRIDES + ["seed=5"])
    assert not run_curriculum(changed, resume=True, force=True)["stopped"]

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


def test_resume_with_force_keeps_each_domains_matrix_values_under_its_name(tiny_model_dir, tmp_path):
    """A --force resume whose config reorders the domains and drops one: the matrices' rows (one
    value per domain, in the config's order) follow the names, not the positions."""
    from stagewise.config import load_config
    from tests.helpers import tiny_raw

    out = tmp_path / "r"
    raw = tiny_raw(tiny_model_dir, out, stages=1, steps=1)
    run_curriculum(load_config(raw=raw))
    state = out / "curriculum.json"
    before = json.loads(state.read_text())
    # a random tiny model scores 0 on both domains: distinct values, so that a swap would show
    before["rows"] = {"0": [0.125, 0.25], "1": [0.375, 0.5]}
    before["loss_rows"] = {"0": [1.5, 2.5], "1": [3.5, 4.5]}
    state.write_text(json.dumps(before))
    raw["domains"] = [raw["domains"][1], raw["domains"][0], {**raw["domains"][0], "name": "add2", "type": "add"}]
    raw["stages"] = raw["stages"] + [{"domains": ["max"], "steps": 1}]
    run_curriculum(load_config(raw=raw), resume=True, force=True)
    after = json.loads((out / "curriculum.json").read_text())
    for key in ("rows", "loss_rows"):
        for k in ("0", "1"):
            add, mx = before[key][k]
            assert after[key][k] == [mx, add, None], (key, k)
        assert len(after[key]["2"]) == 3  # the new row: every domain of the new config
    assert None not in after["rows"]["2"]  # (no held-out loss without an sft stage: loss_rows' are None)
    assert "| base |" in (out / "report.md").read_text()


def _fake_checkpoint(root, step: int) -> None:
    from stagewise.checkpoint import MANIFEST, file_table

    d = root / "checkpoints" / f"step-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / MANIFEST).write_text(json.dumps({"step": step, "files": file_table(d)}))


def _agree_worker(rank: int, port: int, roots: list, results):
    """One of two gloo processes: which checkpoint it resumes from and how many files it hashed."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), STAGEWISE_SHARED_FS_WAIT_S="2")
    import torch.distributed as td
    from accelerate.state import PartialState

    from stagewise import checkpoint

    PartialState(cpu=True, backend="gloo")
    hashed = []
    real = checkpoint.sha256
    checkpoint.sha256 = lambda p: hashed.append(p.name) or real(p)
    try:
        chosen = checkpoint.agreed_checkpoint(roots[rank])
        results.put((rank, chosen.name if chosen else None, len(hashed), None))
    except Exception as e:  # noqa: BLE001  (reported to the test)
        results.put((rank, None, len(hashed), f"{type(e).__name__}: {e}"))
    finally:
        td.destroy_process_group()


def _agree(roots) -> dict:
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, [str(x) for x in roots], results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((r, rest) for r, *rest in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.mark.slow
def test_only_the_main_process_checksums_on_resume_and_every_rank_takes_its_choice(tmp_path):
    import shutil

    _fake_checkpoint(tmp_path, 1)
    _fake_checkpoint(tmp_path, 2)
    newest = tmp_path / "checkpoints" / "step-2" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[::-1])  # damaged: rank 0 refuses it, everyone resumes from step-1
    out = _agree([tmp_path, tmp_path])
    assert out[0] == ["step-1", 2, None] and out[1] == ["step-1", 0, None]  # rank 0 hashed step-2, then step-1
    # a machine whose output_dir is another disk (no shared filesystem): every rank stops, saying so
    alone = tmp_path / "other_machine"
    shutil.copytree(tmp_path / "checkpoints", alone / "checkpoints")
    shutil.rmtree(alone / "checkpoints" / "step-1")
    out = _agree([tmp_path, alone])
    for rank in (0, 1):
        assert out[rank][0] is None and "1 process(es) cannot see checkpoint" in out[rank][2], out
        assert "a filesystem every machine shares" in out[rank][2]

"""Safe loading: checkpoint files are read with torch.load(weights_only=True) or safetensors, so a
pickle payload planted in a checkpoint is refused, never executed; remote code stays off."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from stagewise.continual.curriculum import run_curriculum
from stagewise.errors import StagewiseError
from tests.helpers import tiny_config


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("victim", ["scheduler.bin", "optimizer.bin"])
def test_planted_pickle_payload_is_refused_not_executed(tiny_model_dir, tmp_path, victim):
    cfg = tiny_config(tiny_model_dir, tmp_path / "r", stages=1, steps=4, overrides=["eval.before_first_stage=false"])
    run_curriculum(cfg, stop_after=2)
    ckpt = tmp_path / "r" / "stage-1-add" / "checkpoints" / "step-2"
    pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin"))
    assert pickles and not [p for p in pickles if p.startswith("custom_checkpoint")]  # counters live in the manifest
    marker = tmp_path / "pwned"
    target = ckpt / victim
    target.write_bytes(pickle.dumps(Payload(marker)))
    # an attacker who can write the checkpoint can also rewrite its manifest: the checksums then match
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][target.name] = {"size": target.stat().st_size,
                                      "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StagewiseError, match="refusing to load a checkpoint file that holds Python objects"):
        run_curriculum(cfg, resume=True)
    assert not marker.exists()


def test_remote_code_is_off_unless_asked(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "r")
    assert cfg.model.trust_remote_code is False

"""A finished 2-stage run on the tiny model (SFT on add, then GRPO on max), made once per session:
the tests of `stagewise eval`, `report --baseline` and the model cards read it (none writes into it)."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_config


@pytest.fixture(scope="session")
def finished_run(tiny_chat_dir, tmp_path_factory):
    """-> (output dir, the run's result). The SFT step changes the weights, so the held-out loss (on)
    moves with them: the random tiny model's accuracy is 0 everywhere and would tell no models apart."""
    from stagewise.continual.curriculum import run_curriculum

    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = tiny_config(tiny_chat_dir, out, stages=2, steps=1,
                      overrides=["stages.0.kind=sft", "sft.batch_size=8", "sft.micro_batch_size=4",
                                 "sft.max_seq_len=256", "eval.held_out_loss=true"])
    return out, run_curriculum(cfg)

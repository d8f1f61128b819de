"""Experiment trackers (`logging.report_to`), through accelerate's tracker classes.

    logging:
      report_to: [tensorboard, wandb, mlflow, trackio]    # default [tensorboard]; [] logs metrics.jsonl only

    check_installed(["wandb"])      # preflight: ConfigError "... pip install 'stagewise[wandb]'" if missing
    t = open_tracker("mlflow", out, name="tiny", project="stagewise", config=flat, resume_id=None)
    t.log({"reward": 0.4}, step=3); t.table("eval/accuracy_matrix", cols, rows, step=3)
    t.images({"report/accuracy_matrix": Path("accuracy_matrix.png")}, step=4); t.finish(failed=False)

accelerate's trackers are made to be owned by an ``Accelerator``; here ``tracking.Tracker`` owns them, on
rank 0, for the whole run: a run builds one Accelerator per stage (each stage has its own batch shape),
while a tracker's run spans every stage, and a ``--resume`` too (``resume_id``). Each adapter below
adds what accelerate's class lacks (tables, images, a failed status) with the tracker's own API.

Where each writes is the tracker's own setting, as in any accelerate or transformers run: TensorBoard
``output_dir/tb``; W&B ``WANDB_MODE`` (offline), ``WANDB_DIR``, ``WANDB_PROJECT``; MLflow
``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db`` in the working directory),
``MLFLOW_EXPERIMENT_NAME``; trackio ``TRACKIO_DIR`` (default ``~/.cache/huggingface/trackio``).
Every import of a tracker's package happens here, inside a function: stagewise imports without them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import get_args

from stagewise.config import TrackerName
from stagewise.errors import ConfigError

NAMES: tuple[str, ...] = get_args(TrackerName)
_TENSORBOARD = "tensorboard==2.21.0"  # a dependency of stagewise; the other trackers are its extras


def check_installed(names) -> None:
    """Every selected tracker's package can be imported; else one line saying what to install."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if not missing:
        return
    extras = [n for n in missing if n != "tensorboard"]
    install = ([f"'stagewise[{','.join(extras)}]'"] if extras else []) + (
        [_TENSORBOARD] if "tensorboard" in missing else [])
    raise ConfigError(f"logging.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                      f"installed (pip install {' '.join(install)})")


def open_tracker(kind: str, output_dir: Path, *, name: str, project: str, config: dict, resume_id: str | None):
    """A started tracker of ``kind``, its run configured with ``config`` (flat: dotted keys, scalar values)."""
    return _ADAPTERS[kind](Path(output_dir), name=name, project=project, config=config, resume_id=resume_id)


def _started(tracker):
    # We construct trackers on rank 0 only, so accelerate's per-call main-process check is not needed
    # (and it would query PartialState on every call).
    tracker.main_process_only = False
    tracker.start()
    return tracker


def _rgb(path: Path):
    """A PNG as an (H, W, 3) uint8 array (TensorBoard's images take 3 channels, a PNG has 4)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _markdown(columns: list[str], rows: list[list]) -> str:
    cell = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


class TensorBoardTracker:
    """``output_dir/tb``; the config as hparams (accelerate), the table as markdown text."""

    def __init__(self, out: Path, *, name: str, project: str, config: dict, resume_id: str | None):
        from accelerate.tracking import TensorBoardTracker as Accelerate

        self.t = _started(Accelerate("tb", out))  # accelerate writes to logging_dir / run_name
        self.run_id = None
        self.t.store_init_configuration(config)

    def log(self, values: dict, step: int | None) -> None:
        self.t.log(values, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        self.t.writer.add_text(key, _markdown(columns, rows), global_step=step)
        self.t.writer.flush()

    def images(self, paths: dict[str, Path], step: int | None) -> None:
        self.t.log_images({k: _rgb(p)[None] for k, p in paths.items()}, step=step, dataformats="NHWC")
        self.t.writer.flush()

    def finish(self, failed: bool) -> None:
        self.t.finish()


class WandBTracker:
    """A W&B run (``--resume`` continues it: ``resume_id`` is its id); tables and images as W&B media."""

    def __init__(self, out: Path, *, name: str, project: str, config: dict, resume_id: str | None):
        import os

        from accelerate.tracking import WandBTracker as Accelerate

        resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
        # the config goes with wandb.init, so that the run starts with it (and an offline run holds it)
        self.t = _started(Accelerate(os.environ.get("WANDB_PROJECT") or project, name=name, config=config,
                                     **resume))
        self.run_id = self.t.run.id

    def log(self, values: dict, step: int | None) -> None:
        self.t.log(values, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        self.t.log_table(key, columns=columns, data=rows, step=step)

    def images(self, paths: dict[str, Path], step: int | None) -> None:
        self.t.log_images({k: [str(p)] for k, p in paths.items()}, step=step)

    def finish(self, failed: bool) -> None:
        self.t.run.finish(exit_code=1 if failed else 0)  # accelerate's finish() has no exit code


class MLflowTracker:
    """An MLflow run in experiment ``project`` (``MLFLOW_EXPERIMENT_NAME`` wins); each table is a JSON
    artifact ``<key>/step_<n>.json`` (mlflow.log_table), each image an artifact under ``report/``."""

    # MLflow names take letters, digits and _ - . / : and spaces: `eval/x/pass^2` must become `eval/x/pass_2`
    _BAD = re.compile(r"[^\w\-./: ]")

    def __init__(self, out: Path, *, name: str, project: str, config: dict, resume_id: str | None):
        from accelerate.tracking import MLflowTracker as Accelerate

        self.t = _started(Accelerate(experiment_name=project, run_name=name, run_id=resume_id))
        self.run_id = self.t.active_run.info.run_id
        params = {self._BAD.sub("_", k): v for k, v in config.items()}
        if resume_id:  # MLflow refuses to change a param: a resumed run (--force) keeps its first values
            import mlflow

            params = {k: v for k, v in params.items() if k not in mlflow.get_run(resume_id).data.params}
        self.t.store_init_configuration(params)

    def log(self, values: dict, step: int | None) -> None:
        self.t.log({self._BAD.sub("_", k): v for k, v in values.items()}, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        import mlflow

        # one file per evaluation: log_table appends to an existing file
        data = {c: [row[j] for row in rows] for j, c in enumerate(columns)}
        mlflow.log_table(data, artifact_file=f"{self._BAD.sub('_', key)}/step_{step or 0}.json")

    def images(self, paths: dict[str, Path], step: int | None) -> None:
        for p in paths.values():
            self.t.log_artifact(str(p), artifact_path="report")

    def finish(self, failed: bool) -> None:
        import mlflow

        mlflow.end_run(status="FAILED" if failed else "FINISHED")  # accelerate's finish() has no status


class TrackioTracker:
    """A trackio run (local by default: ``TRACKIO_DIR``); ``--resume`` continues the run of that name."""

    def __init__(self, out: Path, *, name: str, project: str, config: dict, resume_id: str | None):
        from accelerate.tracking import TrackioTracker as Accelerate

        # the config goes with trackio.init: accelerate's store_init_configuration would also store
        # its own `allow_val_change` argument as a config key
        self.t = _started(Accelerate(project, name=resume_id or name, config=config,
                                     resume="allow" if resume_id else "never"))
        self.run_id = self.t.run.name

    def log(self, values: dict, step: int | None) -> None:
        self.t.log(values, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        import trackio

        self.t.log({key: trackio.Table(columns=columns, data=rows)}, step=step)

    def images(self, paths: dict[str, Path], step: int | None) -> None:
        import trackio

        self.t.log({k: trackio.Image(str(p)) for k, p in paths.items()}, step=step)

    def finish(self, failed: bool) -> None:
        self.t.finish()  # trackio keeps no run status: finishing flushes what was logged


_ADAPTERS = {"tensorboard": TensorBoardTracker, "wandb": WandBTracker, "mlflow": MLflowTracker,
             "trackio": TrackioTracker}

"""logging.report_to (stagewise/trackers.py): every tracker for real, offline, on the tiny model.

W&B in offline mode, MLflow on a local SQLite store (its default kind; its file store cannot hold both
`reward` and `reward/sevens`), trackio in a local directory, all under pytest's tmp: each test reads
back, through the tracker's own API, what the run left there.
"""

from __future__ import annotations

import pytest
import yaml

from stagewise.config import load_config
from stagewise.continual import preflight
from stagewise.continual.curriculum import run_curriculum
from stagewise.errors import ConfigError
from tests.helpers import tiny_raw
from tests.tracker_readback import read_mlflow, read_tensorboard, read_trackio, read_wandb

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]
MATRIX_COLUMNS = ["after", "add", "max"]


@pytest.fixture(scope="session")
def trackio_dir(tmp_path_factory):
    """trackio reads TRACKIO_DIR once, when it is first imported: set it for the session, then import."""
    root = tmp_path_factory.mktemp("trackio")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRACKIO_DIR", str(root))
    import trackio.utils

    assert trackio.utils.TRACKIO_DIR == root, "trackio was imported before the tests set its directory"
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory) -> str:
    """One SQLite store for the session: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def offline(tmp_path, monkeypatch, trackio_dir, mlflow_db):
    """Each tracker's local store in this test's tmp (trackio's and MLflow's: the session's, one project
    per test)."""
    from mlflow.tracking import MlflowClient

    project = f"p-{tmp_path.name}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    (tmp_path / "wandb").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading back: no progress bars
    # the experiment made here, so that its artifacts go to tmp (MLflow's default: ./mlruns, in the repo)
    MlflowClient(mlflow_db).create_experiment(project, artifact_location=(tmp_path / "mlartifacts").as_uri())
    yield {"wandb": tmp_path / "wandb", "mlflow": mlflow_db, "project": project}
    import wandb

    wandb.teardown()  # wandb reads WANDB_DIR once per process setup: the next test's must be read again


def tracked_config(model_dir, out, project: str, report_to=ALL, overrides=()):
    raw = tiny_raw(model_dir, out, stages=2, steps=2, logging={"report_to": report_to, "project": project,
                                                               "progress": False})
    return load_config(raw=raw, overrides=list(overrides))


def test_every_tracker_holds_one_run_across_stages_a_stop_and_a_resume(tiny_model_dir, tmp_path, offline):
    """Two stages, stopped after the first (--stop-after) and resumed: each tracker holds one run with
    both stages' metrics, the resolved config, the accuracy matrix after every evaluation and the plots."""
    cfg = tracked_config(tiny_model_dir, tmp_path / "run", offline["project"])
    assert run_curriculum(cfg, stop_after=2)["stopped"]
    result = run_curriculum(cfg, resume=True)
    final = [["base", *result["matrix"][0]], ["stage 1 (add)", *result["matrix"][1]],
             ["stage 2 (max)", *result["matrix"][2]]]
    metric_keys = {"reward", "grad_norm", "loss", "stage", "eval/add", "eval/max"}

    wb = read_wandb(offline["wandb"])
    assert len(wb["run_ids"]) == 1 and wb["exit_codes"] == [0, 0]  # one run, finished by each invocation
    assert metric_keys <= set(wb["history"])
    assert [s for s, _ in wb["history"]["reward"]] == [1, 2, 3, 4]  # both stages, one global step
    assert wb["config"]["optim.lr"] == pytest.approx(1e-3) and wb["config"]["stages.1.domains"] == '["max"]'
    assert wb["config"]["logging.report_to"] == '["tensorboard", "wandb", "mlflow", "trackio"]'
    tables = [t for k, t in sorted(wb["tables"].items()) if k.startswith("table/eval/accuracy_matrix")]
    assert len(tables) == 3 and all(t["columns"] == MATRIX_COLUMNS for t in tables)  # after every evaluation
    assert max(tables, key=lambda t: len(t["data"]))["data"] == final
    assert any(p.startswith("images/report/accuracy_matrix") for p in wb["images"])

    (ml,) = read_mlflow(offline["mlflow"], offline["project"])
    assert ml["status"] == "FINISHED"
    assert metric_keys <= set(ml["metrics"]) and [s for s, _ in ml["metrics"]["reward"]] == [1, 2, 3, 4]
    assert ml["params"]["optim.lr"] == "0.001" and ml["params"]["name"] == "tiny"
    assert ml["tables"]["eval/accuracy_matrix/step_4.json"] == {"columns": MATRIX_COLUMNS, "data": final}
    assert {"report/accuracy_matrix.png", "report/reward_curves.png"} <= set(ml["artifacts"])

    runs = read_trackio(offline["project"])
    assert list(runs) == ["tiny"]
    logs, config = runs["tiny"]["logs"], runs["tiny"]["config"]
    assert [row["step"] for row in logs if "reward" in row] == [1, 2, 3, 4]
    assert metric_keys <= {k for row in logs for k in row}
    assert config["optim.lr"] == pytest.approx(1e-3)
    matrices = [row["eval/accuracy_matrix"]["_value"] for row in logs if "eval/accuracy_matrix" in row]
    assert len(matrices) == 3 and matrices[-1] == [dict(zip(MATRIX_COLUMNS, row)) for row in final]
    assert any(row.get("report/accuracy_matrix", {}).get("_type") == "trackio.image" for row in logs)

    tb = read_tensorboard(tmp_path / "run" / "tb")
    assert metric_keys <= tb["scalars"] and "report/accuracy_matrix" in tb["images"]
    assert "eval/accuracy_matrix/text_summary" in tb["tensors"]  # the matrix as a markdown table
    hparams = [yaml.safe_load(p.read_text()) for p in (tmp_path / "run" / "tb").rglob("hparams.yml")]
    assert len(hparams) == 2 and all(h["optim.lr"] == pytest.approx(1e-3) for h in hparams)  # one per invocation
    print_held_keys(wb, ml, runs, tb)


@pytest.mark.slow
def test_two_processes_report_one_run_from_rank_0(tiny_model_dir, tmp_path, offline):
    """DDP on 2 processes: one run per tracker, each step once (rank 1 opens no tracker)."""
    import subprocess
    import sys

    raw = tiny_raw(tiny_model_dir, tmp_path / "ddp", stages=1, steps=2,
                   logging={"report_to": ALL, "project": offline["project"], "progress": False},
                   eval={"before_first_stage": False})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "stagewise", "launch", "--strategy", "ddp", "--num-processes", "2",
                        str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    wb = read_wandb(offline["wandb"])
    assert len(wb["run_ids"]) == 1 and [s for s, _ in wb["history"]["reward"]] == [1, 2]
    (ml,) = read_mlflow(offline["mlflow"], offline["project"])
    assert [s for s, _ in ml["metrics"]["reward"]] == [1, 2]
    runs = read_trackio(offline["project"])
    assert list(runs) == ["tiny"] and [row["step"] for row in runs["tiny"]["logs"] if "reward" in row] == [1, 2]
    assert len(list((tmp_path / "ddp" / "tb").glob("events.out.tfevents.*"))) == 1


def print_held_keys(wb: dict, ml: dict, trackio_runs: dict, tb: dict) -> None:
    """What each tracker holds (`pytest -s` shows it): the keys, not the values."""
    logs = next(iter(trackio_runs.values()))["logs"]
    trackio_keys = sorted({k for row in logs for k in row} - {"step", "timestamp"})
    media = {k.rsplit("/", 1)[0] for k in wb["history"] if k.endswith("/_type")}  # a table's or image's fields
    numbers = [k for k in wb["history"] if not k.startswith("_") and not any(k.startswith(m + "/") for m in media)]
    print("\nW&B (offline run):", f"{len(wb['run_ids'])} run,", f"exit codes {wb['exit_codes']}")
    print("  history:", sorted(numbers))
    print("  media:", sorted(media))
    print("  config:", len(wb["config"]), "keys, e.g.", sorted(wb["config"])[:6])
    print("  tables:", sorted(wb["tables"]))
    print("  images:", wb["images"])
    print("MLflow (local SQLite store):", f"status {ml['status']}")
    print("  metrics:", sorted(ml["metrics"]))
    print("  params:", len(ml["params"]), "keys, e.g.", sorted(ml["params"])[:6])
    print("  artifacts:", ml["artifacts"])
    print("trackio (local sqlite):", list(trackio_runs))
    print("  logged keys:", trackio_keys)
    print("  config:", len(next(iter(trackio_runs.values()))["config"]), "keys")
    print("TensorBoard (output_dir/tb):", {k: sorted(v) for k, v in tb.items()})


def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_loads(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    import importlib.util

    from stagewise import trackers

    assert tuple(trackers._ADAPTERS) == trackers.NAMES  # every name the config takes has a tracker
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = tracked_config(tiny_model_dir, tmp_path / "run", "p", report_to=["tensorboard", "wandb"])
    monkeypatch.setattr("stagewise.continual.curriculum.resolve_model_path",
                        lambda *a: pytest.fail("the model was looked up before the check"))
    with pytest.raises(ConfigError) as e:
        run_curriculum(cfg)
    assert str(e.value) == "logging.report_to: wandb is not installed (pip install 'stagewise[wandb]')"
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"^logging.report_to: tensorboard, wandb are not installed \(pip install "
                                          r"'stagewise\[wandb\]' tensorboard==2.21.0\)$"):
        preflight.check_config(cfg, 1)


def test_an_old_config_naming_logging_tensorboard_is_told_to_use_report_to(tiny_model_dir, tmp_path):
    raw = tiny_raw(tiny_model_dir, tmp_path, logging={"tensorboard": False})
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    assert str(e.value) == ("logging: the key tensorboard was replaced by report_to, a list of trackers "
                            "(report_to: [tensorboard], or [] for none)")
    assert load_config(raw=tiny_raw(tiny_model_dir, tmp_path), overrides=["logging.report_to=wandb"]
                       ).logging.report_to == ["wandb"]
    with pytest.raises(ConfigError, match="logging.report_to: name each tracker once"):
        load_config(raw=tiny_raw(tiny_model_dir, tmp_path), overrides=["logging.report_to=[mlflow,mlflow]"])


def test_every_tracker_is_finished_as_failed_when_the_run_raises(tiny_model_dir, tmp_path, offline, monkeypatch):
    import mlflow
    import wandb

    from stagewise.faults import InjectedFault

    monkeypatch.setenv("STAGEWISE_FAULTS", "raise@stage=1,step=2")
    cfg = tracked_config(tiny_model_dir, tmp_path / "run", offline["project"])
    with pytest.raises(InjectedFault):
        run_curriculum(cfg)
    assert wandb.run is None and mlflow.active_run() is None  # nothing left open in this process
    wb = read_wandb(offline["wandb"])
    assert wb["exit_codes"] == [1] and [s for s, _ in wb["history"]["reward"]] == [1]
    (ml,) = read_mlflow(offline["mlflow"], offline["project"])
    assert ml["status"] == "FAILED" and [s for s, _ in ml["metrics"]["reward"]] == [1]
    logs = read_trackio(offline["project"])["tiny"]["logs"]  # finishing flushed what was logged
    assert [row["step"] for row in logs if "reward" in row] == [1]


class _Fake:
    """A started tracker that records what it was asked (``fail``: which method raises)."""

    run_id = None

    def __init__(self, calls: list, fail: str = ""):
        self.calls, self.fail = calls, fail

    def __getattr__(self, method):
        def call(*args):
            self.calls.append(method)
            if method == self.fail:
                raise OSError(f"{method} failed")
        return call


def test_a_tracker_that_fails_to_start_ends_those_already_started(tmp_path, monkeypatch):
    from stagewise import trackers
    from stagewise.tracking import Tracker

    calls = []

    def open_tracker(kind, *a, **kw):
        if kind == "wandb":
            raise RuntimeError("wandb: no API key")
        return _Fake(calls)

    monkeypatch.setattr(trackers, "open_tracker", open_tracker)
    with pytest.raises(RuntimeError, match="no API key"):
        Tracker(tmp_path, ["tensorboard", "wandb"])
    assert calls == ["finish"]


def test_a_tracker_that_fails_to_log_or_finish_stops_neither_the_run_nor_the_others(tmp_path, monkeypatch, capsys):
    from stagewise import trackers
    from stagewise.tracking import Tracker

    calls = {"tensorboard": [], "mlflow": []}
    fails = {"tensorboard": "finish", "mlflow": "log"}
    monkeypatch.setattr(trackers, "open_tracker", lambda kind, *a, **kw: _Fake(calls[kind], fails[kind]))
    tracker = Tracker(tmp_path, ["tensorboard", "mlflow"])
    tracker.log({"reward": 0.5, "kind": "grpo"}, step=1)
    tracker.log({"reward": 0.6}, step=2)
    tracker.close(failed=False)
    assert calls["tensorboard"] == ["log", "log", "finish"] and calls["mlflow"] == ["log", "log", "finish"]
    out = capsys.readouterr().out
    assert out.count("mlflow: log failed, training goes on: OSError") == 1  # said once, not at every step
    assert "tensorboard: could not finish its run: OSError" in out
    assert (tmp_path / "metrics.jsonl").read_text().count("reward") == 2


def test_stagewise_imports_no_tracker_package_at_module_level():
    """wandb, mlflow and trackio are extras: only trackers.py imports them, inside functions."""
    import ast
    from pathlib import Path

    import stagewise

    for path in Path(stagewise.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("wandb", "mlflow", "trackio") for n in names), (path, names)

"""What each tracker holds after a run, read back from its local store with its own API (W&B: the
offline run's ``.wandb`` log, parsed into wandb's own protobuf records; MLflow: ``MlflowClient``;
trackio: its SQLite storage; TensorBoard: tensorboard's event reader). No pytest here.

    held = read_wandb(wandb_dir)   # {"run_ids", "history", "config", "tables", "images", "exit_codes"}
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK, _HEADER = 32768, 7  # the .wandb file: LevelDB's log format, blocks of 32 KiB, 7-byte record headers


def wandb_records(path: Path) -> list:
    """Every record of one offline run's ``run-<id>.wandb`` file (wandb.proto.wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, chunk, records = _HEADER, b"", []  # the file's own 7-byte header: ":W&B", magic, version
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:  # zero padding: the end of what was written
            break
        chunk += data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def read_wandb(wandb_dir: Path) -> dict:
    """Every offline run under ``wandb_dir`` (a --resume adds a run directory with the same id)."""
    held = {"run_ids": set(), "history": {}, "config": {}, "tables": {}, "images": [], "exit_codes": []}
    for log in sorted(Path(wandb_dir).rglob("run-*.wandb")):
        for r in wandb_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":  # the run's start: its id, and the config given to wandb.init
                held["run_ids"].add(r.run.run_id)
                held["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update
                                       if not i.key.startswith("_")})
            elif kind == "history":
                step = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for k, v in step.items():
                    held["history"].setdefault(k, []).append((step["_step"], v))
            elif kind == "config":
                held["config"].update({i.key: json.loads(i.value_json) for i in r.config.update
                                       if not i.key.startswith("_")})
            elif kind == "exit":
                held["exit_codes"].append(r.exit.exit_code)
        files = log.parent / "files" / "media"
        for table in sorted(files.glob("table/**/*.table.json")):
            held["tables"][str(table.relative_to(files))] = json.loads(table.read_text())
        held["images"] += [str(p.relative_to(files)) for p in sorted(files.glob("images/**/*.png"))]
    return held


def read_mlflow(tracking_uri: str, experiment: str) -> list[dict]:
    """Every run of the experiment: its status, metric histories, params and artifact files."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = []
    for run in client.search_runs([exp.experiment_id]):
        rid = run.info.run_id
        artifacts = sorted(_artifact_files(client, rid))
        tables = {p: json.loads(Path(client.download_artifacts(rid, p)).read_text())
                  for p in artifacts if p.endswith(".json")}
        runs.append({"status": run.info.status, "params": run.data.params, "artifacts": artifacts, "tables": tables,
                     "metrics": {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
                                 for k in run.data.metrics}})
    return runs


def _artifact_files(client, run_id: str, path: str | None = None):
    for f in client.list_artifacts(run_id, path):
        yield from _artifact_files(client, run_id, f.path) if f.is_dir else [f.path]


def read_trackio(project: str) -> dict:
    """The project's runs, each with its logged rows and config (from TRACKIO_DIR, set before trackio loads)."""
    from trackio.sqlite_storage import SQLiteStorage

    return {name: {"logs": SQLiteStorage.get_logs(project, name), "config": SQLiteStorage.get_run_config(project, name)}
            for name in SQLiteStorage.get_runs(project)}


def read_tensorboard(tb_dir: Path) -> dict:
    """Tags by kind (scalars, images, tensors: text and hparams) over every event file under ``tb_dir``."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tb_dir))
    mux.Reload()
    tags: dict[str, set] = {}
    for run_tags in mux.Runs().values():
        for kind, names in run_tags.items():
            if isinstance(names, list) and names:
                tags.setdefault(kind, set()).update(names)
    return tags

"""Rank-0 helpers, progress, metrics.jsonl and the experiment trackers — the only place that prints or logs.

    print0("hello")                       # main process only
    tracker = Tracker(out_dir, report_to=["tensorboard", "wandb"], config=cfg_dict, name="run")
    tracker.log({"reward": 0.4}, step=3)  # metrics.jsonl + every tracker on rank 0; no-op elsewhere
    tracker.table("eval/accuracy_matrix", ["after", "add"], [["base", 0.1]], step=0)
    tracker.close(failed=False)           # runtime.end_run, on every exit path
    with PeakMemory() as peak: ...        # peak.mb: the most memory held during the block

The trackers (accelerate's classes, trackers.py) belong to this object, not to an Accelerator: a run
uses one Accelerator per stage (each stage its own batch shape), while the log spans the whole run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(highlight=False, soft_wrap=True)


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def is_main() -> bool:
    """True on the global rank-0 process (and when not distributed). Safe before any init."""
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            return PartialState().is_main_process
    except Exception:  # noqa: BLE001  (accelerate not initialised yet)
        pass
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on the main process only (plain text: no rich markup)."""
    if is_main():
        kwargs.setdefault("markup", False)
        _console.print(*args, **kwargs)


def show0(*renderables) -> None:
    """Print rich renderables (tables) on the main process only."""
    if is_main():
        _console.print(*renderables)


def _plain(v):
    """A tensor / numpy scalar as a Python number; NaN and inf as None (JSON has neither)."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _clean(metrics: dict) -> dict:
    return {k: _plain(v) for k, v in metrics.items()}


class Tracker:
    """Appends one JSON object per call to ``metrics.jsonl`` and reports the numbers to every tracker of
    ``report_to`` (trackers.py), on the main process only. The trackers' run ids are kept in
    ``trackers.json``, so that ``--resume`` continues the same runs.

    Open it once the run's process state exists (runtime.start_run): accelerate's trackers log through
    accelerate's logger, which needs it."""

    def __init__(self, output_dir: str | Path, report_to=("tensorboard",), config: dict | None = None, *,
                 name: str = "run", project: str = "stagewise", resume: bool = False):
        from stagewise.trackers import open_tracker

        self.main = is_main()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.trackers: dict = {}
        self._warned: set[tuple[str, str]] = set()
        if not self.main:
            return
        ids_path = Path(output_dir) / "trackers.json"
        ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
        flat = flat_config(config or {})
        try:
            for kind in report_to:
                self.trackers[kind] = open_tracker(kind, Path(output_dir), name=name, project=project,
                                                   config=flat, resume_id=ids.get(kind))
        except BaseException:
            self.close(failed=True)  # the ones already started end now: the caller never gets this object
            raise
        ids_path.parent.mkdir(parents=True, exist_ok=True)
        ids_path.write_text(json.dumps({k: t.run_id for k, t in self.trackers.items() if t.run_id}, indent=1))

    def log(self, metrics: dict, step: int | None = None) -> None:
        if not self.main:
            return
        row = _clean({**metrics, "step": step, "time": time.time()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        numbers = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}
        if numbers:
            self._each("log", numbers, step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """A table (the accuracy matrix so far) at ``step``; None cells stay empty."""
        if self.main:
            self._each("table", key, columns, [[_plain(v) for v in row] for row in rows], step)

    def images(self, paths: dict[str, Path], step: int | None = None) -> None:
        """PNG files (the report's plots) as images, keyed by name."""
        if self.main and paths:
            self._each("images", paths, step)

    def close(self, failed: bool = False) -> None:
        """Finish every tracker (``failed``: the run raised; W&B and MLflow record it in the run's status).
        One that fails to finish does not keep the others open."""
        trackers, self.trackers = self.trackers, {}
        for kind, t in trackers.items():
            try:
                t.finish(failed)
            except Exception as e:  # noqa: BLE001  (the next tracker, and end_run, must still run)
                print0(f"[stagewise] {kind}: could not finish its run: {type(e).__name__}: {e}")

    def _each(self, method: str, *args) -> None:
        # a tracker that fails to log (a full disk, a lost server) must not end a long run: say so once
        for kind, t in self.trackers.items():
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001
                if (kind, method) not in self._warned:
                    self._warned.add((kind, method))
                    print0(f"[stagewise] {kind}: {method} failed, training goes on: {type(e).__name__}: {e}")


class PeakMemory:
    """The most memory the process held during the block: CUDA allocator peak on GPU, resident set
    size (sampled every 50 ms by a thread) on CPU. ``resource.getrusage`` is no use here: it is the
    peak of the whole process, and a sweep runs several configurations in one process."""

    def __init__(self, interval: float = 0.05, device=None):
        """device: the run's device (CUDA peak only when the run computes on a GPU: a ``dist.cpu``
        run on a GPU machine measures host memory); None: the current CUDA device if any."""
        self.interval, self.mb, self.base_mb, self.device = interval, 0.0, 0.0, device
        self._stop = None

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def start(self) -> PeakMemory:
        return self.__enter__()

    def stop(self) -> float:
        self.__exit__(None, None, None)
        return self.mb

    def __enter__(self) -> PeakMemory:
        import threading

        import torch

        self.cuda = torch.cuda.is_available() if self.device is None else torch.device(self.device).type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self._stop = threading.Event()
        self.mb = self.base_mb = self.rss_mb()

        def sample():
            while not self._stop.wait(self.interval):
                self.mb = max(self.mb, self.rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mb = max(self.mb, self.rss_mb())


def flat_config(d: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1e-5}, "stages": [{"steps": 2}]}`` -> ``{"optim.lr": 1e-5, "stages.0.steps": 2}``;
    other lists and None as JSON text, so every tracker (TensorBoard's hparams, MLflow's params) takes
    every value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            out.update(flat_config(dict(enumerate(v)), f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


class StepProgress:
    """A rich progress bar on the main process only: step, reward/loss, tokens/s, ETA."""

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0):
        self.on = enabled and is_main()
        # not a terminal (CI, `| tee`, nohup): a live bar would only show at the end; print lines
        self.plain = self.on and not _console.is_terminal
        self.total, self.done, self.start, self.desc, self.t0 = total, start, start, description, time.time()
        if self.plain:
            return
        if self.on:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=_console, transient=False)
            self.task = self.bar.add_task(description, total=total, completed=start, info="")
            self.bar.start()

    def update(self, advance: int = 1, **info) -> None:
        if not self.on:
            return
        text = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self.done += advance
        if self.plain:
            every = max(1, self.total // 10)
            if self.done % every == 0 or self.done == self.total:
                el = time.time() - self.t0
                eta = el / max(self.done - self.start, 1) * (self.total - self.done)
                _console.print(f"{self.desc} {self.done}/{self.total}  {text}  elapsed {el:.0f}s  ETA {eta:.0f}s",
                               markup=False)
            return
        self.bar.update(self.task, advance=advance, info=text)

    def close(self) -> None:
        if self.on and not self.plain:
            self.bar.stop()

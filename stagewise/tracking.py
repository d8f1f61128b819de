"""Rank-0 helpers, progress, metrics.jsonl and TensorBoard — the only place that prints or logs.

    print0("hello")                       # main process only
    tracker = Tracker(out_dir, tensorboard=True, config=cfg_dict)
    tracker.log({"reward": 0.4}, step=3)  # metrics.jsonl (+ TensorBoard) on rank 0; no-op elsewhere
    with PeakMemory() as peak: ...        # peak.mb: the most memory held during the block

The TensorBoard writer is our own (torch.utils.tensorboard), not an accelerate tracker: a run uses
one Accelerator per stage (each stage its own batch shape), while the log spans the whole run.
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


def _clean(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


class Tracker:
    """Appends one JSON object per call to ``metrics.jsonl`` and writes the numbers to TensorBoard
    (``output_dir/tb``), on the main process only."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, config: dict | None = None):
        self.main = is_main()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if self.main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))
                if config:
                    self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat(config).items()))
            except Exception as e:  # noqa: BLE001  (tensorboard missing or unwritable: keep training, say why)
                print0(f"[stagewise] TensorBoard disabled: {e}")

    def log(self, metrics: dict, step: int | None = None) -> None:
        if not self.main:
            return
        row = _clean({**metrics, "step": step, "time": time.time()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.writer.add_scalar(k, v, global_step=step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
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

"""Ablation sweeps: every named override set of a config, each in its own output directory, then
one comparison.

    stagewise sweep configs/sft_profile_history.yaml                 # every entry of `ablations:`
    stagewise sweep configs/sft_profile_history.yaml --only profile,history optim.lr=2e-5

Each ablation runs as ``stagewise run CONFIG --ablation NAME`` would, in ``<output_dir>/<NAME>``
unless the ablation sets its own ``output_dir``. A finished run is not repeated and an interrupted
one is resumed, so re-running the sweep command continues where it stopped. The sweep writes
``sweep.md``, ``sweep.csv`` and ``sweep.png`` to the config's ``output_dir``: final training loss,
held-out loss, accuracy (where a domain defines one), tokens/s and peak memory per ablation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from stagewise.config import load_config
from stagewise.errors import ConfigError
from stagewise.tracking import is_main, print0

COLUMNS = ["ablation", "final_train_loss", "held_out_loss", "accuracy", "tokens_per_s", "peak_memory_mb", "seconds",
           "output_dir"]


def ablation_names(config_path: str | Path, only: list[str] | None) -> list[str]:
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    names = list((raw.get("ablations") or {}).keys())
    if not names:
        raise ConfigError(f"{config_path}: no `ablations:` to sweep")
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"--only: unknown ablation {unknown[0]!r} (defined: {', '.join(names)})")
        names = [n for n in names if n in only]
    return names


def finished(out: Path, n_stages: int) -> bool:
    state = out / "curriculum.json"
    if not state.is_file() or not (out / "final_model").is_dir():
        return False
    rows = json.loads(state.read_text()).get("rows", {})
    return all(str(k) in rows for k in range(1, n_stages + 1))


def run_sweep(config_path: str | Path, overrides: list[str] = (), only: list[str] | None = None) -> Path:
    from stagewise.continual.curriculum import run_curriculum
    from stagewise.continual.preflight import check_config
    from stagewise.continual.run_dir import holds_run
    from stagewise.parallel.runtime import world_size_from_env

    names = ablation_names(config_path, only)
    base = load_config(config_path, overrides)
    cfgs = {}
    for name in names:  # every ablation is checked before the first one runs
        cfg = load_config(config_path, overrides, ablation=name)
        check_config(cfg, world_size_from_env())
        if cfg.output_dir == base.output_dir:
            cfg = cfg.model_copy(update={"output_dir": str(Path(base.output_dir) / name)})
        cfgs[name] = cfg
    for i, (name, cfg) in enumerate(cfgs.items(), 1):
        out = Path(cfg.output_dir)
        if finished(out, len(cfg.stages)):
            print0(f"[stagewise] sweep {i}/{len(cfgs)}: {name} already finished in {out}")
            continue
        print0(f"[stagewise] sweep {i}/{len(cfgs)}: {name} -> {out}")
        run_curriculum(cfg, resume=out.exists() and holds_run(out))
    root = Path(base.output_dir)
    if is_main():
        rows = [summarize(name, Path(cfg.output_dir)) for name, cfg in cfgs.items()]
        write_outputs(root, rows, base.name)
        print0((root / "sweep.md").read_text())
    return root


def summarize(name: str, out: Path) -> dict:
    state = json.loads((out / "curriculum.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = str(max(int(k) for k in state["rows"]))
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
    steps = [m for m in metrics if "stage_step" in m]
    sft_losses = [m["loss"] for m in steps if "reward" not in m and m.get("loss") is not None]
    peaks = [m[k] for m in metrics for k in ("peak_memory_mb", "stage_peak_memory_mb") if m.get(k) is not None]
    return {
        "ablation": name,
        "final_train_loss": sft_losses[-1] if sft_losses else None,
        "held_out_loss": mean([x for x in (state.get("loss_rows", {}).get(last) or []) if x is not None]),
        "accuracy": mean([x for x in state["rows"][last] if x is not None]),
        "tokens_per_s": mean([m["tokens_per_s"] for m in steps if m.get("tokens_per_s") is not None]),
        "peak_memory_mb": max(peaks) if peaks else None,
        "seconds": sum(r.get("seconds", 0) for r in state.get("stage_results", {}).values()),
        "output_dir": str(out),
    }


def write_outputs(root: Path, rows: list[dict], title: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "sweep.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v, p=3: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = [f"# sweep — {title}", "", "| ablation | final train loss | held-out loss | accuracy | tokens/s | "
          "peak memory MB | train seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['ablation']} | {fmt(r['final_train_loss'])} | {fmt(r['held_out_loss'])} | "
                  f"{fmt(r['accuracy'])} | {fmt(r['tokens_per_s'], 0)} | {fmt(r['peak_memory_mb'], 0)} | "
                  f"{fmt(r['seconds'], 0)} |")
    md += ["", "held-out loss: mean NLL of the answers' tokens over the run's domains after the last stage; "
           "accuracy: greedy, where a domain defines a reward. Each run: `<ablation>/report.md`.", "",
           "![sweep](sweep.png)"]
    (root / "sweep.md").write_text("\n".join(md) + "\n")
    plot(rows, root / "sweep.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("final_train_loss", "final train loss"), ("held_out_loss", "held-out loss"), ("accuracy", "accuracy"),
              ("tokens_per_s", "tokens/s"), ("peak_memory_mb", "peak memory MB")]
    panels = [(k, t) for k, t in panels if any(r[k] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    names = [r["ablation"] for r in rows]
    for ax, (key, title) in zip(axes[0], panels):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.bar(range(len(vals)), vals, color="tab:blue")
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.2f}" if v < 100 else f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

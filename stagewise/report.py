"""report.md and PNG plots from an output directory (metrics.jsonl + curriculum.json).

    stagewise report runs/three_domains      # (re)write the report of a finished run
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from stagewise.continual.metrics import continual_metrics  # noqa: E402


def read_metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_rewards(rows: list[dict], path: Path) -> bool:
    steps = [r for r in rows if "reward" in r and "stage" in r]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for stage in sorted({r["stage"] for r in steps}):
        pts = [(r["step"], r["reward"]) for r in steps if r["stage"] == stage]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"stage {stage}")
    ax.set_xlabel("global step")
    ax.set_ylabel("mean reward (weighted sum)")
    ax.set_title("GRPO reward per step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_matrix(R: list[list[float]], row_labels: list[str], col_labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(col_labels), 1.2 + 0.6 * len(row_labels)))
    im = ax.imshow(R, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_xlabel("evaluated domain")
    ax.set_title("held-out accuracy R")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str | Path, cfg, domain_names: list[str]) -> Path:
    out = Path(out)
    state = json.loads((out / "curriculum.json").read_text())
    n = len(cfg.stages)
    present = [k for k in range(n + 1) if str(k) in state["rows"]]
    R = [state["rows"][str(k)] for k in present]
    all_labels = ["base"] + [f"after {i + 1}: {'+'.join(s.domains)}" for i, s in enumerate(cfg.stages)]
    labels = [all_labels[k] for k in present]
    metrics = None
    if len(R) == n + 1:
        own = [[domain_names.index(d) for d in s.domains] for s in cfg.stages]
        metrics = continual_metrics(R, own)
    rows = read_metrics(out)
    has_curve = plot_rewards(rows, out / "reward_curves.png")
    plot_matrix(R, labels, domain_names, out / "accuracy_matrix.png")

    md = [f"# stagewise report — {cfg.name}", "",
          f"Model `{cfg.model.name_or_path}`, {n} stage(s), seed {cfg.seed}, strategy `{cfg.dist.strategy}`"
          + (f", ablation `{cfg.ablation}`" if cfg.ablation else "") + ". Resolved config: `config.yaml`.", "",
          "## Accuracy matrix (greedy decoding, held-out prompts)", "",
          "| after | " + " | ".join(domain_names) + " |", "|---|" + "---:|" * len(domain_names)]
    for lab, row in zip(labels, R):
        md.append(f"| {lab} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    md += ["", "![accuracy matrix](accuracy_matrix.png)", ""]
    if metrics:
        md += ["## Continual-learning metrics", "", "| metric | value |", "|---|---:|"]
        md += [f"| {k} | {v:+.3f} |" if v is not None else f"| {k} | n/a |" for k, v in metrics.items()]
        md += ["", "ACC, BWT, FWT as in GEM (Lopez-Paz & Ranzato 2017) with the base row as b; forgetting as in "
               "Chaudhry et al. 2018; plasticity = mean of R[i, i].", ""]
    md += ["## Stages", "", "| stage | domains | steps | seconds | first reward | last reward |", "|---|---|---:|---:|---:|---:|"]
    for i, s in enumerate(cfg.stages):
        res = state.get("stage_results", {}).get(str(i + 1))
        if res:
            c = res["reward_curve"] or [float("nan")]
            md.append(f"| {i + 1} | {', '.join(s.domains)} | {res['steps']} | {res['seconds']:.0f} | {c[0]:.3f} | {c[-1]:.3f} |")
    if has_curve:
        md += ["", "![reward curves](reward_curves.png)"]
    md += ["", "## Sample completions (greedy)", ""]
    for label, by_dom in state.get("samples", {}).items():
        for dom, smp in by_dom.items():
            for s in smp[:2]:
                prompt = s["prompt"] if isinstance(s["prompt"], str) else s["prompt"][-1]["content"]
                mark = "correct" if s["correct"] else "wrong"
                md.append(f"- *{label}*, {dom}: `{prompt}` → `{s['completion'].strip()[:80]}` ({mark}, answer {s['answer']})")
    md += ["", "Final model: `final_model/` (plain `AutoModelForCausalLM.from_pretrained`)."]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path

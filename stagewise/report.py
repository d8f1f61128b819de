"""report.md and PNG plots from an output directory (metrics.jsonl + curriculum.json).

    stagewise report runs/three_domains      # (re)write the report of a finished run
    stagewise report runs/three_domains --baseline smollm2.json   # + a `stagewise eval` row, labelled

Baselines are kept in ``<run>/baselines/<name>.json`` (so every later report shows them) and appear
in the matrices' tables as rows of their own, below the run's; the continual-learning metrics are the
run's alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from stagewise.continual.metrics import continual_metrics, loss_metrics  # noqa: E402
from stagewise.continual.model_card import matrix_table, row_labels  # noqa: E402
from stagewise.errors import StagewiseError  # noqa: E402

BASELINES = "baselines"


def add_baselines(out: Path, paths: list[str], domain_names: list[str]) -> list[str]:
    """Copy `stagewise eval` JSON files into the run's baselines/ (by their name; all checked before
    any is copied); -> their names."""
    found = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise StagewiseError(f"--baseline {path}: file not found")
        try:
            data = json.loads(p.read_text())
        except ValueError:
            raise StagewiseError(f"--baseline {path}: not JSON (write one with `stagewise eval ... --out`)") from None
        missing = [k for k in ("name", "domains", "accuracy", "loss") if not isinstance(data, dict) or k not in data]
        if missing:
            raise StagewiseError(f"--baseline {path}: not a `stagewise eval` result (no {missing[0]!r})")
        if not set(data["domains"]) & set(domain_names):
            raise StagewiseError(f"--baseline {path}: evaluates none of the run's domains (it has "
                                 f"{', '.join(data['domains'])}; the run {', '.join(domain_names)})")
        found.append(data)
    for data in found:
        (out / BASELINES).mkdir(exist_ok=True)
        file = out / BASELINES / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', data['name'])}.json"
        file.write_text(json.dumps(data, indent=2) + "\n")
    return [data["name"] for data in found]


def read_baselines(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / BASELINES).glob("*.json"))]


def baseline_differences(baseline: dict, cfg, domain_names: list[str]) -> list[str]:
    """What the baseline was evaluated with that differs from the run: other held-out tasks (seed,
    a domain's spec) or other decoding / scoring (eval, dist.mixed_precision) make its row another test."""
    theirs = baseline.get("config") or {}
    ours = cfg.model_dump(mode="json", exclude={"ablations"})
    diffs = ["seed"] if "seed" in theirs and theirs["seed"] != ours["seed"] else []
    skip = {"before_first_stage"}  # when the run evaluates, not how
    diffs += [f"eval.{k}" for k, v in ours["eval"].items() if k not in skip and k in theirs.get("eval", {})
              and theirs["eval"][k] != v]
    if "dist" in theirs and theirs["dist"].get("mixed_precision") != ours["dist"]["mixed_precision"]:
        diffs.append("dist.mixed_precision")
    specs = {d["name"]: d for d in theirs.get("domains", [])}
    diffs += [f"domains.{d['name']}" for d in ours["domains"]
              if d["name"] in domain_names and d["name"] in specs and specs[d["name"]] != d]
    return diffs


def read_metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], key: str, ylabel: str, title: str, path: Path) -> bool:
    steps = [r for r in rows if r.get(key) is not None and "stage_step" in r]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for stage in sorted({r["stage"] for r in steps}):
        pts = [(r["step"], r[key]) for r in steps if r["stage"] == stage]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"stage {stage}")
    ax.set_xlabel("global step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_matrix(R: list[list], row_labels: list[str], col_labels: list[str], path: Path,
                title: str = "held-out accuracy R", unit_range: bool = True) -> None:
    import math

    vals = [[float("nan") if v is None else v for v in row] for row in R]
    finite = [v for row in vals for v in row if not math.isnan(v)]
    lo, hi = (0.0, 1.0) if unit_range else (min(finite, default=0.0), max(finite, default=1.0))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(col_labels), 1.2 + 0.6 * len(row_labels)))
    im = ax.imshow(vals, cmap="viridis" if unit_range else "viridis_r", vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    mid = (lo + hi) / 2
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            text = "-" if math.isnan(v) else f"{v:.2f}"
            dark = (v < mid) if unit_range else (v > mid)
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black")
    ax.set_xlabel("evaluated domain")
    ax.set_title(title)
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
    all_labels = row_labels(cfg)
    labels = [all_labels[k] for k in present]
    baselines = read_baselines(out)  # rows of their own: never part of R, L or their metrics
    base_acc = [(f"*baseline: {b['name']}*", [b["accuracy"].get(d) for d in domain_names]) for b in baselines]
    base_loss = [(f"*baseline: {b['name']}*", [b["loss"].get(d) for d in domain_names]) for b in baselines]
    L = [state.get("loss_rows", {}).get(str(k)) or [None] * len(domain_names) for k in present]
    has_acc = any(x is not None for row in R for x in row)
    has_loss = any(x is not None for row in L for x in row)
    metrics = lossm = None
    if len(R) == n + 1:
        own = [[domain_names.index(d) for d in s.domains] for s in cfg.stages]
        metrics = continual_metrics(R, own) if has_acc else None
        lossm = loss_metrics(L, own) if has_loss else None
    rows = read_metrics(out)
    # a replay stage's curve is its own domains' reward (own_reward), as its stage_results' curve
    curves = [{**r, "reward": r.get("own_reward", r["reward"])} if "reward" in r else r for r in rows]
    has_curve = plot_curves(curves, "reward", "mean reward (weighted sum)",
                            "reward per step (a replay stage: its own domains')", out / "reward_curves.png")
    has_loss_curve = plot_curves([r for r in rows if "reward" not in r], "loss", "token-mean NLL",
                                 "SFT training loss per step", out / "sft_loss_curves.png")
    if has_acc:
        plot_matrix(R, labels, domain_names, out / "accuracy_matrix.png")
    if has_loss:
        plot_matrix(L, labels, domain_names, out / "loss_matrix.png", "held-out loss L (lower is better)", False)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731

    md = [f"# stagewise report — {cfg.name}", "",
          f"Model `{cfg.model.name_or_path}`, {n} stage(s), seed {cfg.seed}, strategy `{cfg.dist.strategy}`"
          + (f", ablation `{cfg.ablation}`" if cfg.ablation else "") + ". Resolved config: `config.yaml`.", "",
          ]
    if has_acc or any(x is not None for _, row in base_acc for x in row):
        md += ["## Accuracy matrix (greedy decoding, held-out prompts)", "",
               *matrix_table(domain_names, list(zip(labels, R)) + base_acc), ""]
        md += ["![accuracy matrix](accuracy_matrix.png)", ""] if has_acc else []
    if has_loss or any(x is not None for _, row in base_loss for x in row):
        md += ["## Held-out loss matrix (mean NLL of the answers' tokens; perplexity = exp)", "",
               *matrix_table(domain_names, list(zip(labels, L)) + base_loss), ""]
        md += ["![loss matrix](loss_matrix.png)", ""] if has_loss else []
        if lossm:
            md += ["| loss metric | value |", "|---|---:|"]
            md += [f"| {k} | {fmt(v)} |" for k, v in lossm.items()]
            md += ["", "loss_BWT < 0 / loss_forgetting > 0: held-out loss of earlier stages' domains rose.", ""]
    if baselines:
        md += ["Rows in *italics* are baselines: other models evaluated by `stagewise eval` (`baselines/`). They "
               "are not rows of the run's matrices, and the continual-learning metrics do not use them.", ""]
        notes = [f"- *{b['name']}* was evaluated with another {', '.join(diffs)} than this run: not the same test"
                 for b in baselines if (diffs := baseline_differences(b, cfg, domain_names))]
        md += notes + ([""] if notes else [])
    details = state.get("detail_rows", {})
    for dom in [d for d in domain_names if any(dom_details.get(d) for dom_details in details.values())]:
        keys = list(dict.fromkeys(k for k_row in present for k in details.get(str(k_row), {}).get(dom, {})))
        md += [f"## {dom}: what the held-out episodes did", "",
               "Means over the held-out episodes: each reward part (partial credit), `ended` (the customer or the "
               "agent ended the conversation), `tool_calls` per episode, `valid_calls` (attempts that parse and name "
               "a tool with its required arguments and no others).", "",
               "| after | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for k_row, lab in zip(present, labels):
            cells = details.get(str(k_row), {}).get(dom, {})
            md.append(f"| {lab} | " + " | ".join(fmt(cells.get(k)) for k in keys) + " |")
        md.append("")
    if metrics:
        md += ["## Continual-learning metrics", "", "| metric | value |", "|---|---:|"]
        md += [f"| {k} | {v:+.3f} |" if v is not None else f"| {k} | n/a |" for k, v in metrics.items()]
        md += ["", "ACC, BWT, FWT as in GEM (Lopez-Paz & Ranzato 2017) with the base row as b; forgetting as in "
               "Chaudhry et al. 2018; plasticity = mean of R[i, i].", ""]
    md += ["## Stages", "",
           "| stage | kind | domains | steps | seconds | first | last (reward for grpo, loss for sft) |",
           "|---|---|---|---:|---:|---:|---:|"]
    for i, s in enumerate(cfg.stages):
        res = state.get("stage_results", {}).get(str(i + 1))
        if res:
            c = [x for x in res.get("curve", res.get("reward_curve", [])) if x is not None] or [float("nan")]
            md.append(f"| {i + 1} | {s.kind} | {', '.join(s.domains)} | {res['steps']} | {res['seconds']:.0f} | "
                      f"{c[0]:.3f} | {c[-1]:.3f} |")
    if has_curve:
        md += ["", "![reward curves](reward_curves.png)"]
    if has_loss_curve:
        md += ["", "![SFT loss curves](sft_loss_curves.png)"]
    episode_rows = [r for r in rows if "episode/turns" in r]
    if episode_rows:
        keys = ["episode/turns", "episode/tool_calls", "episode/tool_errors", "episode/policy_tokens",
                "episode/prompt_tokens", "truncated_frac"]
        keys += sorted({k for r in episode_rows for k in r if k.startswith("reward/") and not k.endswith("_std")})
        md += ["", "## Multi-turn episodes (means per step: first → last)", "",
               "| stage | " + " | ".join(k.removeprefix("episode/") for k in keys) + " |",
               "|---|" + "---:|" * len(keys)]
        for stage in sorted({r["stage"] for r in episode_rows}):
            mine = [r for r in episode_rows if r["stage"] == stage]
            cells = [f"{mine[0].get(k, float('nan')):.2f} → {mine[-1].get(k, float('nan')):.2f}" for k in keys]
            md.append(f"| {stage} | " + " | ".join(cells) + " |")
    md += ["", "## Sample completions (greedy)", ""]
    conversations = {}  # multi-turn domains: the last evaluation's first episode, shown whole below
    for label, by_dom in state.get("samples", {}).items():
        for dom, smp in by_dom.items():
            for s in smp[:2]:
                prompt = s["prompt"] if isinstance(s["prompt"], str) else s["prompt"][-1]["content"]
                mark = "correct" if s["correct"] else "wrong"
                if s.get("turns", 1) > 1 or s["completion"].startswith("[assistant]"):
                    conversations[dom] = (label, prompt, s, mark)
                md.append(f"- *{label}*, {dom}: `{prompt}` → `{s['completion'].strip()[:80]}` "
                          f"({mark}, answer {s['answer']})".replace("\n", " "))
    if conversations:
        md += ["", "## Sample conversations (greedy, held-out task, last evaluation)", ""]
        for dom, (label, prompt, s, mark) in conversations.items():
            md += [f"**{dom}** ({label}, {s.get('turns', 1)} policy turns, {mark}):", "", "```text", f"[user] {prompt}",
                   s["completion"].strip(), "```", ""]
    md += ["", "Final model: `final_model/` (plain `AutoModelForCausalLM.from_pretrained`)."]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def print_matrix(cfg, names: list[str], present: list[int], rows: list[list], metrics: dict | None,
                 losses: list | None = None) -> None:
    """The accuracy (and held-out loss) matrix as terminal tables, then the continual-learning metrics."""
    from rich.table import Table

    from stagewise.tracking import print0, show0

    labels = ["base"] + [f"stage {i + 1} ({'+'.join(s.domains)})" for i, s in enumerate(cfg.stages)]
    for title, table_rows in (("accuracy matrix R (greedy, held-out)", rows),
                              ("held-out loss L (assistant tokens, mean NLL)", losses or [])):
        if not any(x is not None for row in table_rows if row for x in row):
            continue
        t = Table(title=title)
        t.add_column("after")
        for n in names:
            t.add_column(n, justify="right")
        for lab, row in zip([labels[k] for k in present], table_rows):
            t.add_row(lab, *("-" if x is None else f"{x:.3f}" for x in (row or [None] * len(names))))
        show0(t)
    if metrics:
        print0("  ".join(f"{k} {v:+.3f}" if v is not None else f"{k} n/a" for k, v in metrics.items()))

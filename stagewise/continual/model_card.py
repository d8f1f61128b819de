"""Model cards: a README.md in every model directory a run exports (each stage's ``model/`` and
``final_model/``), in the Hugging Face format, so that a copied or pushed model says what it is.

    write_model_card(out / "final_model", cfg, state, domain_names, stages_done=len(cfg.stages))  # main only

The front matter is huggingface_hub's ``ModelCardData``: ``base_model`` (the Hub id a bundled model
was made from, else ``model.name_or_path`` as given), ``library_name: transformers`` (the Hub then
shows the transformers loading snippet) and ``tags`` (stagewise, the stage kinds, continual-learning).
The body: the curriculum, the matrices and continual-learning metrics as far as the run has got, the
resolved config and the versions of the libraries that trained it.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from stagewise.config import RunConfig
from stagewise.machine import package_version
from stagewise.models import BUNDLED_ORIGINS
from stagewise.training.stage import stage_name

LIBRARIES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "stagewise")


def base_model(name_or_path: str) -> str:
    """What the card names as the base model: a bundled model's Hub id, else the name or path as given."""
    return BUNDLED_ORIGINS.get(name_or_path, name_or_path)


def row_labels(cfg: RunConfig) -> list[str]:
    """The matrices' row labels: row 0 is the base model, row i the model after stage i."""
    return ["base"] + [f"after {i + 1}: {'+'.join(s.domains)}" for i, s in enumerate(cfg.stages)]


def matrix_table(names: list[str], rows: list[tuple[str, list | None]]) -> list[str]:
    """A Markdown table, one column per domain; a cell is "-" where it is None (or NaN)."""
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines = ["| after | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    return lines + [f"| {label} | " + " | ".join(fmt(x) for x in (row or [None] * len(names))) + " |"
                    for label, row in rows]


def model_card(cfg: RunConfig, state: dict, names: list[str], *, stages_done: int):
    """The card of the model after ``stages_done`` stages. state: the curriculum's (curriculum.json)."""
    from huggingface_hub import ModelCard, ModelCardData

    n = len(cfg.stages)
    base = base_model(cfg.model.name_or_path)
    kinds = list(dict.fromkeys(s.kind for s in cfg.stages[:stages_done]))
    data = ModelCardData(base_model=base, library_name="transformers",
                         tags=["stagewise", *kinds, "continual-learning"])
    final = stages_done == n
    md = [f"# {cfg.name}" + ("" if final else f" (after stage {stages_done} of {n})"), "",
          f"A causal language model post-trained from `{base}` by "
          f"stagewise (continual post-training): a curriculum of {n} stage(s), each starting from "
          f"the previous stage's weights, with every domain evaluated before the first stage and after each "
          f"one. " + ("This is the run's final model." if final else
                      f"This is the model after stage {stages_done} (`{_stage_dir(cfg, stages_done - 1)}/model`)."),
          "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
          'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
          'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```", "",
          "## Curriculum", "", "| stage | kind | domains | steps | in this model |", "|---|---|---|---:|---|"]
    for i, s in enumerate(cfg.stages):
        done = state.get("stage_results", {}).get(str(i + 1), {}).get("steps")
        steps = done if done is not None else cfg.stage_steps(i)
        md.append(f"| {i + 1} | {s.kind} | {', '.join(s.domains)} | {'-' if steps is None else steps} | "
                  f"{'yes' if i < stages_done else 'no'} |")
    present = [k for k in range(stages_done + 1) if str(k) in state.get("rows", {})]
    labels = row_labels(cfg)
    for title, key in (("Held-out accuracy (greedy decoding; rows: after which stage)", "rows"),
                       ("Held-out loss (mean NLL of the answers' tokens, lower is better)", "loss_rows")):
        rows = [(labels[k], state.get(key, {}).get(str(k))) for k in present]
        if any(x is not None for _, row in rows for x in (row or [])):
            md += ["", f"## {title}", "", *matrix_table(names, rows)]
    for title, key in (("Continual-learning metrics", "metrics"), ("Held-out loss metrics", "loss_metrics")):
        metrics = state.get(key) if final else None  # defined over the whole curriculum
        if metrics:
            md += ["", f"## {title}", "", "| metric | value |", "|---|---:|"]
            md += [f"| {k} | {'n/a' if v is None else f'{v:+.3f}'} |" for k, v in metrics.items()]
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json", exclude={"ablations"}), sort_keys=False)  # as config.yaml
    md += ["", "## Training config (resolved)", "", "```yaml", config_yaml.rstrip(), "```",
           "", "## Libraries", "", "| package | version |", "|---|---|"]
    md += [f"| {name} | {package_version(name)} |" for name in LIBRARIES]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(md) + "\n")


def write_model_card(model_dir: str | Path, cfg: RunConfig, state: dict, names: list[str], *,
                     stages_done: int) -> Path:
    """Write ``model_dir/README.md`` (the main process only: the directory is shared)."""
    path = Path(model_dir) / "README.md"
    model_card(cfg, state, names, stages_done=stages_done).save(path)
    return path


def _stage_dir(cfg: RunConfig, i: int) -> str:
    return f"stage-{i + 1}-{stage_name(cfg, i)}"  # as curriculum.stage_dir names it

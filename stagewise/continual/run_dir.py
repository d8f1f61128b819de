"""A run's output directory: what makes it a run, what a resume may not change, and the curriculum's
state file (the accuracy-matrix rows so far).

    check_output_dir(out, resume=False, overwrite=False)     # refuse to clobber anything by accident
    saved = check_resume_config(out, cfg, force=False)       # a resume continues the same run
    state = load_state(out, saved, names); save_state(out, state)  # curriculum.json, written atomically
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from stagewise.config import RunConfig
from stagewise.errors import StagewiseError
from stagewise.tracking import print0

STATE = "curriculum.json"


def load_state(out: Path, saved_domains: list[str] | None = None, domains: list[str] | None = None) -> dict:
    """The run's state; its matrices' rows (one value per domain, in the config's order) moved to the
    columns of ``domains`` where the run was saved with other ``saved_domains`` (a --force resume
    that drops, adds or reorders domains: a dropped domain's values leave, a new one's are empty)."""
    p = out / STATE
    state = json.loads(p.read_text()) if p.is_file() else {"rows": {}, "stage_results": {}}
    state.setdefault("loss_rows", {})
    if saved_domains is not None and domains is not None and saved_domains != domains:
        where = {name: j for j, name in enumerate(saved_domains)}
        for key in ("rows", "loss_rows"):
            state[key] = {k: [row[where[n]] if n in where and where[n] < len(row) else None for n in domains]
                          for k, row in state[key].items()}
    return state


def save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, out / STATE)


RUN_MARKER = ".stagewise-run"
# what a resumed run must share with the run it continues: otherwise the checkpoints and the data
# position mean something else (other weights, other prompts, another batch). Logging, evaluation,
# checkpointing and optimizer settings may change.
RESUME_MUST_MATCH = re.compile(
    r"^(seed|model\..*|domains\..*|data\..*|stages\.\d+\.(name|kind|domains|steps|epochs|replay|tasks_per_domain)(\..*)?"
    r"|(stages\.\d+\.)?(rollout\.(prompts_per_step|num_generations)|sft\.(batch_size|max_seq_len|packing)))$")


def _flatten(x, prefix: str = "") -> dict:
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        return {k: v for i, val in enumerate(x) for k, v in _flatten(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: x}


def resume_differences(saved: dict, new: dict) -> list[str]:
    """The keys that a resume may not change, where the saved config.yaml and the new config differ."""
    a, b = _flatten(saved), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if RESUME_MUST_MATCH.match(k))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys if a.get(k) != b.get(k)]


def check_resume_config(out: Path, cfg: RunConfig, force: bool) -> list[str] | None:
    """Refuse a resume whose config changed what must not change mid-run (unless ``force``); the saved
    run's domain names (the columns of its matrices' rows), None where no config was saved."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return None
    import yaml

    saved = yaml.safe_load(saved_path.read_text()) or {}
    new = cfg.model_dump(mode="json", exclude={"ablations"})
    diffs = resume_differences({k: v for k, v in saved.items() if k != "ablations"}, new)
    if diffs and not force:
        raise StagewiseError(f"--resume: the config differs from the run's {saved_path} in {len(diffs)} key(s) that "
                             f"must not change mid-run: {'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''} "
                             f"(add --force to resume anyway)")
    if diffs:
        print0(f"[stagewise] warning: --force: resuming with changed {', '.join(d.split(':')[0] for d in diffs)}")
    return [d["name"] for d in saved.get("domains", [])]


def holds_run(out: Path) -> bool:
    """Whether ``out`` is a stagewise output directory (only those may be resumed or overwritten)."""
    return (out / RUN_MARKER).is_file() or (out / STATE).is_file()


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run by accident, and to delete a directory that is not a run at all."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not holds_run(out):
        what = "--overwrite refuses to delete it" if overwrite else ("there is no run to resume" if resume else
                                                                    "refusing to write into it")
        raise StagewiseError(f"{out} exists and does not hold a stagewise run (no {RUN_MARKER}); {what}: "
                             f"set output_dir to a new or empty directory")
    if not resume and not overwrite:
        raise StagewiseError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                             f"start again, or set output_dir")

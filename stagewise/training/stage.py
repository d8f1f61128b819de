"""What a stage kind is given (``StageJob``), what it is (``StageKind``) and what it returns
(``StageResult``). Stage kinds are chosen by name from a registry (``stages[i].kind``), so the
curriculum never calls GRPO or SFT by name:

    register("stage", "grpo")(StageKind(train=train_grpo_stage, check=check_grpo_stage))

``check(cfg, i, world)`` raises ConfigError for stage i before any model loads; ``train(job)`` trains
one stage on the stage scaffold (``training/run.py``: its own Accelerator on the run's process group,
resume, checkpoints, export) and returns a ``StageResult``; the next stage starts from its model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stagewise.checkpoint import Counters
from stagewise.config import RunConfig
from stagewise.domains.base import Domain


@dataclass
class StageJob:
    cfg: RunConfig
    index: int  # stage number, 0-based
    tokenizer: object
    domains: list[Domain]  # this stage's domains
    replay_domains: list[Domain]  # earlier stages' domains (replay), may be empty
    init_path: str  # weights to start from (HF dir): base model or previous stage's export
    ref_path: str | None  # reference weights for a KL term (None when there is none)
    out_dir: Path  # stage directory: checkpoints/, model/
    tracker: object
    run_dir: Path = Path(".")  # the run's output_dir
    counters: Counters = field(default_factory=Counters)
    resume: bool = False
    stop_after: int | None = None  # stop (after checkpointing) once counters.step reaches this
    global_step_offset: int = 0
    curve: list[float] = field(default_factory=list)  # the stage's main training signal per step
    domains_by_name: dict = field(default_factory=dict)  # every domain of the run (a stage's extra data: rft.demos)

    @property
    def stage(self):
        """This stage's StageConfig."""
        return self.cfg.stages[self.index]

    @property
    def name(self) -> str:
        """The stage's name: its ``name``, else its domains joined by '+'."""
        return stage_name(self.cfg, self.index)

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.name})"

    def part(self, name: str):
        """This stage's effective config part ("rollout", "grpo", "sft", "optim"): run-level, then the stage's own."""
        return self.cfg.stage_part(self.index, name)


def stage_name(cfg: RunConfig, i: int) -> str:
    st = cfg.stages[i]
    return st.name or "+".join(st.domains)


@dataclass(frozen=True)
class StageResult:
    stopped: bool  # ended early (--stop-after or a signal), after a checkpoint; no model exported
    step: int  # optimizer steps done in the stage
    steps: int  # the stage's total steps
    model: str | None = None  # the exported HF directory (None when stopped)


@dataclass(frozen=True)
class StageKind:
    train: Callable[[StageJob], StageResult]
    check: Callable[[RunConfig, int, int], None]
    needs_reward: bool = True  # every domain of the stage must define a reward (GRPO learns from it)
    # (cfg, i, domains by name): what the kind needs of stage i's built domains; raises ConfigError
    check_domains: Callable[[RunConfig, int, dict], None] | None = None

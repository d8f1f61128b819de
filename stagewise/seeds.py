"""Every seed and seeded RNG of a run, derived here and nowhere else.

    rng = prompt_rng(cfg.seed, stage=0, step=3)            # the order of step 3's prompts in stage 1
    seeds = completion_seeds(cfg.seed, 0, 3, first_row=16, count=16)

Determinism is how stagewise tests itself: the prompts of a step are a pure function of
(seed, stage, step), every completion has its own seed keyed by its global row, and an episode's
turn t samples with ``turn_seed(seed_of_episode, t)``. Neither the process count nor the batch
composition nor a resume then changes what is sampled. Each function below names one use; the
formulas are fixed (changing one changes every recorded run).
"""

from __future__ import annotations

import random

_MOD = 2**61
# the 64-bit golden-ratio constant (Fibonacci hashing): consecutive turns get far-apart seeds
_GOLDEN = 0x9E3779B97F4A7C15


def prompt_rng(seed: int, stage: int, step: int) -> random.Random:
    """The order of the prompts of GRPO / RFT step ``step`` of stage ``stage`` (0-based), on every process."""
    return random.Random(f"{seed}:{stage}:{step}")


def task_order_rng(seed: int, stage: int, domain: str, epoch: int) -> random.Random:
    """The order in which stage ``stage`` draws domain ``domain``'s training tasks in its epoch ``epoch``."""
    return random.Random(f"{seed}:{stage}:{domain}:tasks{epoch}")


def completion_seeds(seed: int, stage: int, step: int, first_row: int, count: int) -> list[int]:
    """One sampling seed per completion of a GRPO step, keyed by its global row (rows first_row ..
    first_row + count - 1): the same whichever process samples it."""
    base = (seed * 1_000_003 + stage * 65_537 + step * 8_191) % _MOD
    return [(base * 31 + first_row + i) % _MOD for i in range(count)]


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of turn ``turn`` of an episode whose seed is ``seed`` (turn 0: the episode's own)."""
    return (seed + turn * _GOLDEN) % _MOD


def evaluation_seed(seed: int, task_index: int, trial: int) -> int:
    """The seed of trial ``trial`` of held-out task ``task_index`` (its place in the domain's eval split)."""
    return (seed * 1_000_003 + task_index * 7_919 + trial) % _MOD


def epoch_rng(seed: int, stage: int, epoch: int) -> random.Random:
    """The shuffle of an SFT stage's examples in epoch ``epoch``."""
    return random.Random(f"{seed}:{stage}:epoch{epoch}")


def replay_rng(seed: int, stage: int) -> random.Random:
    """Which earlier-stage examples an SFT stage replays."""
    return random.Random(f"{seed}:{stage}:replay")


def split_rng(domain: str, seed: int) -> random.Random:
    """The train / held-out split of a domain."""
    return random.Random(f"{domain}:{seed}")


def user_reply_seeds(seed: int, calls_so_far: int, count: int) -> list[int]:
    """Seeds of a sampling user simulator's next ``count`` replies (after ``calls_so_far`` replies)."""
    return [seed + calls_so_far + k + 1 for k in range(count)]

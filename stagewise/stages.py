"""Importing this module registers every stage kind (``stages[i].kind``): grpo (rl/grpo.py) and
sft (sft/sft.py)."""

from stagewise.rl import grpo  # noqa: F401
from stagewise.sft import sft  # noqa: F401

"""Deliberate faults, switched on by an environment variable, so that the handling of real faults
can be tested end to end (and checked by users on their own cluster):

    STAGEWISE_FAULTS="nan_loss@step=2"                 every rank, stage step 2
    STAGEWISE_FAULTS="raise@rank=1,step=2"             rank 1 raises at the start of step 2
    STAGEWISE_FAULTS="inf_grad@stage=2,step=1-3;raise@rank=0,step=4"

A fault is ``kind@key=value,...``; several are separated by ``;``. Keys: ``stage`` (1-based),
``step`` (the stage step being computed, 1-based; ``a-b`` is a range), ``rank``, ``micro`` (the
micro-batch size being probed). A missing key matches everything. Kinds:

    raise      raise InjectedFault at the start of the step (an error on one rank)
    stall      hang at the start of the step (a rank stuck on a file system or a driver): its peers
               must give up after ``dist.timeout_s`` instead of waiting forever
    nan_loss   the training loss of the step is NaN (every micro-batch of that rank)
    inf_grad   the loss stays finite but its gradient is infinite (a hook on the log-probs)
    oom        the automatic micro-batch probe runs out of memory (STAGEWISE_FAULTS="oom@micro=9-64")
    disk_full  writing the checkpoint of that step fails with ENOSPC on the main process
    kill       SIGKILL this process at a named point (``at=``): ckpt_state (the checkpoint's files are
               written, its manifest is not), ckpt_manifest (complete but not yet renamed),
               ckpt_renamed (before old ones are pruned), export (the stage's model half-written),
               eval (evaluation between stages); the kill tests use them to land inside writes

Unset (the normal case), every check is one dictionary lookup.
"""

from __future__ import annotations

import os
from functools import lru_cache

ENV = "STAGEWISE_FAULTS"
KINDS = ("raise", "stall", "nan_loss", "inf_grad", "oom", "disk_full", "kill")
KEYS = ("stage", "step", "rank", "micro", "at")


class InjectedFault(RuntimeError):
    """Raised by the ``raise`` fault."""


def _matches(value: str, actual: int | str) -> bool:
    if isinstance(actual, str):
        return value == actual
    if "-" in value:
        lo, hi = value.split("-", 1)
        return int(lo) <= actual <= int(hi)
    return int(value) == actual


@lru_cache(maxsize=8)
def _parse(spec: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, rest = item.partition("@")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r} (known: {', '.join(KINDS)})")
        keys = tuple(tuple(kv.split("=", 1)) for kv in filter(None, rest.split(",")))
        for k in keys:
            if len(k) != 2 or k[0] not in KEYS:
                raise ValueError(f"{ENV}: bad condition {'='.join(k)!r} in {item!r} (use {'=, '.join(KEYS)}=)")
        faults.append((kind, keys))
    return tuple(faults)


def active(kind: str, **where: int) -> bool:
    """True when the fault ``kind`` is requested here (stage=, step=, rank=, micro=); a condition on
    a key the caller does not give never matches."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    return any(k == kind and all(key in where and _matches(v, where[key]) for key, v in conds)
               for k, conds in _parse(spec))


def maybe_kill(at: str, **where: int) -> None:
    """SIGKILL this process here when ``kill@at=<at>,...`` is requested (no cleanup can run)."""
    if active("kill", at=at, **where):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def maybe_raise(*, stage: int, step: int, rank: int) -> None:
    if active("stall", stage=stage, step=step, rank=rank):
        import time

        while True:  # signals are handled between sleeps (and ignored: a stuck rank does not react)
            time.sleep(3600)
    if active("raise", stage=stage, step=step, rank=rank):
        raise InjectedFault(f"injected fault on rank {rank} at stage {stage} step {step} ({ENV})")


def maybe_oom(**where: int) -> None:
    if active("oom", **where):
        import torch

        # worded as torch's own allocator errors, so it is handled exactly like a real one
        raise torch.OutOfMemoryError(f"simulated: out of memory. ({ENV}, {where})")

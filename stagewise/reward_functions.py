"""Reward functions in TRL's form: batched, ``f(prompts, completions, completion_ids, **kwargs) -> list``.

    domains:
      - name: gsm
        type: jsonl
        args: {path: data/gsm.jsonl}
        rewards:
          - {fn: "my_pkg.rewards:accuracy", weight: 1.0}    # a GRPOTrainer reward function, unchanged
          - {name: concise, weight: 0.2}                    # a registered per-sample reward (rewards.py)

A function gets what TRL's ``GRPOTrainer._calculate_rewards`` passes, as keywords: ``prompts`` (the
record's prompt: a string, or chat messages for a conversational domain), ``completions`` (strings,
or ``[{"role": "assistant", "content": ...}]`` when the prompt is messages; an environment
episode's messages after its opening), ``completion_ids`` (token ids after the prompt), one list per
record field but ``prompt`` (``answer``, ``options``, ...: TRL's dataset columns; a field some
records lack is None in theirs), ``trainer_state`` (a ``transformers.TrainerState``: ``global_step``
= the stage's steps done, ``max_steps`` = its steps; None at held-out evaluation), ``log_extra``
(columns for rollouts.jsonl), ``log_metric`` (scalars averaged into the step's metrics) and, for an
environment domain, ``environments`` (one per completion). It returns one float per completion, or
None where it does not apply (NaN: left out of the weighted sum, as TRL's nansum). Async functions
are awaited together (``asyncio.gather``) on one event loop that lives as long as the process, as
TRL's does. A function that raises or returns the wrong number of values stops the run with one
line naming it (``RewardError``).

Registered per-sample rewards (``(completion_text, example) -> float``) are adapted to this form
(``per_sample``), so every reward takes one path.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from stagewise.errors import ConfigError, RewardError

# record fields TRL does not pass as columns (the prompt goes as ``prompts``); fields starting
# with "_" are stagewise's own (a chat record's ``_record``)
NOT_COLUMNS = ("prompt", "completion", "completion_ids")


def load(path: str, where: str) -> Callable:
    """``"package.module:function"`` -> the function; a ConfigError naming ``where`` otherwise."""
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001  (importing the user's module may raise anything: their error)
        raise ConfigError(f"{where}: cannot load reward function {path!r} ({type(e).__name__}: {e})") from None
    if not callable(obj):
        raise ConfigError(f"{where}: {path!r} is a {type(obj).__name__}, not a function")
    return obj


def function_name(fn: Callable) -> str:
    """The name a function is logged under, as TRL names it: partials unwrapped, else ``__name__``,
    else the class name (a callable instance)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def per_sample(fn: Callable[[str, dict], float]) -> Callable:
    """A registered ``(completion_text, example) -> float`` as a batched function in TRL's form: the
    example is rebuilt from the columns (and the prompt), the text from a message completion."""

    @functools.wraps(fn)
    def batched(prompts, completions, completion_ids, trainer_state=None, log_extra=None, log_metric=None,
                environments=None, **columns):
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            out.append(fn(text, {"prompt": prompt, **{k: v[i] for k, v in columns.items()}}))
        return out

    batched.per_sample = True  # never logs: the loops skip gathering log_metric for such domains
    return batched


def is_async(fn: Callable) -> bool:
    """An ``async def`` function (or partial of one), or an instance whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


@dataclass
class RewardContext:
    """What a stage passes every reward function besides the batch (TRL: the trainer's state and its
    metric logger)."""

    trainer_state: Any = None  # transformers.TrainerState; None at held-out evaluation
    log_metric: Callable[[str, float], None] | None = None


@dataclass
class RewardBatch:
    """One domain's completions, scored together (rows in the order of the rollout)."""

    prompts: list  # str, or chat messages
    completions: list  # str, or chat messages (see the module docstring)
    completion_ids: list[list[int]]
    examples: list[dict]  # the domain's records (tasks)
    environments: list | None = None  # an environment domain's episodes' environments
    extra: list[dict] = field(init=False)  # log_extra's columns, per row

    def __post_init__(self):
        self.extra = [{} for _ in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def log_extra(self, column: str, values: list) -> None:
        for row, value in zip(self.extra, values):
            row[column] = value

    def kwargs(self, context: RewardContext) -> dict:
        """The keywords TRL's GRPOTrainer passes a reward function."""
        keys = dict.fromkeys(k for ex in self.examples for k in ex if k not in NOT_COLUMNS and not k.startswith("_"))
        kw = {k: [ex.get(k) for ex in self.examples] for k in keys}
        kw.update(prompts=self.prompts, completions=self.completions, completion_ids=self.completion_ids,
                  trainer_state=context.trainer_state, log_extra=self.log_extra,
                  log_metric=context.log_metric or (lambda name, value: None))
        if self.environments is not None:
            kw["environments"] = self.environments
        return kw


def call_all(functions: list[tuple[str, Callable]], batch: RewardBatch, context: RewardContext,
             where: str) -> dict[str, list[float]]:
    """Each function's rewards for the batch, NaN where it returned None: sync functions in order,
    then the async ones together. Raises RewardError naming the function that failed."""
    kw = batch.kwargs(context)
    out: dict[str, list[float]] = {}
    waiting = []
    for name, fn in functions:
        if is_async(fn):
            waiting.append((name, fn))
            continue
        try:
            values = fn(**kw)
            if inspect.isawaitable(values):  # e.g. a sync wrapper around a coroutine
                values = run_async(values)
        except Exception as e:  # noqa: BLE001  (the user's function: its error, named, stops the run)
            raise RewardError(failed(name, where, e)) from e
        out[name] = checked(name, values, len(batch), where)
    if waiting:
        async def one(fn):
            try:
                return await fn(**kw)
            except Exception as e:  # noqa: BLE001  (reported below, by name)
                return e

        async def together():
            return await asyncio.gather(*(one(fn) for _, fn in waiting))

        for (name, _), values in zip(waiting, run_async(together())):
            if isinstance(values, Exception):
                raise RewardError(failed(name, where, values)) from values
            out[name] = checked(name, values, len(batch), where)
    return {name: out[name] for name, _ in functions}


def failed(name: str, where: str, e: Exception) -> str:
    return f"reward function {name} ({where}) raised {type(e).__name__}: {' '.join(str(e).split())}"


def checked(name: str, values, n: int, where: str) -> list[float]:
    """A function's return value as n floats (None -> NaN), or a RewardError that says what was wrong."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward function {name} ({where}) returned a {type(values).__name__}, not a list of "
                          f"{n} floats (or None)")
    if len(values) != n:
        raise RewardError(f"reward function {name} ({where}) returned {len(values)} values for {n} completions")
    out = []
    for v in values:
        try:
            out.append(math.nan if v is None else float(v))
        except (TypeError, ValueError):
            raise RewardError(f"reward function {name} ({where}) returned {v!r} (a {type(v).__name__}), not a "
                              f"float or None") from None
    return out


def combine(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values (B, F): each function's reward per completion, NaN where it does not apply; weights (F,)
    -> (rewards (B,): the weighted sum over the functions that apply, TRL's nansum; unscorable (B,)
    bool: no function applies, reward 0 — TRL warns about such rows)."""
    rewards = (values * weights[None, :]).nansum(dim=1)
    unscorable = torch.isnan(values).all(dim=1) if values.size(1) else torch.zeros(values.size(0), dtype=torch.bool)
    return rewards, unscorable


# --- async functions: one event loop for the process, in a daemon thread ----------------------------
# (TRL's: clients an async function keeps between calls, an HTTP session say, stay bound to a live loop)
_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def run_async(awaitable):
    """Run a coroutine on the reward loop and wait for its result (callable from any thread)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="stagewise-rewards", daemon=True).start()

    async def wrap():
        return await awaitable

    return asyncio.run_coroutine_threadsafe(wrap(), _LOOP).result()


# --- what a stage passes besides the batch ------------------------------------------------------


def trainer_state(max_steps: int, *, is_main: bool, is_local_main: bool):
    """The ``trainer_state`` a stage passes (its ``global_step`` is set every step): a real
    ``transformers.TrainerState``, so curriculum rewards written for TRL read it unchanged."""
    from transformers import TrainerState

    return TrainerState(global_step=0, max_steps=max_steps, is_world_process_zero=is_main,
                        is_local_process_zero=is_local_main)


class MetricLog:
    """``log_metric(name, value)``: the values of one step, averaged over the step and every process
    (``flush``), as TRL averages them over a logging step."""

    def __init__(self):
        self.values: dict[str, tuple[float, int]] = {}

    def __call__(self, name: str, value: float) -> None:
        total, count = self.values.get(name, (0.0, 0))
        self.values[name] = (total + float(value), count + 1)

    def flush(self, gather: Callable[[list], list]) -> dict[str, float]:
        """gather: every process's list, concatenated (collective: every rank calls it every step,
        whichever names it logged)."""
        sums: dict[str, list[float]] = {}
        for part in gather([self.values]):
            for name, (total, count) in part.items():
                s = sums.setdefault(name, [0.0, 0])
                s[0], s[1] = s[0] + total, s[1] + count
        self.values = {}
        return {name: total / count for name, (total, count) in sorted(sums.items()) if count}


def may_log(functions) -> bool:
    """Whether any of the functions can call log_metric (an adapted per-sample reward never does)."""
    return any(not getattr(fn, "per_sample", False) for fn in functions)

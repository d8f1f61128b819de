"""The one place that turns ``dist`` settings into an Accelerator.

    acc = build_accelerator(cfg.dist, grad_accum=4, micro_batch=8, max_grad_norm=1.0,
                            hidden_size=576, output_dir="runs/x")

single  one process (CPU or one GPU)          ddp   DistributedDataParallel (gloo on CPU)
zero1/2/3  DeepSpeed through accelerate       fsdp  FSDP2 ``fully_shard`` (parallel/fsdp.py)

On CPU, DeepSpeed runs on gloo: ``PartialState(backend="gloo")`` must exist before the
Accelerator. A ZeRO or FSDP strategy started without a launcher becomes a 1-process run.

Every run ends with ``end_run`` on every rank, whatever happened (see its docstring).
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import torch

from stagewise.config import DistConfig
from stagewise.errors import ConfigError
from stagewise.parallel import deepspeed_config as dsc
from stagewise.parallel import watchdog
from stagewise.parallel.collectives import barrier

# DeepSpeed 0.19 still calls the tensor collectives torch 2.13 deprecates: one warning per call.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def on_cpu(dist: DistConfig) -> bool:
    return dist.cpu if dist.cpu is not None else not torch.cuda.is_available()


def optimizer_offloaded_from_gpu(dist: DistConfig) -> bool:
    """ZeRO-Offload from GPUs: the optimizer step runs on the host (optim.make_adamw picks its Adam)."""
    return dist.offload != "none" and not on_cpu(dist)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_saved_env: dict[str, str | None] = {}  # variables a run changed, put back by end_run


def set_env(key: str, value: str | None) -> None:
    """Change an environment variable for the duration of the run (end_run restores it), so a later
    run in the same Python process, or a launcher it starts, never inherits it."""
    _saved_env.setdefault(key, os.environ.get(key))
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _ensure_process_group_env() -> None:
    """DeepSpeed and FSDP need torch.distributed even for one process: fake a 1-process launcher
    (a fresh port each run)."""
    if "LOCAL_RANK" in os.environ:  # started by a real launcher
        return
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        set_env(k, v)


def _restore_env() -> None:
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved_env.clear()


def one_process_launch_warning() -> str | None:
    """`accelerate launch --num_processes N` without --multi_gpu (or a profile) on a machine without
    GPUs starts ONE process (accelerate's choice); it sets MASTER_ADDR for N > 1 but no WORLD_SIZE."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        return ("warning: `accelerate launch` started 1 process although several were asked for: without "
                "--multi_gpu (or a launch profile such as accelerate_configs/multi_gpu_ddp.yaml) accelerate runs "
                "one process on a machine without GPUs. Use `stagewise launch --strategy ddp --num-processes N`, or "
                "add --multi_gpu / --config_file.")
    return None


def resolve_strategy(dist: DistConfig, world_size: int) -> tuple[DistConfig, str | None]:
    """Let a launch profile decide: `accelerate launch --config_file deepspeed_zero3.yaml` runs
    ZeRO-3 even if the run config says `single`. Returns (dist, note or None)."""
    env = os.environ
    upd: dict = {}
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not dist.strategy.startswith("zero"):
        upd["strategy"] = f"zero{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
        opt_dev = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
        par_dev = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
        if par_dev not in ("none", "") and upd["strategy"] == "zero3":
            upd.update(offload="optimizer_and_params", offload_device=par_dev)
        elif opt_dev not in ("none", ""):
            upd.update(offload="optimizer", offload_device=opt_dev)
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and dist.strategy != "fsdp":
        upd["strategy"] = "fsdp"
    elif world_size > 1 and dist.strategy == "single":
        upd["strategy"] = "ddp"
    if not upd:
        return dist, None
    new = DistConfig.model_validate({**dist.model_dump(), **upd})
    return new, f"dist.strategy={dist.strategy} -> {new.strategy} (from the launcher)"


def resolve_precision(dist: DistConfig) -> tuple[DistConfig, str | None]:
    """``dist.mixed_precision: auto`` -> what this machine computes fast (``machine.auto_precision``):
    bf16 on a GPU that has it (else fp16; FSDP: fp32) and on a CPU with AMX / AVX-512 BF16, fp32 on
    other CPUs (PyTorch emulates bf16 there: 70x slower than fp32 on an AVX2 EPYC). An explicit bf16
    on such a CPU is kept, with a note. Returns (dist, note or None)."""
    from stagewise.machine import auto_precision, cpu_flags, cpu_has_bf16

    cpu = on_cpu(dist)
    if dist.mixed_precision == "bf16" and cpu and not cpu_has_bf16(cpu_flags()):
        return dist, ("dist.mixed_precision=bf16 on a CPU without AMX / AVX-512 BF16: bf16 is emulated here, "
                      "far slower than fp32 (dist.mixed_precision: auto or no runs fp32)")
    if dist.mixed_precision != "auto":
        return dist, None
    new, why = auto_precision(not cpu, dist.strategy)
    return dist.model_copy(update={"mixed_precision": new}), f"dist.mixed_precision=auto -> {new} ({why})"


def frozen_dtype(dist: DistConfig) -> torch.dtype:
    """The dtype of a model loaded only to generate or score (evaluation, the KL reference, a demos
    agent): bf16 where ``dist.mixed_precision`` resolves to it (a GPU, a CPU with AMX / AVX-512 BF16),
    else fp32 (fp16 runs keep fp32 weights and compute under autocast)."""
    return torch.bfloat16 if resolve_precision(dist)[0].mixed_precision == "bf16" else torch.float32


def check(dist: DistConfig, world_size: int) -> None:
    cpu = on_cpu(dist)
    if dist.mixed_precision == "fp16" and cpu:
        raise ConfigError("dist.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    check_deepspeed_json(dist, world_size)


def check_deepspeed_json(dist: DistConfig, world_size: int, micro_batch: int | None = None,
                         grad_accum: int | None = None) -> None:
    """A user DeepSpeed JSON: readable and consistent with the run, before any output is written. The
    batch numbers are checked when the stage's shapes are given (micro_batch, grad_accum)."""
    if not (dist.deepspeed_config and dist.strategy.startswith("zero")):
        return
    expected = dsc.make_deepspeed_config(dist, micro_batch=micro_batch or 1, grad_accum=grad_accum or 1,
                                         world_size=world_size, max_grad_norm=1.0, hidden_size=64,
                                         on_gpu=not on_cpu(dist))
    dsc.check_user_config(dsc.load_user_config(dist.deepspeed_config), expected, dist.deepspeed_config,
                          check_batch=micro_batch is not None)


def start_run(dist: DistConfig):
    """The run's process group (once per run, kept across stages), with ``dist.timeout_s`` as the
    collective timeout. Returns accelerate's PartialState: device, process_index, num_processes."""
    from datetime import timedelta

    from accelerate.state import AcceleratorState, GradientState, PartialState

    # A process may run several configs (tests, notebooks, sweeps): start from a clean state
    # (end_run has left the previous run's process group).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cpu = on_cpu(dist)
    check(dist, world_size_from_env())
    if "LOCAL_RANK" in os.environ and world_size_from_env() > 1:
        watchdog.exit_with_launcher()
    timeout = timedelta(seconds=dist.timeout_s)
    if dist.strategy.startswith("zero") or dist.strategy == "fsdp":
        _ensure_process_group_env()
    if dist.strategy == "fsdp":
        # we shard with fully_shard ourselves (parallel/fsdp.py): keep accelerate's own FSDP plugin
        # off, or on GPU it would wrap the model a second time
        set_env("ACCELERATE_USE_FSDP", None)
    if dist.strategy.startswith("zero"):
        set_env("ACCELERATE_USE_DEEPSPEED", "true")
        return PartialState(backend="gloo", timeout=timeout) if cpu else PartialState(timeout=timeout)
    return PartialState(cpu=cpu, timeout=timeout)


_end_hooks: list = []  # called by end_run before the process group is left (e.g. vLLM's shutdown)


def on_end(fn) -> None:
    """Call ``fn()`` when this run ends, on this rank, before it leaves the process group."""
    _end_hooks.append(fn)


def deepspeed_json(dist: DistConfig, *, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float,
                   hidden_size: int) -> dict:
    """The stage's DeepSpeed JSON: ours for this device, or the user's checked against it."""
    expected = dsc.make_deepspeed_config(dist, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size,
                                         max_grad_norm=max_grad_norm, hidden_size=hidden_size,
                                         on_gpu=not on_cpu(dist))
    if dist.deepspeed_config:
        return dsc.check_user_config(dsc.load_user_config(dist.deepspeed_config), expected, dist.deepspeed_config)
    return expected


def build_accelerator(dist: DistConfig, *, grad_accum: int, micro_batch: int, max_grad_norm: float,
                      hidden_size: int, output_dir: str, stage_dir: str | None = None):
    """One Accelerator per stage (each stage may have its own batch shape), on the run's process
    group. Under ZeRO the stage's DeepSpeed JSON is written to output_dir/deepspeed_config/ (the
    latest stage's) and to the stage directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DeepSpeedPlugin, ProjectConfiguration

    AcceleratorState._reset_state()  # the previous stage's accelerator settings; not the process group
    GradientState._reset_state()
    dist = resolve_precision(dist)[0]  # the curriculum has resolved auto; a stage built alone (tests) may not
    state = PartialState()
    common = dict(gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False,
                  project_config=ProjectConfiguration(project_dir=output_dir))
    if dist.strategy.startswith("zero"):
        ds = deepspeed_json(dist, micro_batch=micro_batch, grad_accum=grad_accum, world_size=state.num_processes,
                            max_grad_norm=max_grad_norm, hidden_size=hidden_size)
        if state.is_main_process:
            dsc.write_config(ds, Path(output_dir) / "deepspeed_config", dist.strategy)
            if stage_dir is not None:
                dsc.write_config(ds, stage_dir, dist.strategy)
        # A launch profile's DeepSpeed fields were read by resolve_strategy (stage, offload); the
        # JSON above is complete, so tell accelerate not to expect them from the profile.
        set_env("ACCELERATE_CONFIG_DS_FIELDS", None)
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
        return Accelerator(deepspeed_plugin=plugin, mixed_precision=dist.mixed_precision, **common)
    kwargs = [ddp_kwargs()]
    return Accelerator(cpu=on_cpu(dist), mixed_precision=dist.mixed_precision, kwargs_handlers=kwargs, **common)


def ddp_kwargs():
    """DDP's settings: gradients live in DDP's communication buckets (no second copy of every
    gradient: 4 bytes per parameter, 16 GB for a 4B model in fp32)."""
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(find_unused_parameters=False, gradient_as_bucket_view=True)


def end_run(tracker, ok: bool) -> None:
    """The end of every run, on every rank, whatever happened.

    Rank 0 finishes the trackers (a failed status when the run raised); if this rank finished its
    work the ranks meet once more, so none leaves while a peer still needs it; then every rank leaves
    the process group. After an error there is no barrier: a rank that failed must not wait for peers
    that may never come (they fail on their next collective, or the launcher stops them). Not
    accelerate's ``end_training()``: it destroys the process group on the rank that owns the trackers
    only, leaving the other ranks failing or hanging at exit.
    """
    import torch.distributed as td
    from accelerate.state import AcceleratorState, GradientState

    try:
        if tracker is not None:
            tracker.close(failed=not ok)
        if ok:
            barrier()
    finally:
        while _end_hooks:
            try:
                _end_hooks.pop()()
            except Exception as e:  # noqa: BLE001  (a failing hook must not keep the rank in the group)
                print(f"[stagewise] at the end of the run: {type(e).__name__}: {e}", flush=True)
        if td.is_available() and td.is_initialized():
            td.destroy_process_group()
        _forget_deepspeed_groups()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        _restore_env()
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the heap freed by this run back to the OS (glibc keeps it otherwise), so that a next run
    in the same process (a sweep) starts from, and measures its peak memory from, a clean slate."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups it makes (a clone of the world group, ...) in module
    globals; they die with the process group, and a later run in the same Python process (tests, a
    sweep) would be handed the dead ones."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


def describe(acc, strategy: str, micro_batch: int, grad_accum: int) -> str:
    eff = micro_batch * grad_accum * acc.num_processes
    return (f"{strategy} x{acc.num_processes} on {acc.device} | precision {acc.mixed_precision} | "
            f"effective batch = micro {micro_batch} x accumulation {grad_accum} x processes {acc.num_processes} "
            f"= {eff}")

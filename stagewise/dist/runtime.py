"""The one place that turns ``dist`` settings into an Accelerator.

    acc = build_accelerator(cfg.dist, grad_accum=4, micro_batch=8, max_grad_norm=1.0,
                            hidden_size=576, output_dir="runs/x")

single  one process (CPU or one GPU)          ddp   DistributedDataParallel (gloo on CPU)
zero1/2/3  DeepSpeed through accelerate       fsdp  FSDP2 (GPU only)

On CPU, DeepSpeed runs on gloo: ``PartialState(backend="gloo")`` must exist before the
Accelerator. A ZeRO strategy started without a launcher becomes a 1-process DeepSpeed run.
"""

from __future__ import annotations

import os
import socket
import warnings

import torch

from stagewise.config import DistConfig
from stagewise.errors import ConfigError
from stagewise.dist import deepspeed_config as dsc


# DeepSpeed 0.19 still calls the tensor collectives torch 2.13 deprecates: one warning per call.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def on_cpu(dist: DistConfig) -> bool:
    return dist.cpu if dist.cpu is not None else not torch.cuda.is_available()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group_env() -> None:
    """DeepSpeed needs torch.distributed even for one process: fake a 1-process launcher."""
    if "LOCAL_RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})


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


def check(dist: DistConfig, world_size: int) -> None:
    cpu = on_cpu(dist)
    if dist.strategy == "fsdp" and cpu:
        raise ConfigError("dist.strategy=fsdp needs a GPU (accelerate has no FSDP on CPU); "
                          "on CPU use ddp or zero1/zero2/zero3")
    if dist.mixed_precision == "fp16" and cpu:
        raise ConfigError("dist.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")


def build_accelerator(dist: DistConfig, *, grad_accum: int, micro_batch: int, max_grad_norm: float,
                      hidden_size: int, output_dir: str, log_with: list[str] | None = None):
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, ProjectConfiguration

    from accelerate.state import AcceleratorState, GradientState

    # A process may run several configs (tests, notebooks): drop the previous run's accelerator
    # settings; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    cpu = on_cpu(dist)
    check(dist, world_size_from_env())
    common = dict(gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False,
                  log_with=log_with, project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=f"{output_dir}/tb"))
    if dist.strategy.startswith("zero"):
        _ensure_process_group_env()
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if cpu:
            PartialState(backend="gloo")
        state = PartialState()
        expected = dsc.make_deepspeed_config(dist, micro_batch=micro_batch, grad_accum=grad_accum,
                                             world_size=state.num_processes, max_grad_norm=max_grad_norm,
                                             hidden_size=hidden_size)
        if dist.deepspeed_config:
            ds = dsc.check_user_config(dsc.load_user_config(dist.deepspeed_config), expected, dist.deepspeed_config)
        else:
            ds = expected
        if state.is_main_process:
            dsc.write_config(ds, output_dir, dist.strategy)
        # A launch profile's DeepSpeed fields were read by resolve_strategy (stage, offload); the
        # JSON above is complete, so tell accelerate not to expect them from the profile.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
        return Accelerator(deepspeed_plugin=plugin, mixed_precision=dist.mixed_precision, **common)
    if dist.strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                auto_wrap_policy="transformer_based_wrap",
                                                state_dict_type="SHARDED_STATE_DICT")
        return Accelerator(fsdp_plugin=plugin, mixed_precision=dist.mixed_precision, **common)
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    return Accelerator(cpu=cpu, mixed_precision=dist.mixed_precision, kwargs_handlers=kwargs, **common)


def describe(acc, micro_batch: int, grad_accum: int) -> str:
    eff = micro_batch * grad_accum * acc.num_processes
    return (f"{acc.distributed_type.value} x{acc.num_processes} on {acc.device} | precision {acc.mixed_precision} | "
            f"effective batch = micro {micro_batch} x accumulation {grad_accum} x processes {acc.num_processes} = {eff}")

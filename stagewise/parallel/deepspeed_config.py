"""DeepSpeed JSON from the run config: every batch number resolved, or a user JSON checked.

    cfg = make_deepspeed_config(dist, micro_batch=8, grad_accum=4, world_size=2,
                                max_grad_norm=1.0, hidden_size=576, on_gpu=True)
    # cfg["train_batch_size"] == 8 * 4 * 2

Bucket sizes follow the DeepSpeed/HF recommendation for a model of hidden size h:
reduce_bucket_size = h*h, stage3_prefetch_bucket_size = 0.9*h*h, param_persistence = 10*h.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.config import DistConfig
from stagewise.errors import ConfigError

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def make_deepspeed_config(dist: DistConfig, *, micro_batch: int, grad_accum: int, world_size: int,
                          max_grad_norm: float, hidden_size: int, on_gpu: bool) -> dict:
    """on_gpu: the run trains on GPUs (NCCL): gradient reduction overlaps the backward and offloaded
    tensors live in pinned host memory; on CPU (gloo) neither helps."""
    stage = STAGES[dist.strategy]
    h2 = hidden_size * hidden_size
    precision = dist.mixed_precision
    if precision == "auto":
        from stagewise.machine import auto_precision

        precision = auto_precision(on_gpu, dist.strategy)[0]
    zero: dict = {"stage": stage, "overlap_comm": on_gpu, "contiguous_gradients": True,
                  "reduce_bucket_size": h2, "allgather_bucket_size": max(h2, 5 * 10**7)}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": int(0.9 * h2),
                     "stage3_param_persistence_threshold": 10 * hidden_size,
                     "stage3_gather_16bit_weights_on_model_save": True})
    if dist.offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = _offload(dist, on_gpu)
    if dist.offload == "optimizer_and_params":
        zero["offload_param"] = _offload(dist, on_gpu)
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        # check_grad_overflow: a step with a non-finite gradient norm is skipped on every rank (the
        # run's bad-step handling relies on it; parallel/strategy.py)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        # we pass the optimizer (optim.make_adamw: DeepSpeed's CPU Adam when the optimizer is
        # offloaded from GPUs, torch's AdamW otherwise); allow it under ZeRO and with CPU offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _offload(dist: DistConfig, on_gpu: bool) -> dict:
    # pinned host memory: asynchronous, full-bandwidth copies to and from the GPU (DeepSpeed's default)
    d = {"device": dist.offload_device, "pin_memory": on_gpu}
    if dist.offload_device == "nvme":
        d["nvme_path"] = dist.nvme_path
    return d


def check_user_config(user: dict, expected: dict, source: str, check_batch: bool = True) -> dict:
    """Check a user JSON against the run; 'auto' values are filled in. Raises ConfigError per disagreement.
    check_batch=False: everything but the batch numbers (checked before the stage's shapes are known)."""
    if not isinstance(user, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(user).__name__}")
    out = json.loads(json.dumps(user))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        val = out.get(key, "auto")
        if not check_batch:
            continue
        if val != "auto" and (isinstance(val, bool) or not isinstance(val, int)):
            raise ConfigError(f"{source}: {key}={val!r} must be an integer or \"auto\"")
        if val == "auto":
            out[key] = expected[key]
        elif int(val) != expected[key]:
            raise ConfigError(f"{source}: {key}={val} but the run uses {expected[key]} "
                              f"(micro-batch x accumulation x processes); fix one of them")
    for prec in ("bf16", "fp16"):
        want = expected[prec]["enabled"]
        if not isinstance(out.get(prec, {}), dict):
            raise ConfigError(f"{source}: {prec} must be an object such as {{\"enabled\": true}}")
        have = out.get(prec, {}).get("enabled", "auto")  # absent = take the run's precision
        if have == "auto":
            out.setdefault(prec, {})["enabled"] = want
        elif bool(have) != want:
            raise ConfigError(f"{source}: {prec}.enabled={have} but dist.mixed_precision asks for "
                              f"{'it' if want else 'no ' + prec}")
    if out.get("bf16", {}).get("enabled") and out["bf16"].get("check_grad_overflow", True) is False:
        raise ConfigError(f"{source}: bf16.check_grad_overflow=false, but stagewise skips steps with a non-finite "
                          f"gradient norm through it; remove the key")
    if expected["bf16"]["enabled"]:
        out["bf16"].setdefault("check_grad_overflow", True)
    if not isinstance(out.get("zero_optimization", {}), dict):
        raise ConfigError(f"{source}: zero_optimization must be an object")
    stage = out.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != expected["zero_optimization"]["stage"]:
        raise ConfigError(f"{source}: zero_optimization.stage={stage} but dist.strategy is "
                          f"zero{expected['zero_optimization']['stage']}")
    out.setdefault("zero_optimization", {}).setdefault("stage", expected["zero_optimization"]["stage"])
    if out.get("gradient_clipping", "auto") == "auto":
        out["gradient_clipping"] = expected["gradient_clipping"]
    out.setdefault("zero_allow_untested_optimizer", True)
    out.setdefault("zero_force_ds_cpu_optimizer", False)
    return out


def load_user_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dist.deepspeed_config: file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"dist.deepspeed_config: {p} is not valid JSON ({e.msg} at line {e.lineno})") from None


def write_config(cfg: dict, directory: str | Path, strategy: str) -> Path:
    path = Path(directory) / f"ds_config_zero{STAGES[strategy]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path

"""FSDP2 (torch ``fully_shard``) for ``dist.strategy: fsdp`` — the same code on CPU (gloo) and GPU.

    lm = shard_model(lm, device=acc.device, world=acc.num_processes, mixed_precision="bf16")
    optimizer = torch.optim.AdamW(lm.parameters(), ...)     # built on the sharded parameters
    full = full_state_dict(lm)                             # collective; fp32 on rank 0

Why our own wrapping rather than accelerate's FSDP plugin: accelerate 1.15 turns the plugin on only
for GPU-like devices (on CPU the run silently stays DDP-less MULTI_CPU, nothing sharded), which
would leave the FSDP path untestable on CPU. ``fully_shard`` itself works with gloo, so stagewise
shards the model here and uses accelerate only for the process group, gradient accumulation and
the rest of the run. The model is therefore *not* passed to ``accelerator.prepare``.

Layout: one FSDP unit per decoder layer (the classes the model names in ``_no_split_modules``)
plus the root (embeddings, final norm, head; tied weights stay together). Mixed precision is
FSDP's own: fp32 sharded master weights, bf16 compute, fp32 gradient reduction. Checkpoints are
written with torch.distributed.checkpoint, every rank its own shards.
"""

from __future__ import annotations

from pathlib import Path

import torch

DCP_DIR = "fsdp_sharded"


def decoder_layers(lm) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (named by the HF model's ``_no_split_modules``)."""
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft wraps the HF model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(inner).__name__} names no decoder layer class in _no_split_modules; "
                         f"fsdp cannot pick its units")
    return layers


def shard_model(lm, *, device: torch.device, world: int, mixed_precision: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm.to(device)
    mesh = init_device_mesh(device.type, (world,))
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy()
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(lm, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return lm


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(lm) -> dict[str, torch.Tensor]:
    """Collective. Full (unsharded) fp32 master weights on CPU, on rank 0; empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(lm, optimizer, directory: str | Path) -> None:
    """Collective: model and optimizer shards through torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(lm, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(directory) / DCP_DIR))


def load(lm, optimizer, directory: str | Path) -> None:
    """Collective: the inverse of save (same number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(lm, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))
    set_state_dict(lm, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

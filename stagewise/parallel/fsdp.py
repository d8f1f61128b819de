"""FSDP2 (torch ``fully_shard``) for ``dist.strategy: fsdp`` — the same code on CPU (gloo) and GPU.

    shard_model(policy, device=acc.device, world=acc.num_processes, mixed_precision="bf16")
    optimizer = torch.optim.AdamW(policy.parameters(), ...)  # built on the sharded parameters
    full = full_state_dict(policy)                          # collective; fp32 on rank 0 (HF names)
    with unsharded_root(policy): sample(policy.lm, ...)     # calling the HF model directly

Why our own wrapping rather than accelerate's FSDP plugin: accelerate 1.15 turns the plugin on only
for GPU-like devices (on CPU the run silently stays DDP-less MULTI_CPU, nothing sharded), which
would leave the FSDP path untestable on CPU. ``fully_shard`` itself works with gloo, so stagewise
shards the model here and uses accelerate only for the process group, gradient accumulation and
the rest of the run. The model is therefore *not* passed to ``accelerator.prepare``.

Layout: one FSDP unit per decoder layer (the classes the model names in ``_no_split_modules``)
plus the root: our wrapper module around the HF model (``policy.lm``), which holds the embeddings,
final norm and head (tied weights stay together). The wrapper is the root so that a loss module
may call ``lm.model`` and ``lm.lm_head`` separately (chunked cross-entropy) and still have them
gathered; code that calls ``policy.lm`` directly (sampling) unshards the root around it. Mixed precision is
FSDP's own: fp32 sharded master weights, bf16 compute, fp32 gradient reduction. Checkpoints are
written with torch.distributed.checkpoint, every rank its own shards. Across machines the mesh is
2-D (hybrid sharding: sharded within a machine, replicated across machines). Gradients are
reduce-scattered after every micro-batch, as ZeRO-2/3 reduce theirs: skipping the reduction until
the last one (``set_requires_gradient_sync``) would keep a whole unsharded gradient per process
(4 bytes per parameter), the memory FSDP is chosen to save.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from stagewise.tracking import print0

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


def mesh_shape(world: int, per_machine: int) -> tuple[int, ...]:
    """(world,): one flat mesh on one machine. Several machines: (machines, processes per machine),
    hybrid sharding (HSDP), so that the per-layer all-gathers stay on each machine's fast links and
    only gradients cross machines."""
    if 0 < per_machine < world and world % per_machine == 0:
        return (world // per_machine, per_machine)
    return (world,)


def shard_model(policy, *, device: torch.device, world: int, mixed_precision: str):
    """policy: a wrapper module whose ``.lm`` is the HF model; sharded in place and returned."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy.to(device)
    shape = mesh_shape(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if len(shape) == 2:
        print0(f"[stagewise] fsdp: hybrid sharding over {shape[0]} machines x {shape[1]} processes (parameters "
               f"sharded within a machine, replicated across machines)")
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, shape)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy()
    for layer in decoder_layers(policy.lm):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(policy, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # FSDP2 initialises its states lazily in the root's first forward and refuses a first forward
    # that enters a layer directly, which sampling (policy.lm(...) under unsharded_root) does when it
    # comes before any training step: initialise now. (torch 2.13 has no public call for this.)
    policy._get_fsdp_state()._lazy_init()
    return policy


@contextmanager
def unsharded(policy):
    """Every unit's parameters gathered for the block and kept so across forwards (sampling: one
    all-gather per unit instead of one per unit and decoded token); resharded after it."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


@contextmanager
def unsharded_root(policy):
    """Gather the root unit's parameters (embeddings, norm, head) for code that calls ``policy.lm``
    directly; the decoder layers gather themselves in their own forward."""
    policy.unshard()
    try:
        yield
    finally:
        policy.reshard()


def full_state_dict(policy) -> dict[str, torch.Tensor]:
    """Collective. The HF model's full (unsharded) fp32 master weights on CPU, on rank 0 (HF names);
    empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in sd.items()}


def save(policy, optimizer, directory: str | Path) -> None:
    """Collective: model and optimizer shards through torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(directory) / DCP_DIR))


def load(policy, optimizer, directory: str | Path) -> None:
    """Collective: the inverse of save (same number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

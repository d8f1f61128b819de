"""Byte formulas, one per thing a training process holds: pure functions of counts and dtypes.

    states = model_states("zero2", world=8, params=4.0e9, trainable=4.0e9, weight_bytes=4, compute_bytes=2)
    # {'weights': 8.0e9, 'gradients': 1.0e9, 'master weights': 2.0e9, 'optimizer states': 4.0e9, ...}
    zero_paper(7.5e9, 64, stage=1) / 1e9   # 31.4: the ZeRO paper's worked example (K = 12)

Each strategy is counted as stagewise runs it (parallel/strategy.py, parallel/deepspeed_config.py,
parallel/fsdp.py), not as a textbook does:
- single / ddp: the module keeps its load dtype (fp32 by default) and trains under autocast, so
  weights, gradients and AdamW's two moments are all fp32 (16 bytes per parameter), plus autocast's
  bf16 copy of every weight while a forward's graph is alive. DDP's gradient buckets are views of
  the gradients (``gradient_as_bucket_view``): nothing more.
- zero1/2/3 (DeepSpeed, bf16 or fp16): the module is cast to the compute dtype; fp32 master weights,
  the two Adam moments and, during the step, an fp32 copy of the gradient partition live in the
  optimizer (``stage_1_and_2.py``: ``single_partition_of_fp32_groups`` and its ``.grad``); ZeRO-1
  keeps whole bf16 gradients, ZeRO-2/3 their partition plus the reduce bucket(s); ZeRO-3 keeps
  1/N of the bf16 weights plus what is gathered at a time. Without offload this is DeepSpeed's own
  ``estimate_zero2_model_states_mem_needs``: 2P + 18P/N bytes (2 bf16 gradient + 4 fp32 gradient +
  4 fp32 weight + 8 moment bytes per parameter, sharded), plus the buckets.
- fsdp (torch ``fully_shard``): fp32 weights, gradients and moments sharded 1/N; bf16 gathered
  copies of the root (embeddings, head) and of the layers in flight (the current and the
  prefetched one), and one layer's unsharded gradient before its reduce-scatter.
Offload moves what the optimizer holds (and ZeRO-3's weights with ``optimizer_and_params``) to the
host: counted there, per process.
"""

from __future__ import annotations

GIB = 1024**3


def zero_paper(psi: float, world: int, stage: int, k: int = 12) -> float:
    """Model-state bytes per device from the ZeRO paper (Rajbhandari et al. 2020, fig. 1): fp16
    weights and gradients (2 + 2 bytes per parameter) and K bytes of optimizer state (Adam: 12)."""
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return (2 + 2) * psi + k * psi / world
    if stage == 2:
        return 2 * psi + (2 + k) * psi / world
    if stage == 3:
        return (2 + 2 + k) * psi / world
    raise ValueError(f"ZeRO stage {stage}: expected 0-3")


def model_states(strategy: str, *, world: int, params: int, trainable: int, weight_bytes: int, compute_bytes: int,
                 offload: str = "none", layer_params: int = 0, outside_params: int = 0, hidden: int = 0,
                 max_live_params: int = 10**9) -> dict[str, tuple[float, float]]:
    """{component: (device bytes, host bytes)} per process for weights, gradients and optimizer.

    weight_bytes: the dtype the module is loaded in (model.dtype); compute_bytes: the mixed
    precision's (2 for bf16 / fp16, = weight_bytes without mixed precision). trainable < params
    under LoRA (the frozen base keeps no gradient or optimizer state). layer_params, outside_params,
    hidden: what FSDP and ZeRO-3 hold gathered at a time."""
    n, p, t = world, float(params), float(trainable)
    out: dict[str, tuple[float, float]] = {}
    if strategy in ("single", "ddp"):
        out["weights"] = (weight_bytes * p, 0.0)
        out["gradients"] = (weight_bytes * t, 0.0)
        out["optimizer states"] = (2 * weight_bytes * t, 0.0)  # torch AdamW: moments in the weights' dtype
        return out
    if strategy == "fsdp":
        gathered = compute_bytes * (outside_params + 2 * layer_params)
        out["weights (sharded)"] = (weight_bytes * p / n, 0.0)
        out["weights (gathered: root + 2 layers)"] = (gathered if n > 1 or compute_bytes != weight_bytes else 0.0, 0.0)
        out["gradients (sharded)"] = (weight_bytes * t / n, 0.0)
        out["gradients (one layer, unsharded)"] = ((compute_bytes + 4) * min(layer_params, t), 0.0)
        out["optimizer states"] = (2 * weight_bytes * t / n, 0.0)
        return out
    stage = {"zero1": 1, "zero2": 2, "zero3": 3}[strategy]
    mixed = compute_bytes < 4
    master = 4 * t / n if mixed else 0.0  # fp32 master weights (mixed precision only)
    moments = 8 * t / n
    fp32_grad = 4 * t / n if mixed else 0.0  # the partition's fp32 gradient, made for the step
    bucket = compute_bytes * hidden * hidden  # reduce_bucket_size = hidden^2 elements
    off_opt = offload in ("optimizer", "optimizer_and_params")
    if stage == 3:
        gathered = compute_bytes * min(max_live_params, p, outside_params + 2 * layer_params
                                       + int(0.9 * hidden * hidden))
        if offload == "optimizer_and_params":
            out["weights (partition)"] = (0.0, compute_bytes * p / n)
        else:
            out["weights (partition)"] = (compute_bytes * p / n, 0.0)
        out["weights (gathered)"] = (gathered, 0.0)
    else:
        out["weights"] = (compute_bytes * p, 0.0)
    if stage == 1 and not off_opt:
        out["gradients"] = (compute_bytes * t, 0.0)  # whole, accumulated in the module
    elif off_opt:  # reduced through the buckets straight into the host's fp32 partition
        out["gradient buckets"] = (2 * bucket, 0.0)
    else:
        out["gradients (partition + bucket)"] = (compute_bytes * t / n + 2 * bucket, 0.0)
    where = (lambda b: (0.0, b)) if off_opt else (lambda b: (b, 0.0))
    if master:
        out["master weights (fp32)"] = where(master)
    out["optimizer states"] = where(moments)
    if fp32_grad:
        out["fp32 gradient partition (step)"] = where(fp32_grad)
    return out


def kv_cache_bytes(kv_per_token: int, tokens: int, dtype_bytes: int = 2) -> float:
    """K and V of every layer for ``tokens`` positions (kv_per_token = 2 x layers x kv heads x head dim)."""
    return float(kv_per_token) * tokens * dtype_bytes


def head_bytes(vocab: int, chunk: int, with_entropy: bool) -> float:
    """The chunked output head (lm_head.token_logprobs): one chunk's fp32 logits and its log-sum-exp
    work, twice while its backward recomputes it, a third block for the entropy's softmax."""
    return 4.0 * chunk * vocab * (3 if with_entropy else 2)


def comm_per_step(strategy: str, *, world: int, params: int, trainable: int, grad_bytes: int, compute_bytes: int,
                  micro_batches: int) -> float:
    """Bytes each process sends per optimizer step (ring collectives: (N-1)/N of the payload per
    all-gather or reduce-scatter, twice that per all-reduce)."""
    if world == 1:
        return 0.0
    f = (world - 1) / world
    if strategy in ("single", "ddp"):
        return 2 * f * trainable * grad_bytes  # one all-reduce of the gradients (DDP syncs at the last micro-batch)
    if strategy in ("zero1", "zero2"):
        # gradients reduce-scattered once per step, updated weights all-gathered
        return f * trainable * compute_bytes + f * params * compute_bytes
    if strategy == "zero3":
        # every micro-batch: weights gathered for the forward and again for the backward, gradients reduce-scattered
        return micro_batches * (2 * f * params * compute_bytes + f * trainable * compute_bytes)
    if strategy == "fsdp":
        return micro_batches * (2 * f * params * compute_bytes + f * trainable * 4)  # reduce_dtype fp32
    raise ValueError(f"unknown strategy {strategy!r}")

"""A run's memory per device, stage by stage and phase by phase, and which strategies fit.

    shape = model_shape(read_model_config(cfg.model.name_or_path))
    plans = plan_run(cfg, shape, config, world=8, prompt_tokens=5200)
    print(format_plans(plans, device_memory=80 * GIB))
    print(format_recommendation(recommend(cfg, shape, config, device_memory=80 * GIB, prompt_tokens=5200)))

A stage has up to three phases that never overlap in time:
- train: the optimizer step of one micro-batch at a time (model states, activations, the chunked
  output head, the KL reference; a sleeping vLLM holds nothing on the device);
- rollout (GRPO, RFT): sampling with the training state still resident (weights and optimizer
  states; gradients are freed between steps) plus the sampler's weights and KV cache, or vLLM's
  reservation (gpu_memory_utilization of the device);
- eval (between stages, after the stage's optimizer is freed): a bf16 copy and its KV cache.
The peak is the largest phase. Sequence lengths: SFT rows are ``sft.max_seq_len`` tokens; an RL row
is its prompt (``prompt_tokens``: the caller's figure) plus one completion (``rollout.max_new_tokens``)
or, for environment domains, the episode budget (``rollout.max_episode_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stagewise.config import RunConfig
from stagewise.generation.sampling import PREFILL_BLOCK
from stagewise.lm_head import chunk_tokens
from stagewise.planning import memory
from stagewise.planning.shapes import DTYPE_BYTES, ModelShape, saved_activations

GIB = memory.GIB
RESERVED = 1.0 * GIB  # CUDA context, NCCL buffers and allocator slack a device never gives to tensors
# strategies from the fastest to the slowest at equal fit: communication per step grows down the
# list (all-reduce < reduce-scatter + all-gather once < gathers every micro-batch), and offload
# adds host <-> device copies of the optimizer state (and of ZeRO-3's weights) at every step.
# benchmarks/strategies.py agrees on 2 CPU processes (README): DDP, ZeRO-1/2, FSDP2 within ~25% of
# each other, ZeRO-3 1.2-1.9x DDP's step; offload it cannot rank (a CPU's host is its device)
BY_SPEED = [("single", "none"), ("ddp", "none"), ("zero1", "none"), ("zero2", "none"), ("fsdp", "none"),
            ("zero3", "none"), ("zero2", "optimizer"), ("zero3", "optimizer"), ("zero3", "optimizer_and_params")]


def prefix_cache_bytes(rollout, kv_per_token: float, rows: int, prompt_tokens: int, env: bool) -> float:
    """What the sampler's prompt cache can hold in one rollout phase (it lives for one: the weights
    change after it): prompts of a whole prefill block or more, no more than ``rollout.prefix_cache_gib``.
    An upper bound: each prompt counted whole (the store keeps the whole blocks that several prompts
    share once), a single-turn prompt once per rank, an episode each policy turn's prompt, the last
    one at most ``prompt + max_episode_tokens`` long."""
    cap = rollout.prefix_cache_gib * GIB
    if not cap or prompt_tokens < PREFILL_BLOCK:
        return 0.0
    kept = rows * (rollout.max_turns * (prompt_tokens + rollout.max_episode_tokens) if env else prompt_tokens)
    return min(cap, memory.kv_cache_bytes(kv_per_token, kept))


_SAVED: dict = {}  # (config, tokens, dtypes) -> SavedActivations: recommend plans the same shapes many times


@dataclass
class Phase:
    name: str  # train | rollout | eval
    device: dict[str, float] = field(default_factory=dict)  # component -> bytes per device
    host: dict[str, float] = field(default_factory=dict)  # component -> bytes per process on the host

    @property
    def total(self) -> float:
        return sum(self.device.values())


@dataclass
class StagePlan:
    index: int
    name: str
    kind: str
    strategy: str
    offload: str
    world: int
    rows: int  # rows per micro-batch
    tokens: int  # tokens per micro-batch forward (all rows, the shared prefix once)
    micro_batches: int  # per process per optimizer step
    checkpointing: bool
    phases: list[Phase]
    comm_bytes: float  # sent per process per optimizer step
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda ph: ph.total)


def _dtypes(cfg: RunConfig) -> tuple[int, int, str, str]:
    """(weight bytes, compute bytes, compute dtype, residual dtype) as the strategy runs the model."""
    weight = cfg.model.dtype
    mp = cfg.dist.mixed_precision
    # auto is planned as bf16: what it is on the GPUs plans are for (Ampere and later)
    compute = {"bf16": "bfloat16", "auto": "bfloat16", "fp16": "float16"}.get(mp, weight)
    if cfg.dist.strategy.startswith("zero") or cfg.dist.strategy == "fsdp":
        residual = compute  # DeepSpeed casts the module; FSDP gathers it in param_dtype
    else:
        residual = weight  # autocast: fp32 weights keep an fp32 residual stream
    return DTYPE_BYTES[weight], DTYPE_BYTES[compute], compute, residual


def plan_stage(cfg: RunConfig, i: int, shape: ModelShape, config, *, world: int, prompt_tokens: int,
               environments: frozenset[str] = frozenset(), micro_batch: int | None = None) -> StagePlan:
    """environments: the names of the config's multi-turn (environment) domains."""
    st = cfg.stages[i]
    env = any(d in environments for d in st.domains)
    strategy, offload = cfg.dist.strategy, cfg.dist.offload
    wb, cb, compute, residual = _dtypes(cfg)
    rollout = cfg.stage_part(i, "rollout")
    checkpointing = cfg.model.gradient_checkpointing
    notes: list[str] = []
    if st.kind == "sft":
        sft = cfg.stage_part(i, "sft")
        per_process = max(1, sft.batch_size // world)
        auto = sft.micro_batch_size == "auto"
        rows = micro_batch or (per_process if auto else min(sft.micro_batch_size, per_process))
        if auto and not micro_batch:
            notes.append(f"sft.micro_batch_size auto: planned at the per-process batch ({rows} rows); "
                         f"the stage probes the largest that fits")
        tokens = rows * sft.max_seq_len
        micro_batches = max(1, math.ceil(per_process / rows))
        with_entropy = False
    else:
        part = cfg.stage_part(i, st.kind if st.kind in ("grpo", "rft") else "grpo")
        per_process = max(1, rollout.prompts_per_step * rollout.num_generations // world)
        rows = micro_batch or min(part.micro_batch_size, per_process)
        completion = rollout.max_episode_tokens if env else rollout.max_new_tokens
        group = rollout.num_generations
        shared = getattr(part, "shared_prefix", False)
        prompts = math.ceil(rows / group) if shared else rows
        tokens = prompts * prompt_tokens + rows * completion
        iterations = getattr(part, "num_iterations", 1)
        micro_batches = max(1, math.ceil(per_process / rows)) * iterations
        with_entropy = st.kind == "grpo"
    # activations: the model's own forward on fake tensors, one packed row per micro-batch
    key = (id(config), tokens, compute, residual)
    if key not in _SAVED:
        _SAVED[key] = saved_activations(config, rows=1, tokens=tokens, compute=compute, residual=residual)
    saved = _SAVED[key]
    states = memory.model_states(strategy, world=world, params=shape.params, trainable=shape.trainable,
                                 weight_bytes=wb, compute_bytes=cb, offload=offload, layer_params=shape.layer_params,
                                 outside_params=shape.outside_params, hidden=shape.hidden)
    train = Phase("train")
    for name, (dev, host) in states.items():
        if dev:
            train.device[name] = dev
        if host:
            train.host[name] = host
    if saved.weight_casts and strategy in ("single", "ddp"):
        train.device["autocast bf16 weight copies"] = saved.weight_casts
    train.device["activations" + (" (checkpointed)" if checkpointing else "")] = \
        saved.total(shape.layers, checkpointing) - saved.weight_casts
    chunk = chunk_tokens(shape.vocab)
    train.device["output head (hidden states + one chunk)"] = \
        tokens * shape.hidden * DTYPE_BYTES[residual] + memory.head_bytes(shape.vocab, min(chunk, tokens), with_entropy)
    if st.kind == "grpo":
        grpo = cfg.stage_part(i, "grpo")
        lora_self_reference = cfg.model.lora is not None
        if grpo.beta > 0 and not lora_self_reference:
            ref = cb * shape.params / (world if strategy in ("zero3", "fsdp") else 1)
            train.device["KL reference model"] = ref
    vllm = rollout.engine == "vllm"
    phases = [train]
    if vllm and not rollout.vllm.sleep:
        notes.append("vLLM stays awake while training (rollout.vllm.sleep false): "
                     "its reservation counts in every phase")
    if st.kind in ("grpo", "rft"):
        sample = Phase("rollout")
        for name, (dev, _host) in states.items():
            if dev and "gradient" not in name:  # freed between steps (zero_grad(set_to_none=True))
                sample.device[name] = dev
        if vllm:
            sample.device["vLLM (weights + KV cache: gpu_memory_utilization)"] = -1.0  # filled per device
        else:
            if strategy in ("single", "ddp") and rollout.weights != "policy" and cb < wb and cfg.model.lora is None:
                sample.device["bf16 sampling copy"] = 2.0 * shape.params
            elif strategy in ("zero3", "fsdp") and rollout.gather_for_sampling:
                sample.device["whole model gathered for sampling"] = cb * shape.params
            per_rank_rows = max(1, rollout.prompts_per_step * rollout.num_generations // world)
            length = prompt_tokens + (rollout.max_episode_tokens if env else rollout.max_new_tokens)
            sample.device[f"KV cache ({per_rank_rows} rows x {length} tokens)"] = \
                memory.kv_cache_bytes(shape.kv_per_token, per_rank_rows * length)
            stored = prefix_cache_bytes(rollout, shape.kv_per_token, per_rank_rows, prompt_tokens, env)
            if stored:
                sample.device["prefix cache (rollout.prefix_cache_gib)"] = stored
        phases.append(sample)
    evaluation = Phase("eval")
    if cfg.eval_engine == "vllm":
        evaluation.device["vLLM (weights + KV cache: gpu_memory_utilization)"] = -1.0
    else:
        evaluation.device["bf16 evaluation copy"] = 2.0 * shape.params
        any_env = any(d.name in environments for d in cfg.domains)  # evaluation covers every domain
        length = prompt_tokens + (rollout.max_episode_tokens if any_env else cfg.eval.max_new_tokens)
        evaluation.device[f"KV cache ({cfg.eval.batch_size} rows x {length} tokens)"] = \
            memory.kv_cache_bytes(shape.kv_per_token, cfg.eval.batch_size * length)
    phases.append(evaluation)
    grad_bytes = wb if strategy in ("single", "ddp") else cb
    comm = memory.comm_per_step(strategy, world=world, params=shape.params, trainable=shape.trainable,
                                grad_bytes=grad_bytes, compute_bytes=cb, micro_batches=micro_batches)
    if st.kind in ("grpo", "rft") and strategy in ("zero3", "fsdp") and world > 1 and rollout.gather_for_sampling:
        comm += (world - 1) / world * shape.params * cb  # the whole model gathered once per rollout
    return StagePlan(i, st.name or "+".join(st.domains), st.kind, strategy, offload, world, rows, tokens, micro_batches,
                     checkpointing, phases, comm, notes)


def fill_vllm(plan: StagePlan, device_memory: float, utilization: float) -> None:
    """vLLM takes its share of the device whatever the model (weights + KV cache + its activations)."""
    for phase in plan.phases:
        for name, val in phase.device.items():
            if val < 0:
                phase.device[name] = utilization * device_memory


def plan_run(cfg: RunConfig, shape: ModelShape, config, *, world: int, prompt_tokens: int,
             environments: frozenset[str] = frozenset(), device_memory: float | None = None) -> list[StagePlan]:
    plans = []
    for i in range(len(cfg.stages)):
        plan = plan_stage(cfg, i, shape, config, world=world, prompt_tokens=prompt_tokens, environments=environments)
        fill_vllm(plan, device_memory or 0.0, cfg.stage_part(i, "rollout").vllm.gpu_memory_utilization)
        plans.append(plan)
    return plans


def fits(plan: StagePlan, device_memory: float) -> bool:
    return plan.peak.total <= device_memory - RESERVED


@dataclass
class Choice:
    devices: int
    strategy: str
    offload: str
    peak: float  # bytes per device, the largest over the run's stages
    fits: bool


def recommend(cfg: RunConfig, shape: ModelShape, config, *, device_memory: float, prompt_tokens: int,
              environments: frozenset[str] = frozenset(), counts: tuple[int, ...] = (1, 2, 4, 8, 16)) -> list[Choice]:
    """Every (devices, strategy) in speed order: the run's peak per device and whether it fits."""
    out = []
    for n in counts:
        for strategy, offload in BY_SPEED:
            if (strategy == "single") != (n == 1) and strategy in ("single", "ddp"):
                continue
            if strategy == "fsdp" and n == 1:
                continue
            variant = cfg.model_copy(update={"dist": cfg.dist.model_copy(update={"strategy": strategy,
                                                                                  "offload": offload})})
            plans = plan_run(variant, shape, config, world=n, prompt_tokens=prompt_tokens, environments=environments,
                             device_memory=device_memory)
            peak = max(p.peak.total for p in plans)
            out.append(Choice(n, strategy, offload, peak, peak <= device_memory - RESERVED))
    return out

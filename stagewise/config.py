"""Typed run configuration: YAML + named ablation + dotted CLI overrides -> one validated RunConfig.

    cfg = load_config("configs/grpo_single.yaml", overrides=["optim.lr=1e-5", "stages.0.steps=10"],
                      ablation="no_replay")

Order of application: the YAML file, then the ablation's override set, then the command line.
Every part is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or an
out-of-range value raises ``ConfigError`` whose message names the dotted field and the problem.
The resolved config (what actually ran) is written to ``output_dir/config.yaml``.

This module is a leaf (it imports nothing of stagewise but ``errors``): names chosen from a registry
(stage kinds, losses, domain types, ...) are checked by ``continual/preflight.py``, before any model loads.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stagewise.errors import ConfigError


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Part):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelConfig(_Part):
    # "bundled:smollm2-135m-instruct" | local HF dir | hub id (local HF cache) | path/to/file.gguf
    name_or_path: str = "bundled:smollm2-135m-instruct"
    # Storage dtype of the trainable weights. float32 on purpose: with bf16 weights AdamW at
    # lr ~1e-5 loses its updates to rounding (measured). Compute runs in dist.mixed_precision.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    # transformers' attention kernel for training and the local sampler's prefill ("sdpa", "eager",
    # "flash_attention_2" where installed: packed SFT rows then take its variable-length path);
    # None: transformers' default
    attn_implementation: str | None = None


class OptimConfig(_Part):
    lr: float = Field(1e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    # A step whose loss or gradient norm is not finite changes nothing (skipped on every rank);
    # this many bad steps in a row end the run with an error.
    max_bad_steps: int = Field(3, ge=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine/linear decay to lr * min_lr_ratio


class VLLMOptions(_Part):
    """rollout.vllm: the colocated vLLM engine (rollout.engine: vllm)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # "auto": the longest that fits the engine's KV-cache budget, at most the model's maximum
    max_model_len: Literal["auto"] | Annotated[int, Field(gt=0)] = "auto"
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # GPU: share vLLM may take (training has the rest)
    sleep: bool = True  # GPU: free vLLM's KV cache and weights while training runs
    kv_cache_gib: float = Field(1.0, gt=0)  # CPU: KV-cache space per process (VLLM_CPU_KVCACHE_SPACE)
    # no CUDA graphs / compilation (faster start, slower decode); None: eager on CPU, graphs on GPUs
    enforce_eager: bool | None = None


class RolloutConfig(_Part):
    prompts_per_step: int = Field(4, gt=0)  # global number of groups per optimizer step
    # G, completions per prompt: group advantages need at least two (the std of one sample is NaN)
    num_generations: int = Field(8, ge=2)
    max_new_tokens: int = Field(16, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    mask_truncated_completions: bool = False
    # Which engine generates (registry "rollout_engine": local = our KV-cache sampler, vllm)
    engine: str = "local"
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    # Weights the local engine samples with: "policy" decodes with the training module itself;
    # "bf16_copy" a bf16 copy filled from the current weights for each rollout phase and freed after it
    # (faster on CPU/GPU; single / DDP only); "auto": the copy where it can stand in, else the policy.
    weights: Literal["auto", "policy", "bf16_copy"] = "auto"
    # ZeRO-3 / FSDP, local engine: gather the whole model once per rollout phase (a full copy per
    # process while sampling) instead of every layer at every decoded token; false for models whose
    # full copy does not fit one device
    gather_for_sampling: bool = True
    # local engine: long prompts' KV caches kept within a rollout phase / an evaluation (GiB per
    # process; 0 = off), so multi-turn episodes and shared system prompts are not prefilled again
    prefix_cache_gib: float = Field(1.0, ge=0)
    # Multi-turn episodes (environment domains); max_new_tokens is then the budget of one policy turn
    max_turns: int = Field(4, gt=0)  # policy turns per episode
    max_episode_tokens: int = Field(512, gt=0)  # tokens after the prompt: policy turns + tool results + replies
    max_tool_errors: int = Field(2, ge=0)  # malformed calls / unknown tools / failing tools before the episode ends

    @model_validator(mode="after")
    def _episode_fits_a_turn(self):
        if self.max_episode_tokens < self.max_new_tokens:
            raise ValueError(f"max_episode_tokens={self.max_episode_tokens} is smaller than one turn's "
                             f"max_new_tokens={self.max_new_tokens}")
        return self


class GRPOConfig(_Part):
    advantage: str = "grpo"  # registry: grpo | dr_grpo | batch_std
    loss: str = "dapo"  # registry: grpo | dr_grpo | dapo
    epsilon: float = Field(0.2, ge=0)
    epsilon_high: float | None = Field(None, ge=0)  # None -> epsilon (symmetric clip)
    beta: float = Field(0.0, ge=0)  # KL(k3) coefficient; 0 loads no reference model
    reference: Literal["base", "previous_stage"] = "base"  # which weights the KL term anchors to
    # weight the k3 KL by the ratio pi/pi_old (TRL's default use_bias_correction_kl; set true to match TRL)
    kl_ratio_weighted: bool = False
    num_iterations: int = Field(1, ge=1)  # optimizer passes over one rollout batch
    drop_zero_variance_groups: bool = False  # DAPO "dynamic sampling" (masking variant)
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward/backward, per process
    # a micro-batch's shared prefix (its rows' common opening, or each group's prompt) runs once
    # with gradients, every row's tail attending to it (exact; the model's attention must be sdpa)
    shared_prefix: bool = True
    # engines that report log-probs (vllm): weight each token's loss by min(pi_trainer / pi_engine,
    # tis_cap), the truncated importance-sampling correction of the engine/trainer mismatch; None: off
    tis_cap: float | None = Field(None, gt=0)

    @property
    def clip_high(self) -> float:
        """The upper clip range: epsilon_high, else epsilon (a symmetric clip)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class SFTConfig(_Part):
    batch_size: int = Field(16, gt=0)  # packed rows per optimizer step, all processes together
    # rows per forward/backward per process; "auto" probes the largest that fits in memory
    micro_batch_size: int | Literal["auto"] = "auto"
    max_seq_len: int = Field(512, ge=16)  # tokens per packed row; longer conversations are truncated
    packing: bool = True  # several examples per row, no attention across them
    # a step whose rows hold one example each (packing off, or examples too long to pack together:
    # agent episodes) runs each micro-batch's common opening once, with gradients, and every row's
    # rest attending to it (exact; the model's attention must be sdpa)
    shared_prefix: bool = True
    loss_chunk: int = Field(1024, gt=0)  # learnt positions per cross-entropy chunk (memory vs speed)


class RFTConfig(_Part):
    # which sampled episodes are learnt: "pass" those whose domain metric reaches 1.0; "best" each
    # group's highest-reward episode when its reward reaches min_reward
    keep: Literal["pass", "best"] = "pass"
    min_reward: float = 0.5  # with keep: best
    micro_batch_size: int = Field(8, gt=0)  # episodes per forward/backward, per process
    shared_prefix: bool = True  # a micro-batch's shared prefix once, as grpo.shared_prefix
    # demonstrations learnt with every round's kept episodes: domains an sft stage could learn (answers,
    # conversations, `stagewise demos` episode records), demos_per_step of them per round (all processes
    # together, in a fixed shuffled order). A round keeps a handful of episodes; alone they can pull
    # the policy away from what the warm-up taught (a tau2 agent that stops calling tools)
    demos: list[str] = []
    demos_per_step: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _demos_and_count(self) -> RFTConfig:
        if bool(self.demos) != bool(self.demos_per_step):
            raise ValueError(f"give both rft.demos and rft.demos_per_step > 0, or neither (demos={self.demos}, "
                             f"demos_per_step={self.demos_per_step})")
        return self


class DataConfig(_Part):
    # a malformed record in a data file: stop with file:row (raise), or skip it and count it (skip)
    on_error: Literal["raise", "skip"] = "raise"


class DistConfig(_Part):
    strategy: Literal["single", "ddp", "fsdp", "zero1", "zero2", "zero3"] = "single"
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    offload_device: Literal["cpu", "nvme"] = "cpu"
    nvme_path: str | None = None
    # compute dtype (autocast; DeepSpeed / FSDP cast): auto = bf16 where the hardware computes it (GPUs
    # from Ampere on, CPUs with AMX / AVX-512 BF16), else fp16 on older GPUs and fp32 ("no") on other CPUs
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    deepspeed_config: str | None = None  # a user JSON, checked against the run
    cpu: bool | None = None  # None: use a GPU when one is visible
    # collective timeout: a rank that waits longer than this for its peers fails instead of hanging
    timeout_s: int = Field(1800, gt=0)

    @field_validator("mixed_precision", "offload", mode="before")
    @classmethod
    def _yaml_no(cls, v, info):
        # YAML 1.1 reads a bare `no` / `none` as False / None
        if v is False or v is None:
            return "no" if info.field_name == "mixed_precision" else "none"
        return v

    @model_validator(mode="after")
    def _check(self) -> DistConfig:
        if self.offload != "none" and not self.strategy.startswith("zero"):
            raise ValueError(f"offload={self.offload} needs a ZeRO strategy, not {self.strategy}")
        if self.offload == "optimizer_and_params" and self.strategy != "zero3":
            raise ValueError("offload=optimizer_and_params needs strategy zero3")
        if self.offload_device == "nvme" and not self.nvme_path:
            raise ValueError("offload_device=nvme needs dist.nvme_path")
        if self.deepspeed_config and not self.strategy.startswith("zero"):
            raise ValueError("deepspeed_config is only used with a zero1/zero2/zero3 strategy")
        if self.strategy == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError("strategy fsdp supports mixed_precision bf16 or no, not fp16")
        return self


class RewardSpec(_Part):
    # name: a registered reward; with fn, the name it is logged under (reward/<name>; default: its __name__)
    name: str | None = None
    # "package.module:function": a batched reward function in TRL's form (stagewise/reward_functions.py),
    # imported by preflight before any model loads
    fn: str | None = None
    weight: float = 1.0

    @field_validator("fn")
    @classmethod
    def _module_and_function(cls, v: str | None) -> str | None:
        if v is not None and not all(v.partition(":")[::2]):
            raise ValueError(f"{v!r} is not 'package.module:function'")
        return v

    @model_validator(mode="after")
    def _name_or_fn(self) -> RewardSpec:
        if self.name is None and self.fn is None:
            raise ValueError("give name (a registered reward) or fn ('package.module:function')")
        return self


class DomainSpec(_Part):
    name: str  # the key stages refer to
    type: str = ""  # registry name ("add", "max", "jsonl", ...) or "module:function"; "" = name
    args: dict[str, Any] = {}
    rewards: list[RewardSpec] | None = None  # None -> the domain's default rewards
    train_size: int = Field(2000, gt=0)
    eval_size: int = Field(50, gt=0)


class StageConfig(_Part):
    name: str | None = None
    kind: str = "grpo"  # stage kind, from the registry: grpo | rft | sft
    domains: list[str] = Field(min_length=1)
    steps: int | None = Field(None, gt=0)
    tasks_per_domain: int | None = Field(None, gt=0)  # grpo, rft: -> steps = ceil(n * |domains| / prompts)
    epochs: float | None = Field(None, gt=0)  # sft: passes over the stage's training data
    replay: float = Field(0.0, ge=0, lt=1)  # fraction of each batch from earlier stages' domains
    # Per-stage partial overrides of the run-level parts, validated against the merged result.
    optim: dict[str, Any] = {}
    rollout: dict[str, Any] = {}
    grpo: dict[str, Any] = {}
    rft: dict[str, Any] = {}
    sft: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_length(self) -> StageConfig:
        given = [k for k in ("steps", "tasks_per_domain", "epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, tasks_per_domain (grpo) or epochs (sft); "
                             f"got {given or 'none'}")
        return self


class EvalConfig(_Part):
    max_new_tokens: int = Field(16, gt=0)
    batch_size: int = Field(64, gt=0)  # episodes per generation batch, the domains' episodes together
    before_first_stage: bool = True
    # episodes per held-out task of an environment domain: 1 = greedy; n > 1 = n sampled at
    # rollout.temperature, the matrix holds pass^1 and pass^k (k = 1..n) is logged as eval/<domain>/pass^k
    trials: int = Field(1, ge=1)
    # held-out loss / perplexity of every domain after every stage; None: when the run has an sft stage
    held_out_loss: bool | None = None
    # what generates the evaluation episodes: local (our sampler) or vllm (rollout.vllm's options);
    # None: as rollout.engine. Greedy numbers of the two differ in rounding, so compare like with like
    engine: Literal["local", "vllm"] | None = None


# experiment trackers (stagewise/trackers.py); each but tensorboard is an extra: pip install 'stagewise[wandb]'
TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]


class LoggingConfig(_Part):
    log_every: int = Field(1, gt=0)
    # where rank 0 reports metrics, the config, the accuracy matrix and the report's plots, as one run
    # across all stages (metrics.jsonl is always written); [] for none
    report_to: list[TrackerName] = ["tensorboard"]
    project: str = "stagewise"  # the W&B / trackio project and MLflow experiment; the run is named `name`
    progress: bool = True
    dump_rollouts: bool = False  # rank 0 appends every completion, reward and advantage to rollouts.jsonl

    @model_validator(mode="before")
    @classmethod
    def _old_tensorboard_key(cls, data):
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError("the key tensorboard was replaced by report_to, a list of trackers "
                             "(report_to: [tensorboard], or [] for none)")
        return data

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v  # `logging.report_to=wandb` on the command line

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("name each tracker once")
        return v


class CheckpointConfig(_Part):
    every: int = Field(0, ge=0)  # steps between mid-stage checkpoints; 0 = end of stage only
    keep_last: int = Field(2, gt=0)


class RunConfig(_Part):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    plugins: list[str] = []  # python modules imported first (they register domains/rewards)
    domains: list[DomainSpec] = []
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig()
    rft: RFTConfig = RFTConfig()
    sft: SFTConfig = SFTConfig()
    optim: OptimConfig = OptimConfig()
    dist: DistConfig = DistConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    stages: list[StageConfig] = Field(min_length=1)
    ablation: str | None = None  # set by load_config: which named ablation was applied
    ablations: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _cross_check(self) -> RunConfig:
        names = [d.name for d in self.domains]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"domain names repeat: {sorted(dup)}")
        stage_names = [st.name for st in self.stages if st.name]
        dup = {n for n in stage_names if stage_names.count(n) > 1}
        if dup:
            raise ValueError(f"stages: names repeat: {sorted(dup)} (each stage needs its own name)")
        for i, st in enumerate(self.stages):
            for d in st.domains:
                if d not in names:
                    raise ValueError(f"stages.{i}.domains: unknown domain {d!r} (have {names})")
            for part in ("optim", "rollout", "grpo", "rft", "sft"):
                merged = {**getattr(self, part).model_dump(), **getattr(st, part)}
                try:
                    type(getattr(self, part)).model_validate(merged)
                except ValidationError as e:
                    raise ValueError(_first_error(e, prefix=f"stages.{i}.{part}")) from None
        return self

    # -- per-stage effective parts ------------------------------------------------------------
    def stage_part(self, i: int, part: str):
        base = getattr(self, part)
        return type(base).model_validate({**base.model_dump(), **getattr(self.stages[i], part)})

    def stage_steps(self, i: int) -> int | None:
        """Optimizer steps of stage i; None when they depend on the data (epochs)."""
        st = self.stages[i]
        if st.steps is not None:
            return st.steps
        if st.epochs is not None:
            return None
        prompts = self.stage_part(i, "rollout").prompts_per_step
        return math.ceil(st.tasks_per_domain * len(st.domains) / prompts)

    def has_kind(self, kind: str) -> bool:
        return any(st.kind == kind for st in self.stages)

    @property
    def eval_engine(self) -> str:
        """The engine evaluations generate with: eval.engine, else rollout.engine (a plugin engine: local)."""
        return self.eval.engine or (self.rollout.engine if self.rollout.engine == "vllm" else "local")


# --- loading ------------------------------------------------------------------------------------


def _first_error(e: ValidationError, prefix: str = "") -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    tail = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {msg}{tail}" if loc else f"{msg}{tail}"


def parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would ("3" -> 3, "true" -> True, "[a,b]" -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree[a][b][0][c] = value`` for key "a.b.0.c"; list indices are integers."""
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is a list, index it with a number")
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"{where}: index out of range (list has {len(node)} items)")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"{where}: cannot set a key inside a {type(node).__name__}")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and "." not in str(k):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def resolve_raw(raw: dict, overrides: list[str] = (), ablation: str | None = None) -> dict:
    """Apply an ablation and dotted overrides to a raw config dict (no validation yet)."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError("config: the YAML file must hold a mapping at the top level")
    if ablation is not None:
        ablations = raw.get("ablations") or {}
        if not isinstance(ablations, dict):
            raise ConfigError(f"ablations: expected a mapping of name -> overrides, got {type(ablations).__name__}")
        if ablation not in ablations:
            raise ConfigError(f"ablation: unknown ablation {ablation!r} "
                              f"(defined: {sorted(map(str, ablations)) or 'none'})")
        if not isinstance(ablations[ablation] or {}, dict):
            raise ConfigError(f"ablations.{ablation}: expected a mapping of dotted keys -> values")
        for key, value in _flatten(ablations[ablation] or {}):
            set_dotted(raw, key, value)
        raw["ablation"] = ablation
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        set_dotted(raw, key.strip(), parse_value(value))
    return raw


def validate(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None


def read_config(path: str | Path) -> dict:
    """A config file's raw mapping (not validated), or one line saying why it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {p}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML: {str(e).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), ablation: str | None = None,
                raw: dict | None = None) -> RunConfig:
    if raw is None:
        raw = read_config(path)
    return validate(resolve_raw(raw, overrides, ablation))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config; the ``ablations`` table is dropped (``ablation`` names the one used)."""
    data = cfg.model_dump(mode="json", exclude={"ablations"})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

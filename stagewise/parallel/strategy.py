"""Training under any strategy, once the Accelerator exists: wrap the model, take guarded optimizer
steps, hand out the weights (full fp32 for export, per parameter for a rollout engine), save and
load (sharded) state.

    strategy = TrainStrategy.create(acc, "zero2", PolicyLogprobs(lm), make_optimizer, make_scheduler,
                                    max_grad_norm=1.0, mixed_precision="bf16")
    for k, mb in enumerate(micro_batches):              # the same number on every rank
        with strategy.accumulate():
            loss = ...
            strategy.backward(loss, last=k == len(micro_batches) - 1)
    info = strategy.step()        # StepInfo(grad_norm=0.7, skipped=False, bad=False)
    weights = strategy.full_state_dict()                # collective; fp32 master weights on rank 0
    reference = strategy.frozen(PolicyLogprobs(ref))   # forward only, held as the weights are (ZeRO-3 / FSDP: 1/N)
    strategy.release()                                  # at the stage's end

It is also the weight source of a stage's rollout engine (generation/engines.py): ``lm``,
``sampling_module(gather=)``, ``named_weights()``, ``lockstep``, ``can_replicate``.

single / ddp / zero1-3 go through ``accelerator.prepare`` (DDP, DeepSpeed); fsdp through
``parallel/fsdp.py`` (torch ``fully_shard``, CPU and GPU alike).

A step is *bad* when a micro-batch loss on any rank, or the gradient norm, is not finite. A bad
step changes nothing — no optimizer update, gradients dropped — and every rank takes the same
decision. Under DeepSpeed its engine steps inside ``backward`` and skips by itself when the
gradient norm is not finite (``bf16.check_grad_overflow``); a non-finite loss on any rank is
first turned into a non-finite gradient on every rank, so DeepSpeed takes the run's decision.
fp16 loss-scale overflows are *skipped* steps but not *bad* ones: they are how loss scaling works.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from stagewise.parallel import fsdp


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step did (the same on every rank)."""

    grad_norm: float  # total norm before clipping (NaN when DeepSpeed did not report one)
    skipped: bool  # no update was applied (a bad step, or an fp16 loss-scale overflow)
    bad: bool  # a non-finite loss or gradient norm: counts toward optim.max_bad_steps


@dataclass
class TrainStrategy:
    acc: Any
    name: str  # single | ddp | fsdp | zero1 | zero2 | zero3
    model: torch.nn.Module  # what the loop calls: the prepared module (DDP / DeepSpeed) or the sharded one
    optimizer: Any
    scheduler: Any
    max_grad_norm: float  # 0 = no clipping (the norm is still measured)
    _bad_local: torch.Tensor | None = field(default=None, repr=False)  # non-finite loss seen this step
    _bad_any: bool = False  # ... on any rank (decided at the last micro-batch)
    _ds_skipped: int = 0
    _frozen_engines: list = field(default_factory=list, repr=False)  # DeepSpeed engines of frozen()
    partitioned_at_load: bool = False  # the module was created partitioned (ZeRO-3 zero.Init), never whole

    @classmethod
    def create(cls, acc, strategy: str, module: torch.nn.Module, make_optimizer: Callable, make_scheduler: Callable,
               *, max_grad_norm: float, mixed_precision: str) -> TrainStrategy:
        """module: a ``PolicyLogprobs`` (the HF model is ``module.lm``). A fresh optimizer each call."""
        if strategy == "fsdp":
            fsdp.shard_model(module, device=acc.device, world=acc.num_processes, mixed_precision=mixed_precision)
            optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
            # model and optimizer are checkpointed by fsdp.save; accelerate keeps the schedule and RNG
            scheduler = acc.prepare_scheduler(make_scheduler(optimizer))
            model = module
        else:
            optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
            model, optimizer, scheduler = acc.prepare(module, optimizer, make_scheduler(optimizer))
        model.train()
        made = cls(acc, strategy, model, optimizer, scheduler, max_grad_norm)
        made._ds_skipped = getattr(model, "skipped_steps", 0)
        return made

    # --- the modules -----------------------------------------------------------------------
    @property
    def deepspeed(self) -> bool:
        return self.name.startswith("zero")

    @property
    def policy(self) -> torch.nn.Module:
        """The PolicyLogprobs module, with accelerate's autocast wrapper left in place (never strip it:
        ``unwrap_model(keep_fp32_wrapper=False)`` removes autocast from the training forward for good)."""
        if self.name == "fsdp":
            return self.model
        return self.acc.unwrap_model(self.model, keep_fp32_wrapper=True)

    @property
    def lm(self) -> torch.nn.Module:
        """The HF causal LM being trained (sampling and export use it)."""
        return self.policy.lm

    @property
    def is_lora(self) -> bool:
        return hasattr(self.lm, "peft_config")

    @contextmanager
    def lm_for_direct_calls(self):
        """The HF model, ready to be called directly (sampling): under FSDP its root unit is gathered."""
        if self.name == "fsdp":
            with fsdp.unsharded_root(self.model):
                yield self.lm
        else:
            yield self.lm

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @contextmanager
    def sampling_module(self, gather: bool = True):
        """The HF model with the current weights, in eval mode, under the run's autocast, for sampling.
        gather (ZeRO-3 / FSDP): every parameter gathered once for the whole block, so decoding is no
        collective (otherwise each layer gathers itself in every forward: once per decoded token)."""
        self.model.eval()
        try:
            with self.acc.autocast(), self._gathered(gather), self.lm_for_direct_calls() as lm:
                yield lm
        finally:
            self.model.train()

    @contextmanager
    def _gathered(self, gather: bool):
        if gather and self.name == "zero3":
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            with unwrap_model_for_generation(self.model):  # DeepSpeed's own (hooks off, params whole)
                yield
        elif gather and self.name == "fsdp":
            with fsdp.unsharded(self.model):
                yield
        else:
            yield

    @property
    def can_replicate(self) -> bool:
        """Whether a bf16 copy of the module may stand in for it when sampling: a whole, plain model
        (single / DDP, no LoRA) with fp32 weights trained under bf16 compute."""
        fp32 = next(self.lm.parameters()).dtype == torch.float32
        return self.name in ("single", "ddp") and not self.is_lora and fp32 and self.acc.mixed_precision == "bf16"

    @property
    def lockstep(self) -> bool:
        """Whether every forward is a collective (parameters gathered inside it): ranks must run the
        same number of forwards while decoding."""
        return self.acc.num_processes > 1 and self.name in ("zero3", "fsdp")

    # --- one optimizer step ------------------------------------------------------------------
    def accumulate(self):
        return self.acc.accumulate(self.model)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Backward of one micro-batch loss; ``last`` marks the step's final micro-batch."""
        if last != self.acc.sync_gradients:
            raise RuntimeError(f"micro-batch bookkeeping out of step with accelerate (last={last}, "
                               f"sync_gradients={self.acc.sync_gradients})")
        bad = ~torch.isfinite(loss.detach()).reshape(1)
        self._bad_local = bad if self._bad_local is None else self._bad_local | bad
        if last:
            votes = self.acc.reduce(self._bad_local.float(), reduction="sum")
            self._bad_any = bool(votes.item() > 0)
            if self._bad_any and self.deepspeed:
                loss = loss * float("nan")  # DeepSpeed's overflow check then skips on every rank
        self.acc.backward(loss)

    def step(self) -> StepInfo:
        """At the end of the step's micro-batches: clip, update unless the step is bad, clear gradients."""
        bad, skipped = self._bad_any, False
        if self.deepspeed:  # the DeepSpeed engine stepped (or skipped) inside the last backward
            skipped = self.model.skipped_steps != self._ds_skipped
            self._ds_skipped = self.model.skipped_steps
            norm = self.model.get_global_grad_norm()
            norm = float("nan") if norm is None else float(norm)
            if bad and not skipped:
                raise RuntimeError("DeepSpeed applied an update to a step with a non-finite loss; "
                                   "keep bf16.check_grad_overflow enabled in the DeepSpeed config")
            fp16_overflow = skipped and self.acc.mixed_precision == "fp16" and not bad
            bad = bad or (skipped and not fp16_overflow)
        else:
            norm = self._clip_and_measure()
            if self.acc.scaler is not None:  # fp16 on GPU: the scaler decides and adapts its scale
                if not bad:
                    self.optimizer.step()
                    skipped = self.optimizer.step_was_skipped
            else:
                bad = bad or not math.isfinite(norm)
                if not bad:
                    self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_local, self._bad_any = None, False
        return StepInfo(grad_norm=norm, skipped=bad or skipped, bad=bad)

    def _clip_and_measure(self) -> float:
        """Total gradient norm before clipping (identical on every rank: gradients are reduced)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        if self.name == "fsdp":
            total = torch.nn.utils.clip_grad_norm_(params, max_norm)
            total = total.full_tensor() if hasattr(total, "full_tensor") else total
        else:  # accelerate unscales fp16 gradients first
            total = self.acc.clip_grad_norm_(params, max_norm)
        return float(total)

    # --- weights -------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective. The HF model's weights as trained — fp32 master weights under every strategy
        (DeepSpeed keeps them in its optimizer, FSDP in its shards) — on rank 0; {} elsewhere."""
        lm = self.lm
        if self.name == "fsdp":
            sd = fsdp.full_state_dict(self.model)
        elif self.deepspeed:
            sd = _deepspeed_full_state_dict(lm, zero3=self.name == "zero3", keep=self.acc.is_main_process)
        else:
            sd = {k: v.detach().cpu() for k, v in lm.state_dict().items()}
        return sd if self.acc.is_main_process else {}

    def master_dtype(self) -> torch.dtype:
        """Collective under DeepSpeed. The dtype the optimizer updates (fp32 master weights)."""
        p = next(p for p in self.lm.parameters() if p.requires_grad)
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            hp = safe_get_full_fp32_param(p)
            return p.dtype if hp is None else hp.dtype
        return p.dtype

    def param_fraction(self, module: torch.nn.Module | None = None) -> float:
        """The fraction of the parameters (of ``module``, default the trained one) this rank holds
        (1/N when sharded, 1 otherwise)."""
        local = total = 0
        for p in (module or self.model).parameters():
            total += getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps a 1/N shard in p.ds_tensor
            if hasattr(p, "ds_tensor"):
                local += p.ds_tensor.numel()
            elif hasattr(p, "to_local"):  # FSDP2 DTensor
                local += p.to_local().numel()
            else:
                local += p.numel()
        return local / max(total, 1)

    def release(self) -> None:
        """At the end of the stage: the engines, optimizer and accelerator state freed (DeepSpeed's
        destroyed)."""
        while self._frozen_engines:
            self._frozen_engines.pop().destroy()
        self.acc.free_memory()

    def frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A module for forward passes only (the KL reference: a wrapper whose ``.lm`` is the HF
        model, called as a whole), held as this strategy holds weights: under ZeRO-3 partitioned over
        the ranks by an optimizer-less DeepSpeed engine (as TRL prepares its reference), under FSDP
        sharded by fully_shard like the trained model, so it costs 1/N of a copy per GPU and each
        forward is a collective; otherwise a whole copy on this device. Returns the module to call."""
        module.requires_grad_(False)
        if self.name == "fsdp":
            # its dtype is the one it was loaded in (bf16 under bf16 compute): no cast policy
            return fsdp.shard_model(module, device=self.device, world=self.acc.num_processes,
                                    mixed_precision="no").eval()
        if self.name != "zero3":
            return module.to(self.device).eval()
        import deepspeed

        config = copy.deepcopy(self.acc.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()
        self._frozen_engines.append(engine)  # kept alive (and destroyed) with the strategy
        return engine.module

    @contextmanager
    def compute_dtype_probe(self, record: dict):
        """Record the dtype a Linear layer computes in during the training forward (``record['dtype']``)."""
        linear = next((m for m in self.lm.modules() if isinstance(m, torch.nn.Linear)), None)
        if linear is None:
            yield
            return
        def hook(module, inputs, output):  # returns None: the output is left as it is
            record.setdefault("dtype", output.dtype)

        handle = linear.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's current weights under their HF names; LoRA adapters merged into their base
        weights on the fly (W + scale * B @ A), the module itself left untouched. Tied weights are given
        under every name (``lm_head.weight`` too): vLLM's CPU backend repacks the output layer into its
        own tensor, which a push of ``embed_tokens`` alone leaves stale.

        ZeRO-3 / FSDP: each parameter is gathered when the rollout engine asks for it and freed after, so no
        rank ever holds more than one full parameter beyond its shard; every rank's rollout engine consumes the
        names in the same order, so the gathers (collectives) match."""
        lm = self.lm
        with torch.no_grad():
            if not self.is_lora:
                for name, p in lm.named_parameters(remove_duplicate=False):
                    if self.name == "zero3":
                        from deepspeed.runtime.zero import GatheredParameters

                        with GatheredParameters([p]):
                            full = p.data.detach().clone()
                        yield name, full
                    elif self.name == "fsdp" and hasattr(p, "full_tensor"):
                        yield name, p.full_tensor().detach()
                    else:
                        yield name, p.detach()
                return
            from peft.tuners.lora import LoraLayer

            base = lm.get_base_model()
            wrapped = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
            for name, p in base.named_parameters(remove_duplicate=False):
                if "lora_" in name:
                    continue
                if ".base_layer." not in name:
                    yield name, p.detach()
                    continue
                module = name.split(".base_layer.")[0]
                w = p.detach()
                if name.endswith(".weight"):
                    layer = wrapped[module]
                    for adapter in layer.active_adapters:
                        w = w + layer.get_delta_weight(adapter).to(w.dtype)
                yield name.replace(".base_layer", ""), w

    # --- checkpoints ---------------------------------------------------------------------------
    def save_state(self, directory: str | Path) -> None:
        """Collective: everything needed to continue (model, optimizer, schedule, RNG); the step
        counters go into the manifest (checkpoint.save_checkpoint)."""
        if self.name == "fsdp":
            fsdp.save(self.model, self.optimizer, directory)
        self.acc.save_state(str(directory))

    def load_state(self, directory: str | Path) -> None:
        if self.name == "fsdp":
            fsdp.load(self.model, self.optimizer, directory)
        self.acc.load_state(str(directory))
        self._ds_skipped = getattr(self.model, "skipped_steps", 0)


def _deepspeed_full_state_dict(lm, *, zero3: bool, keep: bool) -> dict[str, torch.Tensor]:
    """Every rank walks the parameters in the same order (each fetch is a collective)."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param

    keys = set(lm.state_dict().keys())  # under ZeRO-3 the values are empty shards; the names are right
    out: dict[str, torch.Tensor] = {}
    for name, p in lm.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:  # frozen (e.g. LoRA's base weights): not in the optimizer, take the module's copy
            with GatheredParameters([p], enabled=zero3):
                full = p.data.detach().clone()
        if keep:
            out[name] = full.detach().cpu().clone()
    if keep:
        for name, b in lm.named_buffers():
            if name in keys:
                out[name] = b.detach().cpu().clone()
    return out

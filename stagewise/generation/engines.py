"""Rollout engines: token ids in, sampled token ids out, always with the current weights. One
contract for training rollouts and evaluation; chosen by name (``rollout.engine``, registry
``rollout_engine``):

    engine = lookup("rollout_engine", "local")(weights, tokenizer=tok, rollout=cfg.rollout, seed=cfg.seed,
                                               model_path=init_path)     # once per stage / evaluation
    with engine.generator() as gen:              # the weights as they are now, for the whole block
        out = gen.generate([[1, 2, 3], [4, 5]], n=8, seeds=[...16 ints...], params=SamplingParams(...))
        out.tokens[i], out.finished[i]           # row i = prompt i // n, sample i % n
    engine.timings                               # what the last generator() cost, e.g. {"weight_push_time": 0.3}

``weights`` is a weight source: the training strategy (``parallel/strategy.TrainStrategy``) in a
stage, ``FrozenWeights(model)`` in an evaluation. It provides ``device``, ``lockstep`` (every forward
is a collective: ZeRO-3 / FSDP), ``name`` and ``is_lora`` (the strategy that holds the weights:
single, ddp, zero3, ...), ``lm`` (the HF model), ``can_replicate`` (a bf16 copy may stand in
for it when sampling), ``sampling_module()`` (a context manager: the module to decode with) and
``named_weights()`` (full tensors under their HF names, for an engine that holds its own copy).

A generator (what ``generator()`` yields) is token-in / token-out: episodes are extended turn by
turn as token sequences and never re-tokenised from text, so the tokens trained on are exactly
those sampled. Every engine honours one seed per completion (the same completions for any batch
composition, any number of processes, and across resume) and stops at the given token ids; its
``context`` is the model's length limit and ``all_done`` the lockstep agreement hook (None unless
lockstep). ``local`` is our KV-cache sampler; ``vllm`` (generation/vllm_engine.py) an in-process
vLLM engine fed the current weights at the start of each block.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from stagewise.generation.padding import left_pad
from stagewise.generation.prefix_store import PrefixStore
from stagewise.generation.sampling import sample


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Generation:
    tokens: list[list[int]]  # per completion, up to and including the stop token when one was hit
    finished: list[bool]  # hit a stop token within max_new_tokens
    # per completion, the log-probability of each sampled token under the distribution it was drawn
    # from (engines that report it: vLLM); None otherwise
    logprobs: list[list[float]] | None = None


def lockstep_hook(device) -> Callable[[bool], bool]:
    """Under ZeRO-3 / FSDP all ranks must decode the same number of steps (the synced_gpus role):
    ``all_done(nothing_left_here)`` is True on every rank once it is True on all of them (collective)."""
    from stagewise.parallel.collectives import reduce_sum

    def all_done(local: bool) -> bool:
        flag = torch.tensor([0.0 if local else 1.0], device=device)
        return bool(reduce_sum(flag).item() == 0)

    return all_done


class FrozenWeights:
    """A model whose weights do not change (an evaluation), as a weight source."""

    name = "single"  # the strategy holding the weights: a whole copy in this process
    is_lora = False
    lockstep = False
    can_replicate = False  # it is already in the dtype it is evaluated in

    def __init__(self, model, device):
        self.lm, self.device = model, device

    def sampling_module(self, gather: bool = True):
        return nullcontext(self.lm)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        with torch.no_grad():
            for name, p in self.lm.named_parameters(remove_duplicate=False):
                yield name, p.detach()


class LocalGenerator:
    """Our sampler (``generation.sampling.sample``) over a model in this process, its weights fixed
    for the generator's life: long prompts' caches are kept between calls (``prefix_cache_gib``,
    0: off), so a multi-turn episode's next turn prefills only what was added since its last, and a
    shared system prompt is computed once.

    lockstep (ZeRO-3 / FSDP): parameters are gathered inside forward, so every rank must run the
    same number of forward passes; ``all_done`` is the agreement hook, and a rank with nothing to
    generate still calls ``generate`` with ``prompts=[]`` to join its peers.
    """

    def __init__(self, model, tokenizer, *, device, all_done: Callable[[bool], bool] | None = None,
                 prefix_cache_gib: float = 1.0):
        self.model, self.tokenizer, self.device, self.all_done = model, tokenizer, device, all_done
        self.context = context_length(model)
        self.prefix_store = PrefixStore(int(prefix_cache_gib * 2**30)) if prefix_cache_gib > 0 else None

    def generate(self, prompts: list[list[int]], *, n: int, seeds: list[int] | None,
                 params: SamplingParams) -> Generation:
        pad = self.tokenizer.pad_token_id
        if not prompts:  # nothing here; under lockstep, decode a dummy row as long as the peers decode
            if self.all_done is not None:
                ids, mask = left_pad([[pad]], pad, self.device)
                sample(self.model, ids, mask, max_new_tokens=params.max_new_tokens, eos_token_ids=[-1],
                       pad_token_id=pad, greedy=True, all_done=lambda _: self.all_done(True))
            return Generation([], [])
        ids, mask = left_pad(prompts, pad, self.device)
        out, cmask, truncated = sample(
            self.model, ids, mask, max_new_tokens=params.max_new_tokens, eos_token_ids=list(params.stop_token_ids),
            pad_token_id=pad, num_samples=n, seeds=None if params.greedy else seeds, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k, greedy=params.greedy, all_done=self.all_done,
            prefix_store=self.prefix_store)
        lengths = cmask.sum(-1).tolist()
        return Generation([out[i, :lengths[i]].tolist() for i in range(out.size(0))], (~truncated).tolist())


class Bf16Replica:
    """A bf16 copy of a module's parameters that holds tensors only while it is in use.

    Decoding is latency-bound: bf16 weights halve memory traffic and skip autocast's per-call weight
    casts (2.1 s vs 3.3 s fp32 for 32 x 24 tokens on the 2-core CPU). The copy's tensors are filled
    from the current weights when a block starts (~50 ms) and freed when it ends, so the replica
    never adds to the training step's peak memory.

    Parameters only: buffers keep the module's own dtype, as ``from_pretrained(dtype=bf16)`` and
    DeepSpeed keep them. A bf16 RoPE ``inv_freq`` would rotate position 5,000 by up to 0.84 rad
    more than the trained model does (tiny Llama; ~6 rad at Qwen3's theta 1e6), and the sampler
    would silently not be the policy on long prompts. The copy is built without ever copying a
    parameter (no second fp32 model on the device, even for a moment).
    """

    def __init__(self, module):
        # deepcopy with every parameter already "copied" as an empty bf16 one: the module's
        # structure, buffers and tied parameters are copied; no parameter tensor is
        memo = {id(p): torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16, device=p.device), requires_grad=False)
                for _, p in module.named_parameters(remove_duplicate=False)}
        self.copy = copy.deepcopy(module, memo).eval()

    @contextmanager
    def filled_from(self, module):
        with torch.no_grad():
            for c, p in zip(self.copy.parameters(), module.parameters()):
                c.data = p.detach().to(torch.bfloat16)
            for c, b in zip(self.copy.buffers(), module.buffers()):
                c.copy_(b)  # as the module holds them now (dtype kept)
        try:
            yield self.copy
        finally:
            self._release()

    def _release(self) -> None:
        for c in self.copy.parameters():
            c.data = torch.empty(0, dtype=torch.bfloat16, device=c.device)


class LocalEngine:
    """``rollout.engine: local``. Samples with the weight source's own module (``rollout.weights:
    policy``, under the run's autocast) or with a bf16 replica of it (``bf16_copy``; ``auto`` picks
    the replica when the source allows one: single / DDP, no LoRA, fp32 weights, bf16 compute)."""

    generator_class = LocalGenerator

    def __init__(self, weights, *, tokenizer, rollout, seed: int, model_path: str):
        self.weights, self.tokenizer = weights, tokenizer
        self.prefix_cache_gib, self.gather = rollout.prefix_cache_gib, rollout.gather_for_sampling
        # lockstep: decoding forwards are collectives unless the whole model is gathered for the block
        self.all_done = lockstep_hook(weights.device) if weights.lockstep and not self.gather else None
        choice = rollout.weights
        if choice == "auto":
            choice = "bf16_copy" if weights.can_replicate else "policy"
        self.replica = Bf16Replica(weights.lm) if choice == "bf16_copy" else None
        self.timings: dict[str, float] = {}

    @contextmanager
    def generator(self) -> Iterator[LocalGenerator]:
        module = (self.replica.filled_from(self.weights.lm) if self.replica
                  else self.weights.sampling_module(gather=self.gather))
        with module as model:
            yield self.generator_class(model, self.tokenizer, device=self.weights.device, all_done=self.all_done,
                                       prefix_cache_gib=self.prefix_cache_gib)


def context_length(model) -> int | None:
    """The model's position limit (max_position_embeddings), through DDP / DeepSpeed / PEFT wrappers."""
    for _ in range(4):
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "max_position_embeddings", None):
            return int(config.max_position_embeddings)
        model = getattr(model, "module", None) or getattr(model, "base_model", None)
        if model is None:
            return None
    return None

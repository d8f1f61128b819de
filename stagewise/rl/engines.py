"""Rollout engines: token ids in, sampled token ids out. Chosen by name (``rollout.engine``).

    engine = lookup("rollout_engine", "local")(model, tokenizer, device=..., all_done=...)
    out = engine.generate([[1, 2, 3], [4, 5]], n=8, seeds=[...16 ints...], params=SamplingParams(...))
    out.tokens[i], out.finished[i]          # row i = prompt i // n, sample i % n

An engine is token-in / token-out: episodes are extended turn by turn as token sequences and are
never re-tokenised from text, so the tokens trained on are exactly those sampled. Every engine
must honour one seed per completion (same completions for any batch composition, any number of
processes, and across resume) and stop at the given token ids. ``local`` is our KV-cache sampler,
built each step around the current weights; ``vllm`` (rl/vllm_engine.py) lives for the run and has
the current weights pushed into it before each step (a class with ``before_rollout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from stagewise.registry import register
from stagewise.rl.prefix_store import PrefixStore
from stagewise.rl.sampling import sample


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


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (N, P) left-padded with pad_id, mask (N, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class LocalEngine:
    """Our sampler (``stagewise.rl.sampling.sample``) over a model in this process.

    lockstep (ZeRO-3 / FSDP): parameters are gathered inside forward, so every rank must run the
    same number of forward passes; ``all_done`` is the agreement hook, and a rank with nothing to
    generate still calls ``generate`` with ``prompts=[]`` to join its peers.

    An engine is built around fixed weights (one rollout phase, one evaluation), so it keeps long
    prompts' caches between calls (``prefix_cache_gib``, 0: off): a multi-turn episode's next turn
    prefills only what was added since its last, and a shared system prompt is computed once.
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


register("rollout_engine", "local")(LocalEngine)


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

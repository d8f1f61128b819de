"""Held-out accuracy of a domain under greedy decoding (the accuracy matrix) and held-out loss of its
answers (the loss matrix, for SFT)."""

from __future__ import annotations

from typing import Callable

import torch

from stagewise.domains import Domain
from stagewise.rl.engines import LocalEngine, SamplingParams
from stagewise.rl.episodes import EpisodeLimits, run_episodes
from stagewise.rl.prompts import eos_ids


@torch.no_grad()
def evaluate_domain(model, tokenizer, domain: Domain, *, max_new_tokens: int, batch_size: int,
                    rank: int = 0, world: int = 1, device="cpu",
                    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    all_done: Callable[[bool], bool] | None = None,
                    limits: EpisodeLimits | None = None) -> tuple[float, list[dict]]:
    """Greedy episodes on this process's share of ``domain.eval``; returns (global success rate, samples).

    A single-turn domain's episode is one greedy completion scored by its metric; an environment's
    is run to the end (tools, user) under ``limits`` and counts when its metric part reaches 1.0.
    Every process runs the same number of batches (its share is padded with a repeat of the last
    example, not counted) so collectives inside generation stay in step across ranks.
    """
    examples = domain.eval[rank::world]
    n_batches = -(-len(domain.eval[0::world]) // batch_size)
    engine = LocalEngine(model, tokenizer, device=device, all_done=all_done)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_token_ids=tuple(eos_ids(tokenizer)))
    if limits is None or domain.environment is None:  # a single-turn task: one turn of max_new_tokens
        limits = EpisodeLimits(max_tokens=max_new_tokens)
    correct = torch.zeros(2, dtype=torch.float64)
    samples = []
    for i in range(n_batches):
        chunk = examples[i * batch_size:(i + 1) * batch_size]
        real = len(chunk)
        chunk = chunk + [domain.eval[0]] * (max(1, real) - real)
        eps = run_episodes(engine, tokenizer, [(domain, ex) for ex in chunk], group_size=1, seeds=None,
                           params=params, limits=limits, all_done=all_done)
        for e in eps[:real]:
            ok = domain.succeeded(e.parts)
            correct += torch.tensor([float(ok), 1.0], dtype=torch.float64)
            if len(samples) < 5:
                samples.append({"prompt": e.task.get("prompt", e.opening[-1]["content"]), "completion": e.transcript(),
                                "answer": e.task.get("answer"), "correct": ok, "turns": e.turns})
    if reduce_sum is not None:
        correct = reduce_sum(correct)
    return float(correct[0] / max(correct[1], 1.0)), samples


@torch.no_grad()
def held_out_loss(model, tokenizer, domain: Domain, *, max_len: int, rows_per_batch: int = 8, rank: int = 0,
                  world: int = 1, device="cpu",
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
    """Token-mean NLL of the assistant answers of ``domain.eval`` (this process's share, packed), summed
    over processes; None when no held-out conversation fits in max_len. exp() of it is the perplexity."""
    from stagewise.sft.data import pack, tokenize_conversation
    from stagewise.sft.loss import SFTLoss, collate

    if domain.environment is not None and not all("messages" in ex for ex in domain.eval):
        return None  # an environment's tasks carry no reference conversation to score
    examples = [tokenize_conversation(tokenizer, Domain.conversation(ex), max_len) for ex in domain.eval[rank::world]]
    rows = pack([e for e in examples if e is not None], max_len)
    loss_of = SFTLoss(model)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(rows), rows_per_batch):
        nll = loss_of(**collate(rows[i:i + rows_per_batch], tokenizer.pad_token_id, device))
        total += torch.tensor([nll.double().sum().item(), float(nll.numel())], dtype=torch.float64)
    if reduce_sum is not None:
        total = reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else None

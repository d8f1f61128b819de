"""Held-out accuracy of a domain under greedy decoding (the accuracy matrix) and held-out loss of its
answers (the loss matrix, for SFT)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from stagewise.domains import Domain
from stagewise.rl.engines import LocalEngine, SamplingParams
from stagewise.rl.episodes import EpisodeLimits, run_episodes
from stagewise.rl.prompts import eos_ids


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    """tau-bench's pass^k for one task: the chance that k of its n trials, drawn without replacement,
    all succeed, C(c, k) / C(n, k) (an unbiased estimate of p^k; k=1 is the success rate)."""
    return math.comb(successes, k) / math.comb(trials, k) if k <= trials else float("nan")


@torch.no_grad()
def evaluate_domain(model, tokenizer, domain: Domain, *, max_new_tokens: int, batch_size: int,
                    rank: int = 0, world: int = 1, device="cpu",
                    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    all_done: Callable[[bool], bool] | None = None,
                    limits: EpisodeLimits | None = None, trials: int = 1, temperature: float = 1.0,
                    seed: int = 0, prefix_cache_gib: float = 1.0,
                    engine=None) -> tuple[float, list[dict], dict[int, float]]:
    """Episodes on this process's share of ``domain.eval``; returns (global success rate = pass^1,
    samples, {k: pass^k for k = 1..trials}).

    trials=1: one greedy episode per task. trials=n > 1: n sampled episodes per task (temperature;
    seeds from (seed, task index, trial), so any process count draws the same ones), and pass^k
    as tau-bench defines it. A single-turn domain's episode is one completion scored by its metric;
    an environment's is run to the end (tools, user) under ``limits`` and counts when its metric part
    reaches 1.0. Every process runs the same number of batches (its share is padded with a repeat
    of the last example, not counted) so collectives inside generation stay in step across ranks.
    engine: a rollout engine holding ``model``'s weights (vLLM); None: our sampler over ``model``.
    """
    examples = domain.eval[rank::world]
    per_batch = max(1, batch_size // trials)  # tasks per batch: batch_size episodes
    n_batches = -(-len(domain.eval[0::world]) // per_batch)
    if engine is None:
        engine = LocalEngine(model, tokenizer, device=device, all_done=all_done, prefix_cache_gib=prefix_cache_gib)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=trials == 1, temperature=temperature,
                            stop_token_ids=tuple(eos_ids(tokenizer)))
    if limits is None or domain.environment is None:  # a single-turn task: one turn of max_new_tokens
        limits = EpisodeLimits(max_tokens=max_new_tokens)
    # [successful episodes, episodes, sum over tasks of pass^k for k = 1..trials, tasks]
    totals = torch.zeros(3 + trials, dtype=torch.float64)
    samples = []
    for i in range(n_batches):
        chunk = examples[i * per_batch:(i + 1) * per_batch]
        real = len(chunk)
        chunk = chunk + [domain.eval[0]] * (max(1, real) - real)
        index = [rank + world * (i * per_batch + j) for j in range(len(chunk))]  # the tasks' places in domain.eval
        seeds = None if trials == 1 else [(seed * 1_000_003 + x * 7_919 + t) % 2**61 for x in index for t in range(trials)]
        eps = run_episodes(engine, tokenizer, [(domain, ex) for ex in chunk], group_size=trials, seeds=seeds,
                           params=params, limits=limits, all_done=all_done)
        for j in range(real):
            group = eps[j * trials:(j + 1) * trials]
            wins = [domain.succeeded(e.parts) for e in group]
            totals[0] += sum(wins)
            totals[1] += trials
            totals[2:2 + trials] += torch.tensor([pass_hat_k(sum(wins), trials, k) for k in range(1, trials + 1)],
                                                 dtype=torch.float64)
            totals[-1] += 1
            for e, ok in zip(group, wins):
                if len(samples) < 5:
                    samples.append({"prompt": e.task.get("prompt", e.opening[-1]["content"]),
                                    "completion": e.transcript(), "answer": e.task.get("answer"), "correct": ok,
                                    "turns": e.turns})
    if reduce_sum is not None:
        totals = reduce_sum(totals)
    tasks = max(float(totals[-1]), 1.0)
    return (float(totals[0] / max(totals[1], 1.0)), samples,
            {k: float(totals[1 + k] / tasks) for k in range(1, trials + 1)})


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

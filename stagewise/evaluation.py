"""Held-out accuracy of a domain under greedy decoding (the evaluator behind the accuracy matrix)."""

from __future__ import annotations

from typing import Callable

import torch

from stagewise.domains import Domain
from stagewise.rl.prompts import encode_prompts, eos_ids
from stagewise.rl.sampling import sample


@torch.no_grad()
def evaluate_domain(model, tokenizer, domain: Domain, *, max_new_tokens: int, batch_size: int,
                    rank: int = 0, world: int = 1, device="cpu",
                    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    all_done: Callable[[bool], bool] | None = None) -> tuple[float, list[dict]]:
    """Greedy-decode this process's share of ``domain.eval``; returns (global accuracy, samples).

    Every process runs the same number of batches (its share is padded with a repeat of the last
    example, not counted) so collectives inside generation stay in step across ranks.
    """
    examples = domain.eval[rank::world]
    n_batches = -(-len(domain.eval[0::world]) // batch_size)
    correct = torch.zeros(2, dtype=torch.float64)
    samples = []
    for i in range(n_batches):
        chunk = examples[i * batch_size:(i + 1) * batch_size]
        real = len(chunk)
        chunk = chunk + [domain.eval[0]] * (max(1, real) - real)
        ids, mask = encode_prompts(tokenizer, [e["prompt"] for e in chunk], device)
        out, cmask, _ = sample(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids(tokenizer),
                               pad_token_id=tokenizer.pad_token_id, greedy=True, all_done=all_done)
        for j in range(real):
            text = tokenizer.decode(out[j][cmask[j].bool()], skip_special_tokens=True)
            ok = domain.correct(text, chunk[j])
            correct += torch.tensor([float(ok), 1.0], dtype=torch.float64)
            if len(samples) < 5:
                samples.append({"prompt": chunk[j]["prompt"], "completion": text, "answer": chunk[j]["answer"], "correct": ok})
    if reduce_sum is not None:
        correct = reduce_sum(correct)
    return float(correct[0] / max(correct[1], 1.0)), samples

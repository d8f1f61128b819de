"""Held-out accuracy of a domain under greedy decoding (the accuracy matrix) and held-out loss of its
answers (the loss matrix, for SFT)."""

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


@torch.no_grad()
def held_out_loss(model, tokenizer, domain: Domain, *, max_len: int, rows_per_batch: int = 8, rank: int = 0,
                  world: int = 1, device="cpu",
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
    """Token-mean NLL of the assistant answers of ``domain.eval`` (this process's share, packed), summed
    over processes; None when no held-out conversation fits in max_len. exp() of it is the perplexity."""
    from stagewise.sft.data import pack, tokenize_conversation
    from stagewise.sft.loss import SFTLoss, collate

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

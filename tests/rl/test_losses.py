import math

import torch

from stagewise.registry import lookup
from stagewise.rl import losses  # noqa: F401
from stagewise.rl.losses import k3_kl, per_token_loss


def test_k3_hand_computed():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    # d = ref - logp = log(0.5): exp(d) - d - 1 = 0.5 + log 2 - 1
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([[0.5 + math.log(2) - 1, 0.0]]), atol=1e-6)


def test_clipped_surrogate_hand_computed():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.5, 0.25]]))  # ratios 1.5, 1, 0.5
    # A > 0: min(r A, clip(r) A) with eps_low .2, eps_high .28: 1.28, 1.0, 0.5
    loss, st = per_token_loss(new, old, torch.tensor([2.0]), epsilon_low=0.2, epsilon_high=0.28)
    assert torch.allclose(loss, -2 * torch.tensor([[1.28, 1.0, 0.5]]), atol=1e-6)
    assert st["clipped"].tolist() == [[1.0, 0.0, 0.0]]
    # A < 0: max-clipped from below: r=0.5 -> clip 0.8 -> -(0.8*-1)... min(rA, cA) = min(-0.5, -0.8) = -0.8
    loss, st = per_token_loss(new, old, torch.tensor([-1.0]), epsilon_low=0.2, epsilon_high=0.28)
    assert torch.allclose(loss, torch.tensor([[1.5, 1.0, 0.8]]), atol=1e-6)
    assert st["clipped"].tolist() == [[0.0, 0.0, 1.0]]


def test_no_old_logp_means_ratio_one_and_grad_of_logp():
    logp = torch.log(torch.tensor([[0.2, 0.4]])).requires_grad_()
    loss, _ = per_token_loss(logp, None, torch.tensor([3.0]), epsilon_low=0.2, epsilon_high=0.2)
    assert torch.allclose(loss, torch.tensor([[-3.0, -3.0]]))
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-3.0, -3.0]]))


def test_kl_term_added_with_beta():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, st = per_token_loss(logp, None, torch.tensor([0.0]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1, ref_logp=ref)
    assert torch.allclose(loss, 0.1 * torch.tensor([[0.5 + math.log(2) - 1]]), atol=1e-6)
    assert "kl" in st


LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0],
                     [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0],
                     [1.0, 0.0, 0.0, 0.0]])


def test_aggregations_hand_computed():
    kw = dict(num_sequences=2, num_tokens=4, max_len=5)
    assert lookup("loss", "grpo")(LOSS, MASK, **kw).item() == (2.0 + 4.0) / 2          # per-seq means 2 and 4
    assert lookup("loss", "dapo")(LOSS, MASK, **kw).item() == 10.0 / 4                 # token mean
    assert lookup("loss", "dr_grpo")(LOSS, MASK, **kw).item() == 10.0 / (2 * 5)        # / (B * max_len)


def test_aggregations_split_into_micro_batches_sum_to_whole():
    kw = dict(num_sequences=2, num_tokens=4, max_len=5)
    for name in ("grpo", "dapo", "dr_grpo"):
        f = lookup("loss", name)
        whole = f(LOSS, MASK, **kw)
        parts = f(LOSS[:1], MASK[:1], **kw) + f(LOSS[1:], MASK[1:], **kw)
        assert torch.allclose(whole, parts), name

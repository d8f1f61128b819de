import math

import pytest
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
    loss, st = per_token_loss(logp, None, torch.tensor([0.0]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                              ref_logp=ref)
    assert torch.allclose(loss, 0.1 * torch.tensor([[0.5 + math.log(2) - 1]]), atol=1e-6)
    assert "kl" in st


LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0],
                     [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0],
                     [1.0, 0.0, 0.0, 0.0]])


def test_aggregations_hand_computed():
    kw = dict(num_sequences=2, num_tokens=4, num_rows=2, max_len=5)
    assert lookup("loss", "grpo")(LOSS, MASK, **kw).item() == (2.0 + 4.0) / 2          # per-seq means 2 and 4
    assert lookup("loss", "dapo")(LOSS, MASK, **kw).item() == 10.0 / 4                 # token mean
    assert lookup("loss", "dr_grpo")(LOSS, MASK, **kw).item() == 10.0 / (2 * 5)        # / (B * max_len)


def test_aggregations_split_into_micro_batches_sum_to_whole():
    kw = dict(num_sequences=2, num_tokens=4, num_rows=2, max_len=5)
    for name in ("grpo", "dapo", "dr_grpo"):
        f = lookup("loss", name)
        whole = f(LOSS, MASK, **kw)
        parts = f(LOSS[:1], MASK[:1], **kw) + f(LOSS[1:], MASK[1:], **kw)
        assert torch.allclose(whole, parts), name


def test_dr_grpo_normaliser_stays_constant_when_rows_are_masked():
    """Dr. GRPO divides by (all rows x max_new_tokens) even when rows are dropped (zero-variance
    groups, truncated completions); grpo and dapo count only what enters the loss."""
    mask = MASK.clone()
    mask[1] = 0  # the second row is dropped whole
    kw = dict(num_sequences=1, num_tokens=3, num_rows=2, max_len=5)
    assert lookup("loss", "dr_grpo")(LOSS, mask, **kw).item() == pytest.approx(6.0 / (2 * 5))
    assert lookup("loss", "grpo")(LOSS, mask, **kw).item() == 2.0
    assert lookup("loss", "dapo")(LOSS, mask, **kw).item() == pytest.approx(6.0 / 3)


def test_inf_and_nan_at_masked_positions_reach_neither_loss_nor_gradient():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[math.log(0.5), math.log(0.25), -math.inf]], requires_grad=True)
    old = torch.tensor([[math.log(0.5), math.log(0.5), float("nan")]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25), math.inf]])
    tok, st = per_token_loss(logp, old, torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                             ref_logp=ref, mask=mask)
    for name in ("grpo", "dr_grpo", "dapo"):
        loss = lookup("loss", name)(tok, mask, num_sequences=1, num_tokens=2, num_rows=1, max_len=3)
        assert torch.isfinite(loss), name
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    # the unmasked positions are exactly what they are without the masked one
    ref_tok, _ = per_token_loss(logp[:, :2].detach(), old[:, :2], torch.tensor([1.0]), epsilon_low=0.2,
                                epsilon_high=0.2, beta=0.1, ref_logp=ref[:, :2])
    assert torch.allclose(tok[:, :2], ref_tok)
    # without the mask the same inputs poison the loss (what masking protects against)
    bad, _ = per_token_loss(logp.detach(), old, torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                            ref_logp=ref)
    assert not torch.isfinite((bad * mask).sum())


def test_kl_ratio_weighting_matches_trl_bias_corrected_kl():
    """TRL's default (use_bias_correction_kl) multiplies k3 by the differentiable ratio pi/pi_old: on
    policy the value is unchanged but the gradient gains kl * d(ratio)/d(logp) = kl."""
    logp0, ref = math.log(0.5), torch.tensor([[math.log(0.25)]])
    kl = 0.5 + math.log(2) - 1  # k3 at d = ref - logp = log 0.5
    grads = {}
    for weighted in (False, True):
        logp = torch.tensor([[logp0]], requires_grad=True)
        loss, _ = per_token_loss(logp, None, torch.tensor([0.0]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                                 ref_logp=ref, kl_ratio_weighted=weighted)
        assert loss.item() == pytest.approx(0.1 * kl)
        loss.sum().backward()
        grads[weighted] = logp.grad.item()
    # d k3 / d logp = 1 - exp(ref - logp) = 0.5
    assert grads[False] == pytest.approx(0.1 * 0.5)
    assert grads[True] == pytest.approx(0.1 * (0.5 + kl))


def test_engine_mismatch_weights_hand_computed():
    """TIS: weight = min(exp(trainer - engine), cap) on the masked tokens, 1 elsewhere (even where
    the log-probs are garbage); the gap is |trainer - engine| there and 0 elsewhere."""
    from stagewise.rl.losses import engine_mismatch

    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, float("nan"), 0.0]])
    engine = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -2.0, float("-inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w, gap = engine_mismatch(trainer, engine, mask, cap=1.5)
    expected = torch.tensor([[min(math.exp(0.5), 1.5), math.exp(-1.0), 1.0], [math.exp(-2.0), 1.0, 1.0]])
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(gap, torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]]))
    w_off, _ = engine_mismatch(trainer, engine, mask, cap=None)
    assert torch.equal(w_off, torch.ones(2, 3))
    assert not w.requires_grad

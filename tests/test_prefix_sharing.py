"""The prefix tree of a micro-batch: which rows share which prefix (hand-worked), the packed layout,
the tails' attention against the masked reference (values and gradients), and the refusals that
keep a wrong attention from reading the packed rows."""

from __future__ import annotations

import pytest
import torch

from stagewise.prefix_sharing import PrefixTailAttention, pack_rows, prefix_groups, shared_prefix_hidden


def test_rows_of_two_domains_get_one_prefix_each():
    airline, retail = list(range(100, 140)), list(range(200, 230))
    rows = [airline + [1, 2], retail + [3], airline + [4], retail + [5, 6, 7], airline + [8, 9, 9]]
    plan = sorted((L, sorted(r)) for L, r in prefix_groups(rows))
    assert plan == [(30, [1, 3]), (40, [0, 2, 4])]


def test_a_longer_shared_prompt_wins_over_a_shorter_common_opening_only_when_it_saves_more():
    opening = list(range(10))
    a, b = opening + [50] * 20, opening + [60] * 20
    # two groups of 3 sharing 30 tokens save 2 x (2 x 30) = 120; one group of 6 sharing 10 saves 50
    plan = prefix_groups([a + [1], a + [2], a + [3], b + [4], b + [5], b + [6]])
    assert sorted(L for L, _ in plan) == [30, 30]
    # prompts of one token after the opening: the opening once for all six saves 5 x 10 > 2 x (2 x 11)
    plan = prefix_groups([opening + [50, k] for k in range(3)] + [opening + [60, k] for k in range(3)])
    assert [(L, sorted(r)) for L, r in plan] == [(10, [0, 1, 2, 3, 4, 5])]


def test_every_row_keeps_a_tail_and_is_packed_at_its_own_positions():
    ids = torch.tensor([[7, 8, 9, 0], [7, 8, 0, 0], [5, 6, 7, 8]])
    lengths = [3, 2, 4]
    packed, positions, place, tree = pack_rows(ids, lengths)
    assert tree.length == packed.size(1) == 1 + 2 + 1 + 3 + 1  # [7] [8 9] [8] | [5 6 7] [8]
    for r, n in enumerate(lengths):
        assert packed[0, place[r, :n]].tolist() == ids[r, :n].tolist()  # each row read back whole
        assert positions[0, place[r, :n]].tolist() == list(range(n))  # at its own positions
    for _, L, tails in tree.segments:
        assert L >= 1 and all(n >= 1 for _, n in tails)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_attention_equals_the_masked_reference_with_gradients(dtype):
    torch.manual_seed(0)
    h, d, L, sizes = 3, 16, 37, (5, 1, 12)
    M = sum(sizes)
    q, k_t, v_t = (torch.randn(1, h, M, d, dtype=dtype, requires_grad=True) for _ in range(3))
    k_p, v_p = (torch.randn(1, h, L, d, dtype=dtype, requires_grad=True) for _ in range(2))
    scale = d ** -0.5
    out = PrefixTailAttention.apply(q, k_p, v_p, k_t, v_t, sizes, scale)
    weights = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k_p, v_p, k_t, v_t))
    ref, at = [], 0
    for n in sizes:  # each tail: the whole prefix, then its own keys causally
        mask = torch.ones(n, L + n, dtype=torch.bool).tril(L)
        ref.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, at:at + n], torch.cat([k_p, k_t[:, :, at:at + n]], 2), torch.cat([v_p, v_t[:, :, at:at + n]], 2),
            attn_mask=mask, scale=scale))
        at += n
    ref = torch.cat(ref, 2)
    ref_grads = torch.autograd.grad((ref.float() * weights).sum(), (q, k_p, v_p, k_t, v_t))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), ref.float(), atol=tol)
    for mine, theirs in zip(grads, ref_grads):
        assert torch.allclose(mine.float(), theirs.float(), atol=tol * 4), (mine - theirs).abs().max()


def test_a_body_without_the_tree_attention_is_refused(tiny):
    model, _ = tiny
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(model.config)  # sdpa, not switched
    plain.config._attn_implementation = "sdpa"
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]])
    with pytest.raises(RuntimeError, match="use_prefix_tree"):
        shared_prefix_hidden(plain.model, ids, torch.tensor([3, 3]), torch.tensor([1, 4]))


def test_models_the_tree_cannot_serve_keep_the_plain_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from stagewise.prefix_sharing import tree_supported
    from stagewise.rl.logprobs import PolicyLogprobs

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert "eager" in tree_supported(eager)
    policy = PolicyLogprobs(eager)
    assert not policy.tree and eager.config._attn_implementation == "eager"
    p, c = torch.tensor([[3, 4, 5]] * 2), torch.tensor([[6, 7], [8, 9]])
    ones = torch.ones_like
    shared, _ = policy(p, ones(p), c, ones(c), share_prefix=True)  # asked, but the plain forward runs
    plain, _ = policy(p, ones(p), c, ones(c), share_prefix=False)
    assert torch.equal(shared, plain)

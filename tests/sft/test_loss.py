"""The SFT loss: chunked cross-entropy at learnt positions equals the plain one, and packed rows give
the same loss and gradients as one example per row (no attention across examples)."""

import pytest
import torch

from stagewise.sft.data import pack, tokenize_conversation
from stagewise.sft.loss import SFTLoss, chunked_nll, collate

CONVS = [[{"role": "user", "content": f"question number {i}?" * (1 + i % 3)},
          {"role": "assistant", "content": f"answer {i * 7}"},
          {"role": "user", "content": "and?"},
          {"role": "assistant", "content": "done" * (1 + i % 2)}] for i in range(7)]


@pytest.fixture(scope="module")
def model_and_examples(tiny_chat_dir):
    from transformers import AutoModelForCausalLM

    from stagewise.models import load_tokenizer

    tok = load_tokenizer(str(tiny_chat_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
    examples = [tokenize_conversation(tok, c, max_len=256) for c in CONVS]
    return model, tok, examples


def loss_and_grads(model, rows, pad_id, chunk=5, shared_prefix=False):
    model.zero_grad()
    nll = SFTLoss(model, chunk=chunk)(**collate(rows, pad_id, shared_prefix=shared_prefix))
    loss = nll.sum() / nll.numel()
    loss.backward()
    return loss.detach(), nll.numel(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_loss_and_gradients_equal_unpacked(model_and_examples):
    model, tok, examples = model_and_examples
    packed = pack(examples, max_len=200)
    unpacked = pack(examples, max_len=200, packing=False)
    assert len(packed) < len(unpacked) == len(examples)  # packing really merged examples
    l1, n1, g1 = loss_and_grads(model, packed, tok.pad_token_id)
    l2, n2, g2 = loss_and_grads(model, unpacked, tok.pad_token_id)
    assert n1 == n2 == sum(sum(t[1:]) for _, t in examples)  # every learnt token, once
    assert torch.allclose(l1, l2, rtol=1e-5), (l1, l2)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-4), (name, (g1[name] - g2[name]).abs().max())
    # attention across examples would change the loss: the test can tell
    leaky = [r for r in packed]
    for r in leaky:
        r.positions = list(range(len(r.ids)))  # one long "example" per row: tokens see earlier examples
    l3, _, _ = loss_and_grads(model, leaky, tok.pad_token_id)
    assert abs(l3 - l1) > 1e-4


@pytest.mark.parametrize("opening_words", [0, 20])
def test_shared_prefix_rows_give_the_loss_and_gradients_of_the_plain_forward(model_and_examples, opening_words):
    """Agent episodes: one example per row, all opening with the same long system prompt (20 words),
    or only the chat template's opening in common (0). The opening runs once; every learnt token's
    NLL and every gradient equal the plain forward's."""
    model, tok, _ = model_and_examples
    system = " ".join(f"rule{k}" for k in range(opening_words)) or "x"
    convs = [[{"role": "system", "content": system if opening_words else f"sys {i}"}] + c for i, c in enumerate(CONVS)]
    examples = [tokenize_conversation(tok, c, max_len=512) for c in convs]
    rows = pack(examples, max_len=512, packing=False)
    assert all(r.single for r in rows) and len({len(r) for r in rows}) > 1  # rows of one example, padding
    l1, n1, g1 = loss_and_grads(model, rows, tok.pad_token_id)
    from stagewise.prefix_sharing import prefix_groups
    plan = prefix_groups([r.ids for r in rows])
    assert len(plan) == 1 and (plan[0][0] > 100 if opening_words else plan[0][0] < 20), plan
    l2, n2, g2 = loss_and_grads(model, rows, tok.pad_token_id, shared_prefix=True)
    assert n1 == n2 and torch.allclose(l1, l2, rtol=1e-5), (l1, l2)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-4), (name, (g1[name] - g2[name]).abs().max())
    with pytest.raises(ValueError, match="one example each"):
        collate(pack(examples, max_len=512), tok.pad_token_id, shared_prefix=True)
    # under gradient checkpointing the recomputed forward sees the same tree attention
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        l3, _, g3 = loss_and_grads(model, rows, tok.pad_token_id, shared_prefix=True)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert torch.allclose(l1, l3, rtol=1e-5)
    for name in g1:
        assert torch.allclose(g1[name], g3[name], atol=1e-6, rtol=1e-4), (name, (g1[name] - g3[name]).abs().max())


def test_chunked_nll_equals_full_cross_entropy(model_and_examples):
    model, tok, examples = model_and_examples
    rows = pack(examples[:3], max_len=200, packing=False)
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        ours = SFTLoss(model, chunk=3)(**batch)
        mask = torch.zeros_like(batch["input_ids"])
        for b, r in enumerate(rows):
            mask[b, :len(r)] = 1
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits.float()
        full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1))[batch["target_index"]],
                                                 batch["targets"], reduction="none")
    assert torch.allclose(ours, full, atol=1e-5)
    # gradients through the checkpointed chunks equal those of the plain computation
    h = torch.randn(11, 64, requires_grad=True)
    head = torch.nn.Linear(64, 50, bias=False)
    t = torch.randint(0, 50, (11,))
    chunked_nll(h, head, t, chunk=4).sum().backward()
    g_chunk, gw_chunk = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    torch.nn.functional.cross_entropy(head(h), t, reduction="sum").backward()
    assert torch.allclose(g_chunk, h.grad, atol=1e-6) and torch.allclose(gw_chunk, head.weight.grad, atol=1e-6)


def test_a_zero3_partitioned_head_is_called_once_in_the_chunked_nll():
    from stagewise.sft.loss import chunked_nll
    from tests.rl.test_logprobs import counting_head

    hidden = torch.randn(10, 6, requires_grad=True)
    targets = torch.randint(0, 11, (10,))
    results = {}
    for part in (False, True):
        head = counting_head(part)
        nll = chunked_nll(hidden, head, targets, chunk=3)
        (grad,) = torch.autograd.grad(nll.sum(), hidden)
        results[part] = (nll.detach(), grad, head.calls)
    assert results[True][2] == 1 and results[False][2] == 8
    torch.testing.assert_close(results[False][0], results[True][0])
    torch.testing.assert_close(results[False][1], results[True][1])

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stagewise.lm_head import token_logprobs
from stagewise.prefix_sharing import prefix_groups, unpadded
from stagewise.rl.logprobs import PolicyLogprobs, completion_logprobs
from tests.helpers import encode_prompts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_and_entropy_equal_the_full_log_softmax_with_gradients(temperature):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(7, 6, requires_grad=True)
    ids = torch.randint(0, 11, (7,))
    logits = head(hidden) / temperature
    full = torch.log_softmax(logits, -1)
    want = full.gather(-1, ids[:, None]).squeeze(-1)
    want_entropy = -(full.exp() * full).sum(-1)
    (g_want,) = torch.autograd.grad(want.sum(), hidden)
    logp, entropy = token_logprobs(hidden, ids, head, temperature=temperature, with_entropy=True, chunk=3)
    (g_have,) = torch.autograd.grad(logp.sum(), hidden)
    assert torch.allclose(logp, want, atol=1e-6) and torch.allclose(entropy, want_entropy, atol=1e-6)
    assert torch.allclose(g_have, g_want, atol=1e-6) and not entropy.requires_grad


def test_entropy_of_a_uniform_head_is_log_v():
    head = torch.nn.Linear(4, 8, bias=False)
    torch.nn.init.zeros_(head.weight)
    _, entropy = token_logprobs(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), head, with_entropy=True)
    assert torch.allclose(entropy, torch.full((5,), torch.log(torch.tensor(8.0))))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation outputs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.bytes:
                self.bytes, self.shape = t.numel() * t.element_size(), tuple(t.shape)
        return out


@pytest.mark.parametrize("share_prefix", [False, True])
def test_no_tokens_x_vocab_logits_for_a_long_completion_with_a_large_vocabulary(share_prefix):
    """B=2 completions of 2,048 tokens, a 32k vocabulary: the (B, C, V) logits would be 512 MB in
    fp32 (5 GB in bf16 for 8k tokens of Qwen3's 152k); no tensor of forward or backward may come
    near: at most one ~256 MB (chunk, V) fp32 block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagewise.lm_head import chunk_tokens

    torch.manual_seed(0)
    V, C = 32_000, 2_048
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096))
    p_ids = torch.randint(0, V, (2, 8))
    c_ids = torch.randint(0, V, (2, C))
    ones = torch.ones_like
    with LargestTensor() as seen:
        logp, entropy = PolicyLogprobs(lm)(p_ids, ones(p_ids), c_ids, ones(c_ids), with_entropy=True,
                                           share_prefix=share_prefix)
        logp.sum().backward()
    block = chunk_tokens(V) * V * 4
    assert block < 2 * C * V * 4 / 1.9
    assert seen.bytes <= block, (seen.shape, seen.bytes)
    assert entropy.shape == logp.shape == (2, C)


def test_completion_logprobs_match_a_full_forward(tiny):
    model, tok = tiny
    model.eval()
    p_ids, p_mask = encode_prompts(tok, ["hello there", "hi"])  # left-padded, different lengths
    c_ids = torch.tensor([[5, 6, 7], [8, 9, tok.pad_token_id]])
    c_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        lp, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
        for r in range(2):  # unpadded reference, one row at a time
            prompt = p_ids[r][p_mask[r].bool()]
            comp = c_ids[r][c_mask[r].bool()]
            full = torch.cat([prompt, comp])[None]
            logits = model(input_ids=full).logits[0]
            ref = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, comp[:, None]).squeeze(-1)
            assert torch.allclose(lp[r, :len(comp)], ref, atol=1e-5)


def shared_vs_plain(model, p_ids, p_mask, c_ids, c_mask):
    """(log-probs, gradients) of the plain forward and of the shared-prefix one."""
    out = []
    for share in (False, True):
        model.zero_grad()
        lp, _ = PolicyLogprobs(model)(p_ids, p_mask, c_ids, c_mask, share_prefix=share)
        (lp * c_mask * torch.arange(1, lp.numel() + 1).view_as(lp)).sum().backward()  # row-specific weights
        out.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


@pytest.mark.parametrize("case", ["groups", "common_opening", "nothing_shared"])
def test_shared_prefix_path_matches_plain_forward_and_gradients(tiny, case):
    """GRPO groups sharing a prompt; different prompts with a long common opening (the tau2 case:
    the plan then shares across groups); rows with no common token (every row its own prefix)."""
    model, tok = tiny
    G = 3
    opening = "You are an airline agent. Policy: be brief, check the reservation, then act. " * 3
    prompts = {"groups": ["a prompt", "another, longer prompt"],
               "common_opening": [opening + "Cancel my flight.", opening + "Change my seat, please."],
               "nothing_shared": ["a prompt", "another, longer prompt"]}[case]
    p_ids, p_mask = encode_prompts(tok, prompts)
    p_ids, p_mask = p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0)
    torch.manual_seed(1)
    c_ids = torch.randint(0, 200, (2 * G, 4))
    c_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]] * 2)
    if case == "nothing_shared":  # a prompt of one distinct token per row
        p_ids, p_mask = torch.arange(5, 5 + 2 * G)[:, None], torch.ones(2 * G, 1, dtype=torch.long)
    ids, lengths, _ = unpadded(p_ids, p_mask, c_ids, c_mask)
    plan = prefix_groups([ids[r, :n].tolist() for r, n in enumerate(lengths.tolist())])
    if case == "groups":  # each group's prompt once
        assert sorted((L, sorted(rows)) for L, rows in plan) == sorted(
            (int(p_mask[g * G].sum()), list(range(g * G, (g + 1) * G))) for g in range(2))
    elif case == "common_opening":  # the opening once beats each group's prompt twice
        assert len(plan) == 1 and plan[0][0] > 40
    else:  # every row alone
        assert sorted(rows for _, rows in plan) == [[r] for r in range(2 * G)]
    (plain, g_plain), (shared, g_shared) = shared_vs_plain(model, p_ids, p_mask, c_ids, c_mask)
    assert torch.allclose(shared * c_mask, plain * c_mask, atol=1e-5)
    assert torch.equal(shared * (1 - c_mask), torch.zeros_like(shared))  # padding: never computed
    for n in g_plain:
        assert torch.allclose(g_plain[n], g_shared[n], atol=1e-5), n


def counting_head(partitioned: bool):
    """A head that counts its calls; ``partitioned`` marks its weight as ZeRO-3 does (ds_id)."""
    class Head(torch.nn.Module):  # a matmul, not F.linear: DeepSpeed, once a ZeRO-3 run has patched
        def __init__(self):       # F.linear in this process, treats a ds_id parameter as its own
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(11, 6))
            self.out_features = 11

        def forward(self, x):
            return x @ self.weight.T

    torch.manual_seed(0)
    head = Head()
    if partitioned:
        head.weight.ds_id = 0
    head.calls = 0
    head.register_forward_hook(lambda m, i, o: setattr(m, "calls", m.calls + 1))
    return head


def test_a_zero3_partitioned_head_is_called_once_whatever_the_number_of_chunks():
    """Under ZeRO-3 every call of the head is a collective; ranks hold different numbers of tokens,
    so a call per chunk would make them call it a different number of times (a hang)."""
    hidden = torch.randn(10, 6, requires_grad=True)
    ids = torch.randint(0, 11, (10,))
    results = {}
    for part in (False, True):
        head = counting_head(part)
        logp, entropy = token_logprobs(hidden, ids, head, with_entropy=True, chunk=3)
        (grad,) = torch.autograd.grad(logp.sum(), hidden)
        results[part] = (logp.detach(), entropy, grad, head.calls)
    assert results[True][3] == 1 and results[False][3] == 4 + 4  # 4 chunks, recomputed in backward
    for a, b in zip(results[False][:3], results[True][:3]):
        torch.testing.assert_close(a, b)


def test_a_zero3_partitioned_head_is_called_even_by_a_rank_with_no_tokens():
    """A rank whose micro-batch has no learnt token (SFT) still joins the head's gather, or its
    peers wait for it forever."""
    head = counting_head(True)
    logp, _ = token_logprobs(torch.randn(0, 6, requires_grad=True), torch.zeros(0, dtype=torch.long), head)
    assert head.calls == 1 and logp.shape == (0,)

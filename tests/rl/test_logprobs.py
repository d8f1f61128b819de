import torch

from stagewise.rl.logprobs import completion_logprobs, entropy_from_logits, selective_logprobs
from tests.helpers import encode_prompts


def test_selective_logprobs_equals_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11)
    ids = torch.randint(0, 11, (5, 3))
    full = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(selective_logprobs(logits, ids, chunk=2), full, atol=1e-6)


def test_entropy_uniform_is_log_v():
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 3, 8)), torch.full((2, 3), torch.log(torch.tensor(8.0))))


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


def test_shared_prompt_path_matches_plain_forward_and_gradients(tiny):
    model, tok = tiny
    p_ids, p_mask = encode_prompts(tok, ["a prompt", "another, longer prompt"])
    G = 3
    p_ids, p_mask = p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0)
    torch.manual_seed(1)
    c_ids = torch.randint(0, 200, (2 * G, 4))
    c_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]] * 2)
    grads = []
    for g in (1, G):
        model.zero_grad()
        lp, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, group_size=g)
        (lp * c_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if g == 1:
            plain = lp.detach()
    assert torch.allclose(lp.detach() * c_mask, plain * c_mask, atol=1e-5)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n

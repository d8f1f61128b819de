import torch

from stagewise.rl.logprobs import completion_logprobs, entropy_from_logits, selective_logprobs
from stagewise.rl.prompts import encode_prompts


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

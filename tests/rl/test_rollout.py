import torch

from stagewise.rl.grpo import fixed_logprobs, policy_inputs
from stagewise.rl.logprobs import PolicyLogprobs
from stagewise.rl.rollout import RolloutBatch
from tests.helpers import encode_prompts


def test_micro_batches_keep_only_the_padding_their_own_rows_need(tiny):
    """A micro-batch keeps the prompt and completion columns of its longest row only: one row alone
    has no padding (the plain forward then passes sdpa no mask, ~1.4x faster on a 6k-token CPU row),
    and its log-probs are the whole batch's."""
    model, tok = tiny
    model.eval()
    p_ids, p_mask = encode_prompts(tok, ["a much longer opening than the others", "hi", "hello there"])
    c_ids = torch.tensor([[5, 6, tok.pad_token_id, tok.pad_token_id], [8, 9, 10, 11], [7] + [tok.pad_token_id] * 3])
    c_mask = (c_ids != tok.pad_token_id).long()
    batch = RolloutBatch(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                         policy_mask=c_mask.clone(), truncated=torch.zeros(3, dtype=torch.bool),
                         rewards=torch.zeros(3))
    prompt_lengths, completion_lengths = p_mask.sum(1).tolist(), c_mask.sum(1).tolist()
    assert len(set(prompt_lengths)) == 3

    for r, mb in enumerate(batch.micro_batches(1)):
        assert mb.prompt_mask.all() and mb.completion_mask.all()
        assert mb.prompt_ids.shape == (1, prompt_lengths[r]) and mb.completion_ids.shape == (1, completion_lengths[r])
        assert torch.equal(mb.prompt_ids[0], p_ids[r][p_mask[r].bool()])
    pair = next(batch.micro_batches(2))
    assert pair.prompt_ids.shape[1] == max(prompt_lengths[:2]) and pair.completion_ids.shape[1] == 4

    policy = PolicyLogprobs(model)

    def forward(mb):
        return policy(*policy_inputs(mb, 1.0))

    whole, one_by_one = fixed_logprobs(forward, batch, 3), fixed_logprobs(forward, batch, 1)
    assert torch.allclose(one_by_one * c_mask, whole * c_mask, atol=1e-5)

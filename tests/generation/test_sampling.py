import math

import torch

from stagewise.generation.chat_template import eos_ids
from stagewise.generation.padding import position_ids_from_mask, right_pad
from stagewise.generation.sampling import draw_tokens, filter_logits, sample
from tests.helpers import encode_prompts


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_right_padding_keeps_values_masks_and_a_column_for_empty_rows():
    vals, mask = right_pad([[7], [8, 9], []], -1, "cpu")
    assert vals.tolist() == [[7, -1], [8, 9], [-1, -1]] and mask.tolist() == [[1, 0], [1, 1], [0, 0]]
    logp, _ = right_pad([[], [-0.5]], 0.0, "cpu", torch.float32)
    assert logp.dtype == torch.float32 and logp.tolist() == [[0.0], [-0.5]]
    empty, empty_mask = right_pad([[], []], 0, "cpu", min_width=1)
    assert empty.shape == (2, 1) and empty_mask.sum() == 0


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5+0.3 reaches it -> keep the first two
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_draw_tokens_inverse_cdf():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]] * 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.95])
    assert draw_tokens(probs, u).tolist() == [0, 0, 2, 3]  # never the zero-probability token 1


class EditLogits(torch.nn.Module):
    """Wraps a model and adds `delta` to one token's logit (forces or forbids it)."""

    def __init__(self, model, token: int, delta: float):
        super().__init__()
        self.m, self.token, self.delta = model, token, delta

    def forward(self, **kw):
        out = self.m(**kw)
        out.logits[..., self.token] += self.delta
        return out


def _prompts(tok, texts):
    return encode_prompts(tok, texts)


def test_sample_is_reproducible_and_independent_of_batch(tiny):
    model, tok = tiny
    model.eval()
    ids, mask = _prompts(tok, ["What is 1 + 2?", "Hi"])
    kw = dict(max_new_tokens=6, eos_token_ids=eos_ids(tok), pad_token_id=tok.pad_token_id, temperature=1.0)
    a, am, _ = sample(model, ids, mask, num_samples=3, seeds=list(range(6)), **kw)
    b, bm, _ = sample(model, ids, mask, num_samples=3, seeds=list(range(6)), **kw)
    assert torch.equal(a, b) and torch.equal(am, bm)
    # the second prompt alone, with the same seeds, gives the same completions (rows 3..5): whole
    # sequences, so a row cut short or run on past its EOS would fail; only the batch's right
    # padding may differ in width, and it must be padding
    ids2, mask2 = _prompts(tok, ["Hi"])
    c, cm, _ = sample(model, ids2, mask2, num_samples=3, seeds=[3, 4, 5], **kw)
    for row_c, mask_c, row_a, mask_a in zip(c, cm, a[3:], am[3:]):
        assert row_c[mask_c.bool()].tolist() == row_a[mask_a.bool()].tolist()
        assert mask_c.sum() == mask_a.sum()
    w = cm.size(1)
    assert (a[3:, w:] == tok.pad_token_id).all() and (am[3:, w:] == 0).all()
    assert len({tuple(r.tolist()) for r in a}) > 1  # different seeds -> different samples


def test_greedy_matches_hf_generate_and_stops_at_eos(tiny):
    model, tok = tiny
    model.eval()
    ids, mask = _prompts(tok, ["abc", "a longer prompt"])
    out, cmask, trunc = sample(model, ids, mask, max_new_tokens=5, eos_token_ids=eos_ids(tok),
                               pad_token_id=tok.pad_token_id, greedy=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(tok))[:, ids.size(1):]
    for r in range(2):
        n = int(cmask[r].sum())
        assert out[r, :n].tolist() == ref[r, :n].tolist()
    # force an EOS: a model whose only likely token is EOS ends after one token, not truncated
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id] = 0  # (tied: also zeros the embedding row)
    out, cmask, trunc = sample(EditLogits(model, tok.eos_token_id, 100.0), ids, mask, max_new_tokens=5,
                               eos_token_ids=eos_ids(tok), pad_token_id=tok.pad_token_id, greedy=True)
    assert cmask.tolist() == [[1], [1]] and out[:, 0].tolist() == [tok.eos_token_id] * 2
    assert trunc.tolist() == [False, False]


def test_truncated_flag_when_no_eos(tiny):
    model, tok = tiny
    ids, mask = _prompts(tok, ["x"])

    out, cmask, trunc = sample(EditLogits(model, tok.eos_token_id, -math.inf), ids, mask, max_new_tokens=4,
                               eos_token_ids=eos_ids(tok), pad_token_id=tok.pad_token_id, num_samples=2, seeds=[0, 1])
    assert cmask.tolist() == [[1, 1, 1, 1]] * 2 and trunc.tolist() == [True, True]


def test_sampler_and_trainer_logprobs_agree_at_temperature(tiny):
    """The log-probability the sampler drew each token with equals the trainer's log pi(token) at the
    same temperature (the ratio of a fresh rollout is 1, not off by a temperature factor)."""
    from stagewise.rl.logprobs import completion_logprobs

    model, tok = tiny
    model.eval()
    ids, mask = _prompts(tok, ["What is 1 + 2?", "Hi"])
    for temperature in (0.7, 1.3):
        comp, cmask, _, drawn = sample(model, ids, mask, max_new_tokens=6, eos_token_ids=eos_ids(tok),
                                       pad_token_id=tok.pad_token_id, num_samples=2, seeds=[1, 2, 3, 4],
                                       temperature=temperature, with_logprobs=True)
        with torch.no_grad():
            trained, _ = completion_logprobs(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0),
                                             comp, cmask, temperature)
        m = cmask.bool()
        assert torch.allclose(drawn[m], trained[m], atol=1e-4), (temperature, (drawn[m] - trained[m]).abs().max())
        # and at temperature 1 they would differ: the test can tell temperatures apart
        with torch.no_grad():
            plain, _ = completion_logprobs(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), comp,
                                           cmask)
        assert (drawn[m] - plain[m]).abs().max() > 1e-2


def test_non_finite_logits_are_refused(tiny):
    import pytest

    from stagewise.errors import TrainingError

    model, tok = tiny
    ids, mask = _prompts(tok, ["x"])
    kw = dict(max_new_tokens=3, eos_token_ids=eos_ids(tok), pad_token_id=tok.pad_token_id)
    with pytest.raises(TrainingError, match="non-finite logits at decode step 0"):
        sample(EditLogits(model, 5, float("nan")), ids, mask, num_samples=2, seeds=[0, 1], **kw)
    with pytest.raises(TrainingError, match="non-finite logits"):
        sample(EditLogits(model, 5, float("inf")), ids, mask, greedy=True, **kw)

    class AllMinusInf(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **k):
            out = self.m(**k)
            out.logits[:] = -math.inf
            return out

    with pytest.raises(TrainingError, match="non-finite logits"):
        sample(AllMinusInf(model), ids, mask, num_samples=1, seeds=[0], **kw)


def test_long_prompts_prefilled_one_by_one_sample_as_the_padded_batch(monkeypatch):
    """Prompts of 1,100 and 1,400 tokens: prefilled one at a time without padding (the default from
    SPLIT_PREFILL_FROM tokens) or as one left-padded batch, the completions and their log-probs agree."""
    import stagewise.generation.sampling as sampling
    from tests.conftest import build_tiny_model

    model = build_tiny_model(260).eval()
    model.config.max_position_embeddings = 2048
    model = type(model)(model.config).eval()  # rotary tables for the longer context
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (1100, 1400)]
    ids = torch.full((2, 1400), 258, dtype=torch.long)
    mask = torch.zeros((2, 1400), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 1400 - len(p):], mask[i, 1400 - len(p):] = p, 1
    kw = dict(max_new_tokens=8, eos_token_ids=[259], pad_token_id=258, num_samples=3, seeds=list(range(6)),
              temperature=1.0, with_logprobs=True)
    split = sample(model, ids, mask, **kw)
    monkeypatch.setattr(sampling, "SPLIT_PREFILL_FROM", 10**9)
    batched = sample(model, ids, mask, **kw)
    assert torch.equal(split[0], batched[0]) and torch.equal(split[1], batched[1])
    torch.testing.assert_close(split[3], batched[3], atol=1e-4, rtol=1e-4)
    alone = sample(model, ids[1:], mask[1:], **{**kw, "seeds": list(range(3, 6))})  # N = 1: no padding at all
    assert torch.equal(alone[0], split[0][3:, :alone[0].size(1)])


def test_prompts_sharing_a_long_prefix_compute_its_blocks_once_and_sample_as_alone():
    """Three 1,300-1,500-token prompts equal for their first 1,100 tokens (tau2's policy and tools
    in every episode): the whole blocks they share (1,024 tokens) are computed once, each
    prompt's prefill logits are bit for bit those it gets on its own, and so are its completions."""
    import stagewise.generation.sampling as sampling
    from tests.conftest import build_tiny_model

    model = build_tiny_model(260).eval()
    model.config.max_position_embeddings = 2048
    model = type(model)(model.config).eval()

    class Counting(torch.nn.Module):  # counts the prompt tokens run through the model
        def __init__(self, m):
            super().__init__()
            self.m, self.tokens = m, 0

        def forward(self, input_ids, **k):
            self.tokens += input_ids.numel() if k.get("past_key_values") is None or input_ids.size(1) > 1 else 0
            return self.m(input_ids=input_ids, **k)

    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 256, (1100,), generator=g)
    prompts = [torch.cat([shared, torch.randint(0, 256, (n - 1100,), generator=g)]) for n in (1500, 1300, 1400)]
    ids = torch.full((3, 1500), 258, dtype=torch.long)
    mask = torch.zeros((3, 1500), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 1500 - len(p):], mask[i, 1500 - len(p):] = p, 1
    kw = dict(max_new_tokens=6, eos_token_ids=[259], pad_token_id=258, num_samples=2, temperature=1.0,
              with_logprobs=True)
    counting = Counting(model)
    together = sample(counting, ids, mask, seeds=list(range(6)), **kw)
    shared_blocks = 1100 // sampling.PREFILL_BLOCK * sampling.PREFILL_BLOCK
    assert shared_blocks == 1024
    # sorted order: the first prompt is prefilled whole, the other two from the shared 1,024th token on
    first = min(range(3), key=lambda i: prompts[i].tolist())
    assert counting.tokens == len(prompts[first]) + sum(len(p) - shared_blocks for i, p in enumerate(prompts)
                                                        if i != first)
    for i, p in enumerate(prompts):
        alone = sample(model, p[None], torch.ones_like(p)[None], seeds=[2 * i, 2 * i + 1], **kw)
        width = alone[0].size(1)
        assert torch.equal(alone[0], together[0][2 * i: 2 * i + 2, :width])
        # decoding a padded batch differs from decoding alone only in rounding
        torch.testing.assert_close(alone[3], together[3][2 * i: 2 * i + 2, :width], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        _, logits = sampling.prefill(model, ids, mask, position_ids_from_mask(mask), lockstep=False)
        for i, p in enumerate(prompts):
            _, own = sampling.prefill(model, p[None], torch.ones_like(p)[None],
                                      torch.arange(len(p))[None], lockstep=False)
            assert torch.equal(own[0], logits[i])

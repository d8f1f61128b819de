"""The bf16 sampling replica (rollout.weights: bf16_copy, the default for single / DDP in bf16)
must be the trained model: RoPE buffers stay fp32, and on a 4,000-token prompt its next-token
distributions match the fp32 model's under bf16 autocast (what the trainer computes)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stagewise.generation.engines import Bf16Replica

PROMPT = 4000


@pytest.fixture(scope="module")
def long_context_model():
    """A tiny Llama with Qwen3's RoPE theta and room for 8k positions; sharpened attention, so that
    where a token sits matters."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=1e6,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)
    return model


def last_logprobs(model, ids, autocast: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(ids).logits[0, -64:].float().log_softmax(-1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def test_replica_keeps_rope_inv_freq_fp32_and_samples_the_trained_model_on_a_4k_prompt(long_context_model):
    model = long_context_model
    ids = torch.randint(0, 512, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    trained = last_logprobs(model, ids, autocast=True)  # the trainer: fp32 weights, bf16 autocast
    replica = Bf16Replica(model)
    with replica.filled_from(model) as sampler:
        assert {n: b.dtype for n, b in sampler.named_buffers()} == {n: b.dtype for n, b in model.named_buffers()}
        assert {p.dtype for p in sampler.parameters()} == {torch.bfloat16}
        sampled = last_logprobs(sampler, ids, autocast=False)
    # measured: 1.1e-5 (bf16 rounding); a bf16 inv_freq (module.to(bf16)) gives 8.6e-3
    assert kl(trained, sampled) < 1e-3
    assert (trained.argmax(-1) == sampled.argmax(-1)).float().mean() == 1.0
    cast_all = copy.deepcopy(model).to(torch.bfloat16)  # what the replica must not be: buffers cast too
    assert kl(trained, last_logprobs(cast_all, ids, autocast=False)) > 3e-3  # the check can see the bug


def test_building_the_replica_copies_no_parameter(long_context_model, monkeypatch):
    """On a GPU a deep copy of the fp32 module is a second fp32 model on the device, if briefly."""
    copied = []
    real = torch.nn.Parameter.__deepcopy__
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", lambda self, memo: copied.append(self.shape)
                        or real(self, memo))
    replica = Bf16Replica(long_context_model)
    assert copied == []
    assert all(p.numel() == 0 for p in replica.copy.parameters())  # empty until filled
    # tied parameters stay tied in the copy (one tensor for the embeddings and the head)
    assert replica.copy.lm_head.weight is replica.copy.model.embed_tokens.weight


def test_replica_releases_its_tensors_after_the_block(long_context_model):
    replica = Bf16Replica(long_context_model)
    with replica.filled_from(long_context_model) as sampler:
        assert all(c.shape == p.shape for c, p in zip(sampler.parameters(), long_context_model.parameters()))
    assert all(p.numel() == 0 for p in replica.copy.parameters())

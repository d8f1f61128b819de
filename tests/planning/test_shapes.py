"""Model counts from the meta device, and the saved-activation bytes measured on fake tensors against
the same forward run for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagewise.errors import ModelLoadError
from stagewise.planning.shapes import model_shape, read_model_config, saved_activations

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model_configs"


def test_qwen3_4b_counts_from_its_public_config_json():
    config = read_model_config(str(CONFIGS / "qwen3-4b.json"))
    shape = model_shape(config)
    # the model card: 4.0B parameters, 3.6B non-embedding (the output head is the tied embedding)
    assert shape.params == 4_022_468_096
    assert shape.params - 151936 * 2560 == 3_633_511_936
    assert (shape.layers, shape.hidden, shape.vocab, shape.max_positions) == (36, 2560, 151936, 40960)
    assert shape.kv_per_token == 2 * 36 * 8 * 128
    assert shape.layer_params * 36 + shape.outside_params == shape.params


def test_lora_counts_only_the_adapters_as_trainable():
    config = read_model_config(str(CONFIGS / "qwen3-4b.json"))
    shape = model_shape(config, lora_r=16, lora_targets=("q_proj", "v_proj"))
    # q_proj 2560 -> 4096, v_proj 2560 -> 1024, per layer r x (in + out)
    assert shape.trainable == 36 * 16 * ((2560 + 4096) + (2560 + 1024))


def test_a_config_that_is_not_there_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory, config.json"):
        read_model_config("nobody/no-such-model-here")
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="no model_type"):
        read_model_config(str(bad))


def tiny_qwen3(layers: int):
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                                max_position_embeddings=512, tie_word_embeddings=True)


def real_saved_bytes(config, rows, tokens, compute, residual):
    """The same forward on real tensors: distinct non-parameter storages autograd saved."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, residual))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 300, (rows, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=getattr(torch, compute), enabled=compute != residual):
        out = model.model(input_ids=ids, use_cache=False).last_hidden_state
    assert out.requires_grad
    return sum(saved.values())


@pytest.mark.parametrize("compute, residual", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                               ("float32", "float32")])
def test_fake_tensor_measurement_equals_the_real_forward_for_any_depth(compute, residual):
    """Measured on 1 and 2 layers with fake tensors, extrapolated to 5: the real 5-layer forward
    saves the same bytes (autocast's weight copies included)."""
    config = tiny_qwen3(5)
    predicted = saved_activations(config, rows=3, tokens=40, compute=compute, residual=residual)
    real = real_saved_bytes(tiny_qwen3(5), 3, 40, compute, residual)
    assert predicted.total(5, checkpointing=False) == real
    assert (predicted.weight_casts > 0) == (compute != residual)


def test_checkpointing_keeps_each_layers_input_and_one_layer():
    config = tiny_qwen3(8)
    saved = saved_activations(config, rows=2, tokens=64, compute="bfloat16", residual="float32")
    assert saved.checkpointed_layer == 2 * 64 * 64 * 4
    assert saved.total(8, True) < saved.total(8, False)
    assert saved.total(8, False) - saved.total(8, True) == 7 * saved.per_layer - 8 * saved.checkpointed_layer


def test_qwen3_32b_counts_untied_head_included():
    shape = model_shape(read_model_config(str(CONFIGS / "qwen3-32b.json")))
    # the model card: 32.8B parameters, 31.2B non-embedding (embedding and head are separate matrices)
    assert shape.params == 32_762_123_264
    assert shape.params - 2 * 151936 * 5120 == 31_206_298_624

"""What a model is, for memory planning, without reading a weight: parameter counts from the model
built on the meta device, and the bytes autograd saves per decoder layer measured by running the
model's own forward on fake tensors (no memory, ~0.2 s for a 4B model's two layers).

    config = read_model_config("Qwen/Qwen3-4B")          # a dir, a config.json, a hub id in the cache, a GGUF
    shape = model_shape(config)                           # ModelShape(params=4_022_468_096, layers=36, ...)
    saved = saved_activations(config, rows=8, tokens=6144, compute="bfloat16", residual="float32",
                              checkpointing=False)        # bytes autograd holds at the end of the forward

Measuring instead of a formula: what a layer saves depends on the architecture (Qwen3's q/k norms,
gated MLPs, the attention kernel's log-sum-exp), on autocast (each linear saves its own bf16 cast
of its input) and on the residual dtype; the model's own code on fake tensors records exactly that.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from stagewise.errors import ModelLoadError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def read_model_config(name_or_path: str, trust_remote_code: bool = False):
    """A transformers config from a model directory, a config.json file, a bundled name or GGUF file
    (its metadata only) or a hub id already in the local cache; nothing is downloaded."""
    from transformers import AutoConfig, PretrainedConfig

    from stagewise.models import BUNDLED, bundled_gguf

    p = Path(name_or_path).expanduser()
    try:
        if name_or_path in BUNDLED or name_or_path.endswith(".gguf"):
            gguf = bundled_gguf(name_or_path) if name_or_path in BUNDLED else p
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            return config
        if p.is_file() and p.name.endswith(".json"):
            raw = json.loads(p.read_text())
            if "model_type" not in raw:
                raise ModelLoadError(f"{p}: no model_type (not a transformers config.json)")
            return AutoConfig.for_model(**raw)
        if p.is_dir():
            return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(cached, str):
            raise ModelLoadError(f"{name_or_path}: not a directory, config.json, GGUF file or a hub id in the "
                                 f"local cache (copy its config.json here and pass that path)")
        return AutoConfig.from_pretrained(str(Path(cached).parent), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{name_or_path}: cannot read the model's config: {str(e).splitlines()[0]}") from e
    except TypeError as e:  # AutoConfig.for_model with a field the class does not take
        raise ModelLoadError(f"{name_or_path}: {e}") from e
    assert isinstance(config, PretrainedConfig)


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int  # every parameter once (tied embeddings counted once)
    layer_params: int  # the largest decoder layer's
    outside_params: int  # embeddings, final norm, output head (if not tied)
    layers: int
    hidden: int
    vocab: int
    kv_per_token: int  # K and V elements per token across all layers (2 x layers x kv heads x head dim)
    max_positions: int
    lora_params: int = 0  # trainable LoRA parameters (0: full fine-tuning)

    @property
    def trainable(self) -> int:
        return self.lora_params or self.params


def _build_on_meta(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _decoder_layers(model) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module
    raise ModelLoadError(f"{type(model).__name__}: no list of decoder layers found")


def model_shape(config, name: str = "", lora_r: int = 0, lora_targets: tuple[str, ...] = ()) -> ModelShape:
    """Counts from the model built on the meta device (no memory, no weights read)."""
    model = _build_on_meta(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    layers = _decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    lora = 0
    if lora_r:
        for mod_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and mod_name.rsplit(".", 1)[-1] in lora_targets:
                lora += lora_r * (module.in_features + module.out_features)
    return ModelShape(name=name or getattr(config, "_name_or_path", "") or text.model_type, params=params,
                      layer_params=layer_params, outside_params=params - sum(p.numel() for p in layers.parameters()),
                      layers=len(layers), hidden=text.hidden_size, vocab=text.vocab_size,
                      kv_per_token=2 * len(layers) * kv_heads * head_dim,
                      max_positions=getattr(text, "max_position_embeddings", 0) or 0, lora_params=lora)


@dataclass(frozen=True)
class SavedActivations:
    """Bytes autograd holds at the end of one micro-batch's forward (before the output head)."""

    per_layer: int  # one decoder layer's saved tensors (inputs, bf16 casts of them, attention outputs ...)
    outside: int  # embeddings and final norm
    weight_casts: int  # autocast's bf16 copies of the weights, held until the forward's autocast ends
    checkpointed_layer: int  # with gradient checkpointing: what one layer keeps (its input)

    def total(self, layers: int, checkpointing: bool) -> int:
        """With checkpointing, every layer keeps its input and one layer is recomputed at a time."""
        if checkpointing:
            return self.checkpointed_layer * layers + self.per_layer + self.outside + self.weight_casts
        return self.per_layer * layers + self.outside + self.weight_casts


@contextmanager
def _masks_as_for_real_tensors():
    """transformers treats a fake tensor as a traced graph and then materialises the causal mask (and
    repeats K/V for GQA), which a real forward on a GPU or CPU does not: count what the real one saves.
    Without padding or packing (what is measured here), the real forward skips the mask for SDPA's
    is_causal unless a sliding window is shorter than the sequence."""
    from unittest import mock

    import transformers.masking_utils as masking

    def ignore_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        return local_attention_size is None or kv_length < local_attention_size

    with mock.patch.object(masking, "_ignore_causal_mask_sdpa", ignore_mask), \
            mock.patch.object(masking, "find_packed_sequence_indices", lambda position_ids: None):
        yield


def _count_saved(config, rows: int, tokens: int, compute: str, residual: str) -> tuple[int, int]:
    """(bytes of saved activations, bytes of autocast weight copies) of one forward on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with FakeTensorMode(allow_non_fake_inputs=True), _masks_as_for_real_tensors():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, residual))
        params = {p.untyped_storage()._cdata: p for p in model.parameters()}  # _cdata: the storage itself
        shapes, weight_dtype = {tuple(p.shape) for p in params.values()}, getattr(torch, residual)
        ids = torch.zeros(rows, tokens, dtype=torch.long)
        autocast = torch.autocast("cpu", dtype=getattr(torch, compute), enabled=compute != residual)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model.model(input_ids=ids, use_cache=False)
        storages: dict[int, tuple[int, bool]] = {}
        for t in saved:
            s = t.untyped_storage()
            if s._cdata not in params and s._cdata not in storages:
                # autocast's copy of a weight: a parameter's shape in another dtype
                is_cast = tuple(t.shape) in shapes and t.dtype != weight_dtype and t.shape[0] != rows * tokens
                storages[s._cdata] = (s.nbytes(), is_cast)
    return sum(b for b, cast in storages.values() if not cast), sum(b for b, cast in storages.values() if cast)


def saved_activations(config, *, rows: int, tokens: int, compute: str, residual: str,
                      attn_implementation: str = "sdpa") -> SavedActivations:
    """Run the model's own forward with 1 and 2 decoder layers on fake tensors (rows x tokens ids) under
    the run's autocast, and count the distinct storages autograd saves that are not parameters.

    compute: the autocast dtype ("float32" = no autocast); residual: the dtype the weights are held in
    (fp32 weights under bf16 autocast keep an fp32 residual stream)."""
    counts = {}
    for n_layers in (1, 2):
        fields = {**config.to_dict(), "num_hidden_layers": n_layers}
        if fields.get("layer_types"):  # per-layer attention kinds: the pattern's first n
            fields["layer_types"] = [fields["layer_types"][k % len(fields["layer_types"])] for k in range(n_layers)]
        small = config.__class__.from_dict(fields)
        small._attn_implementation = attn_implementation
        counts[n_layers] = _count_saved(small, rows, tokens, compute, residual)
    (act1, cast1), (act2, cast2) = counts[1], counts[2]
    layer_casts = cast2 - cast1
    return SavedActivations(per_layer=act2 - act1, outside=act1 - (act2 - act1),
                            weight_casts=layer_casts * config.num_hidden_layers + (cast1 - layer_casts),
                            checkpointed_layer=rows * tokens * config.hidden_size * DTYPE_BYTES[residual])

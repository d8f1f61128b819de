"""The tiny random Llama (2 layers, width 64) and byte-level tokenizer the tests build offline
from a config; no pytest here (make gpu-check uses them on machines without it)."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}")
# a role-tagged, prefix-preserving template (ChatML-like) for SFT: each turn ends with <eos>
CHATML_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = template
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0, heads: int = 4):
    """heads=1: one 64-wide head (vLLM's CPU attention has no kernel for 16-wide heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=min(heads, 2), max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


def make_tiny_dir(path: Path, seed: int = 0, template: str = CHAT_TEMPLATE, heads: int = 4) -> Path:
    tok = build_tokenizer(template)
    model = build_tiny_model(len(tok), seed, heads)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

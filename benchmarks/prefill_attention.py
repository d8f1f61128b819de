"""The attention of one prefill chunk against a long KV cache, two ways, side by side in one run:

    .venv/bin/python benchmarks/prefill_attention.py

Why: a tau2 evaluation on the bundled model spends ~79% of its generation time in prefill (cProfile of
`stagewise eval configs/tau2_cpu.yaml --domains airline`, 2026-12-07: 225 of 284 s), most of it in
SDPA (167 s): each turn's new tokens (the last completion, tool results) attend to the ~5-6k cached
tokens of the conversation. For such a chunk (queries != keys, a cache) transformers materialises a
(chunk x keys) mask, copies the keys and values once per query head of a kv head (`repeat_kv`: no
`enable_gqa` with a mask) and runs SDPA with that mask. The split is what the sampler runs for it
(stagewise/generation/shared_prefix.py, ``chunk_over_cache_attention``): the chunk against the cached
keys with no mask (a kv head's query heads folded into one batch of queries, so nothing is copied),
the chunk against itself with is_causal, the two merged exactly through their log-sum-exps.

Shapes: SmolLM2-135M's attention (9 query heads, 3 kv heads, head dim 64), bf16, one layer, one row.
The table gives ms per call (mean of --repeats after one warm-up call) and the largest difference of
the two outputs (bf16 rounding).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from stagewise.generation.shared_prefix import chunk_over_cache_attention_forward

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
REP = HEADS // KV_HEADS


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """transformers' own sdpa_attention_forward for a chunk with a cache, given the bottom-right causal
    bool mask the model builds for it: q (1, H, m, d), k/v (1, KV, n, d) -> (1, H, m, d)."""
    m, n = q.size(2), k.size(2)
    mask = torch.arange(m)[:, None] + (n - m) >= torch.arange(n)[None, :]
    layer = SimpleNamespace(num_key_value_groups=REP, is_causal=True, layer_idx=0, training=False)
    out, _ = sdpa_attention_forward(layer, q, k, v, mask[None, None], scaling=scale)
    return out.transpose(1, 2)  # it returns (1, m, H, d) for the output projection


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The sampler's own attention for such a chunk (shared_prefix.chunk_over_cache_attention_forward):
    the cached keys with no mask, GQA folded into the queries, plus the chunk causally, merged."""
    layer = SimpleNamespace(num_key_value_groups=REP, is_causal=True, layer_idx=0, training=False)
    out, _ = chunk_over_cache_attention_forward(layer, q, k, v, None, scaling=scale)
    return out.transpose(1, 2)


def per_call_ms(fn, args, repeats: int) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    scale = HEAD_DIM ** -0.5
    print(f"one layer's attention, bf16, {torch.get_num_threads()} threads")
    print("| new tokens | keys | masked SDPA (ms) | split (ms) | speed-up | max diff |")
    print("|---|---|---|---|---|---|")
    for m, n in [(64, 5500), (300, 5800), (512, 6000)]:
        q = torch.randn(1, HEADS, m, HEAD_DIM, dtype=torch.bfloat16)
        k = torch.randn(1, KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16)
        v = torch.randn(1, KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16)
        diff = (masked_sdpa(q, k, v, scale).float() - split_attention(q, k, v, scale).float()).abs().max().item()
        plain = per_call_ms(masked_sdpa, (q, k, v, scale), args.repeats)
        split = per_call_ms(split_attention, (q, k, v, scale), args.repeats)
        print(f"| {m} | {n} | {plain:.1f} | {split:.1f} | x{plain / split:.2f} | {diff:.1g} |")


if __name__ == "__main__":
    main()

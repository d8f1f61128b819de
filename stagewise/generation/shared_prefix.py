"""Decoding rows that share long prompt prefixes, reading each shared prefix once per step.

    cache = SharedPrefixCache.from_prompts(per_prompt_layers, prefix_of, room=max_new_tokens)
    cache.batch_repeat_interleave(G)              # G completions per prompt: the prefixes are not copied
    with shared_prefix_attention(model):
        out = model(input_ids=next_ids[:, None], position_ids=pos, past_key_values=cache, use_cache=True)

Why: GRPO samples G completions of every prompt, and a tau2 episode's prompt is ~5,000 tokens of
policy and tool schemas shared by every episode of the domain. A plain KV cache holds one copy of
the prompt per row, and every decode step reads all of them: with 32 rows of a 2,300-token prompt,
copying and reading those caches (transformers' GQA repeat included) was 90% of the sampler's time
on CPU. Here the cache has two levels:
  - shared segments: a prefix's keys and values stored once (1, kv_heads, L, head_dim); all of its
    rows attend to it together, as one batched query (rows x heads-per-kv-head queries per kv head);
  - each row's tail: the rest of its prompt and the tokens it generates, preallocated (no
    concatenation per step), written in place.
Attention over the two parts is merged exactly through their log-sum-exps (the split is the
"cascade" / Hydragen decomposition of softmax attention): softmax over [prefix; tail] equals the two
partial softmaxes weighted by exp(lse_part - lse_all). Only rounding differs from one dense SDPA call.

The same split serves prefill chunks that continue a cache (``chunk_over_cache_attention``): a
multi-turn episode's next turn prefills a few hundred new tokens against the ~5-6k cached ones. The
model's own SDPA path builds a (chunk x keys) mask for that, copies the keys and values once per query
head (no GQA with a mask) and runs the masked kernel; here the chunk reads the cached keys without a
mask (a kv head's query heads folded into one query batch: nothing copied) and itself causally, merged
through the log-sum-exps (benchmarks/prefill_attention.py: x1.2-1.5 per call on a 2-core CPU).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NAME = "stagewise_shared_prefix"


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype one SDPA call would compute ``t`` in: autocast's where it is on (keys leave the rotary
    embedding in fp32, values in bf16), else the tensor's own."""
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp. q: (b, h, m, d), k/v: (b, h, n, d), mask: additive,
    broadcastable to (b, h, m, n) -> out (b, h, m, d) in q's dtype, lse (b, h, m) fp32.
    causal (m == n, no mask): query i reads keys 0..i."""
    return kernel_for(q.device.type)(q, k, v, scale, mask, causal)


def attend_cpu(q, k, v, scale, mask=None, causal=False):
    """CPU's flash kernel: it returns the log-sum-exp; fp32 accumulation inside."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
    return out, lse.float()


_cuda_kernel_failed: list[str] = []  # why the CUDA kernel could not take these shapes (then: math)


def attend_cuda(q, k, v, scale, mask=None, causal=False):
    """CUDA's memory-efficient SDPA kernel, which returns the log-sum-exp (and takes a mask); where
    it refuses the shapes or dtypes, the fp32 math path (remembered for the process)."""
    if not _cuda_kernel_failed:
        try:
            bias = None if mask is None else mask.to(q.dtype).expand(q.size(0), q.size(1), q.size(2), k.size(2))
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
            return out, lse[..., :q.size(2)].float()  # the kernel may pad the query dim of its lse
        except RuntimeError as e:
            _cuda_kernel_failed.append(str(e).splitlines()[0])
    return attend_math(q, k, v, scale, mask, causal)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of m queries over m keys at the same positions, with its log-sum-exp:
    q, k, v (b, h, m, d) -> out (b, h, m, d), lse (b, h, m) fp32."""
    return attend(q, k, v, scale, causal=True)


def kernel_for(device_type: str):
    """The attention-with-lse implementation for a device: a fused kernel where one returns the
    log-sum-exp (CPU, CUDA), else fp32 matmuls."""
    return {"cpu": attend_cpu, "cuda": attend_cuda}.get(device_type, attend_math)


def attend_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: torch.Tensor | None = None, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` in fp32 matmuls, for devices without a kernel that returns the log-sum-exp here."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse


def merge(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over keys A and B from attention over each: (..., d) outputs, (...) lse -> (..., d) fp32."""
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    return (o_a.float() * w_a + o_b.float() * w_b) / (w_a + w_b)


class LayerView:
    """What the cache hands the attention function for one layer (in place of dense keys/values)."""

    def __init__(self, cache: "SharedPrefixCache", layer: int):
        self.cache, self.layer = cache, layer


class SharedPrefixCache:
    """Per layer: shared segments [(k, v) of shape (1, kv_heads, L_s, d)], each row's tail
    (rows, kv_heads, capacity, d) with its length; ``segment_of`` (rows,) the segment a row reads
    (-1: none). Duck-types the parts of transformers' ``Cache`` that a decoder's forward and our
    sampler use (``update``, ``get_seq_length``, ``batch_select_indices``, ``batch_repeat_interleave``)."""

    def __init__(self, segments: list[list[tuple[torch.Tensor, torch.Tensor]]], segment_of: torch.Tensor,
                 tail_k: list[torch.Tensor], tail_v: list[torch.Tensor], tail_len: torch.Tensor):
        self.segments, self.segment_of = segments, segment_of
        self.tail_k, self.tail_v = tail_k, tail_v
        self.tail_len = [tail_len.clone() for _ in tail_k]  # per layer: update() runs layer by layer
        # the longest tail per layer as a Python int: every row grows by one token per step, so it is
        # known without asking the device (two host syncs per layer per token otherwise)
        self.tail_max = [int(tail_len.max()) if tail_len.numel() else 0 for _ in tail_k]
        self._groups = None

    @classmethod
    def from_prompts(cls, caches: list[list[tuple[torch.Tensor, torch.Tensor]]], prefix_of: list[tuple[int, int]],
                     room: int) -> "SharedPrefixCache":
        """caches[i][layer] = (k, v) of prompt i, each (1, kv_heads, n_i, d). prefix_of[i] = (j, L):
        prompt i shares its first L tokens with prompt j (j == i: it owns that segment; L = 0: none).
        room: decode steps the tails must hold beyond the prompts' own tails."""
        k0 = caches[0][0][0]
        dtype = compute_dtype(k0)  # one dtype for keys, values and queries
        owners = sorted({j for j, n in prefix_of if n})
        seg_index = {j: s for s, j in enumerate(owners)}
        length = {j: n for j, n in prefix_of if n}  # one length per owner: all its rows share L
        layers = len(caches[0])
        segments = [[(caches[j][li][0][:, :, :length[j]].to(dtype), caches[j][li][1][:, :, :length[j]].to(dtype))
                     for j in owners] for li in range(layers)]
        start = [n for _, n in prefix_of]
        own = [caches[i][0][0].size(2) - start[i] for i in range(len(caches))]
        capacity = max(own) + room
        tail_k, tail_v = [], []
        for li in range(layers):
            tk = k0.new_zeros((len(caches), k0.size(1), capacity, k0.size(3)), dtype=dtype)
            tv = torch.zeros_like(tk)
            for i, layer in enumerate(caches):
                tk[i, :, :own[i]] = layer[li][0][0, :, start[i]:]
                tv[i, :, :own[i]] = layer[li][1][0, :, start[i]:]
            tail_k.append(tk)
            tail_v.append(tv)
        segment_of = torch.tensor([seg_index[j] if n else -1 for j, n in prefix_of], device=k0.device)
        return cls(segments, segment_of, tail_k, tail_v, torch.tensor(own, device=k0.device))

    # -- the Cache interface ----------------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this step's key/value (rows, kv_heads, 1, d) at each row's tail end."""
        if key.size(2) != 1:
            raise ValueError("SharedPrefixCache is for decoding: one new token per row per step")
        pos = self.tail_len[layer_idx]
        if self.tail_max[layer_idx] >= self.tail_k[layer_idx].size(2):
            raise ValueError("SharedPrefixCache: a row's tail is full (more decode steps than its room)")
        rows = torch.arange(key.size(0), device=key.device)
        self.tail_k[layer_idx][rows, :, pos] = key[:, :, 0].to(self.tail_k[layer_idx].dtype)
        self.tail_v[layer_idx][rows, :, pos] = value[:, :, 0].to(self.tail_v[layer_idx].dtype)
        self.tail_len[layer_idx] = pos + 1
        self.tail_max[layer_idx] += 1
        view = LayerView(self, layer_idx)
        return view, view

    def get_seq_length(self, layer_idx: int = 0) -> int:
        lengths = self.tail_len[layer_idx].clone()
        for s, (k, _) in enumerate(self.segments[layer_idx]):
            lengths[self.segment_of == s] += k.size(2)
        return int(lengths.max()) if lengths.numel() else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.tail_k = [t[indices] for t in self.tail_k]
        self.tail_v = [t[indices] for t in self.tail_v]
        self.tail_len = [n[indices] for n in self.tail_len]
        self.tail_max = [int(n.max()) if n.numel() else 0 for n in self.tail_len]  # rows left: rarely
        self.segment_of, self._groups = self.segment_of[indices], None

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.tail_k = [t.repeat_interleave(repeats, dim=0) for t in self.tail_k]
        self.tail_v = [t.repeat_interleave(repeats, dim=0) for t in self.tail_v]
        self.tail_len = [n.repeat_interleave(repeats) for n in self.tail_len]
        self.segment_of, self._groups = self.segment_of.repeat_interleave(repeats), None

    def last_of_row(self, row: int, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values of the last ``t`` positions of cache row ``row``'s tail (its
        decoded tokens once it has decoded t): each (1, kv_heads, t, d)."""
        n = int(self.tail_len[0][row])
        return [(k[row:row + 1, :, n - t:n], v[row:row + 1, :, n - t:n]) for k, v in zip(self.tail_k, self.tail_v)]

    # -- attention ----------------------------------------------------------------------------------
    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(segment, the rows reading it) for every segment some row reads; computed once per batch."""
        if self._groups is None:
            present = sorted(set(self.segment_of.tolist()) - {-1})
            self._groups = [(s, (self.segment_of == s).nonzero().squeeze(1)) for s in present]
        return self._groups

    def attention(self, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """query (rows, heads, 1, d) -> attention output (rows, 1, heads, d), as transformers' attention
        functions return it."""
        rows, heads, _, d = query.shape
        kv_heads = self.tail_k[layer].size(1)
        per_kv = heads // kv_heads  # query heads reading one kv head (grouped-query attention)
        q = query.reshape(rows, kv_heads, per_kv, d).to(self.tail_k[layer].dtype)
        n = self.tail_len[layer]
        width = self.tail_max[layer]
        valid = torch.arange(width, device=query.device)[None, :] < n[:, None]
        mask = torch.zeros(valid.shape, dtype=torch.float32, device=query.device).masked_fill(~valid, float("-inf"))
        out, lse = attend(q, self.tail_k[layer][:, :, :width], self.tail_v[layer][:, :, :width], scale,
                          mask[:, None, None, :])
        out = out.float()
        for s, idx in self.groups():
            k, v = self.segments[layer][s]
            # all rows of the segment as one query batch per kv head: (1, kv_heads, rows_s * per_kv, d)
            qs = q[idx].permute(1, 0, 2, 3).reshape(1, kv_heads, idx.numel() * per_kv, d)
            o_s, lse_s = attend(qs, k, v, scale)
            o_s = o_s.reshape(kv_heads, idx.numel(), per_kv, d).permute(1, 0, 2, 3)
            lse_s = lse_s.reshape(kv_heads, idx.numel(), per_kv).permute(1, 0, 2)
            out[idx] = merge(out[idx], lse[idx], o_s, lse_s)
        return out.to(query.dtype).reshape(rows, heads, d)[:, None]


def shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (registered as ``stagewise_shared_prefix``): ``key`` is the
    cache's LayerView. Attention sinks, soft-capping and sliding windows are not supported (the sampler
    does not choose this path for such models)."""
    if not isinstance(key, LayerView):
        raise TypeError("the shared-prefix attention needs a SharedPrefixCache")
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    return key.cache.attention(key.layer, query, scale), None


CHUNK_NAME = "stagewise_chunk_over_cache"


def chunk_over_cache_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                       **kwargs):
    """transformers attention function (``stagewise_chunk_over_cache``) for the prefill chunk of one
    unpadded row that continues a cache: query (1, heads, m, d); key, value (1, kv_heads, n, d), the
    n - m cached positions then the chunk's own. Returns (1, m, heads, d), as transformers' attention
    functions do. A chunk with no cache (the prompt's first) goes to transformers' SDPA function; a
    batch of rows is refused: under this implementation the model builds no padding mask for it."""
    rows, heads, m, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    if rows != 1:
        raise ValueError(f"chunk_over_cache_attention is for one unpadded row at a time, got {rows} rows")
    if n <= m or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else d ** -0.5
    dtype = compute_dtype(query)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    per_kv, cached = heads // kv_heads, n - m
    # query head h reads kv head h // per_kv (transformers' repeat_kv order)
    o_cache, lse_cache = attend(q.reshape(1, kv_heads, per_kv * m, d), k[:, :, :cached], v[:, :, :cached], scale)
    own_k = k[:, :, cached:].repeat_interleave(per_kv, dim=1)  # the chunk's own m positions: a small copy
    own_v = v[:, :, cached:].repeat_interleave(per_kv, dim=1)
    o_own, lse_own = attend_causal(q, own_k, own_v, scale)
    out = merge(o_cache.reshape(1, heads, m, d), lse_cache.reshape(1, heads, m), o_own, lse_own)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def supported(model) -> bool:
    """Plain softmax attention: no soft-capping, no sinks, no sliding windows."""
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and (getattr(config, "attn_logit_softcapping", None)
                                   or getattr(config, "use_sliding_window", False)
                                   or "sliding_attention" in (getattr(config, "layer_types", None) or [])):
            return False
        if hasattr(m, "sinks"):
            return False
    return True


def shared_prefix_attention(model):
    """Within: the model's attention layers read a SharedPrefixCache (every config under ``model``,
    through any wrappers, switched to this attention and back)."""
    return attention_implementation(model, NAME, shared_prefix_attention_forward)


def chunk_over_cache_attention(model):
    """Within: the model's attention layers compute a one-row prefill chunk that continues a cache by
    the split above (``chunk_over_cache_attention_forward``)."""
    return attention_implementation(model, CHUNK_NAME, chunk_over_cache_attention_forward)


@contextmanager
def attention_implementation(model, name: str, forward):
    """Every config under ``model`` (through any wrappers) switched to attention function ``forward``
    registered as ``name``, and back on leaving."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, forward)
    configs = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    before = {i: c._attn_implementation for i, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for i, c in configs.items():
            c._attn_implementation = before[i]

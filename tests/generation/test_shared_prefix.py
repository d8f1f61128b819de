"""The shared-prefix cache: attention over [shared segment; row tail] equals dense attention over the
row's whole sequence, the segment is stored once however many rows read it, and the sampler uses it
for long prompts with the same completions as the dense padded batch."""

import torch

from stagewise.generation.shared_prefix import SharedPrefixCache, attend, attend_math


def _dense(q, k, v, scale):
    """Reference: plain softmax attention of one row. q (heads, d), k/v (kv_heads, n, d) -> (heads, d)."""
    per_kv = q.size(0) // k.size(0)
    k, v = k.repeat_interleave(per_kv, 0), v.repeat_interleave(per_kv, 0)
    w = torch.softmax((q[:, None, :] @ k.transpose(-1, -2)).squeeze(1) * scale, -1)  # (heads, n)
    return (w[:, None, :] @ v).squeeze(1)


def test_attention_over_segment_and_tail_equals_dense_attention():
    g = torch.Generator().manual_seed(0)
    kv_heads, heads, d, layers = 2, 6, 16, 2
    shared = [(torch.randn(1, kv_heads, 40, d, generator=g), torch.randn(1, kv_heads, 40, d, generator=g))
              for _ in range(layers)]

    def prompt(n, base=None):  # a prompt's per-layer cache; the first 40 positions from `base` when given
        out = []
        for li in range(layers):
            k, v = torch.randn(1, kv_heads, n, d, generator=g), torch.randn(1, kv_heads, n, d, generator=g)
            if base is not None:
                k[:, :, :40], v[:, :, :40] = base[li]
            out.append((k, v))
        return out

    # prompts 0 and 1 share 40 positions (0 owns the segment), prompt 2 is its own segment, whole
    caches = [prompt(55, shared), prompt(47, shared), prompt(30)]
    cache = SharedPrefixCache.from_prompts(caches, [(0, 40), (0, 40), (2, 30)], room=4)
    cache.batch_repeat_interleave(3)  # 9 rows: 3 completions per prompt
    assert [s[0].size(0) for s in cache.segments[0]] == [1, 1]  # each segment stored once, not per row
    assert cache.tail_k[0].shape == (9, kv_heads, 15 + 4, d)  # the longest own part (55 - 40) + room
    full = {r: [[caches[r // 3][li][0][0], caches[r // 3][li][1][0]] for li in range(layers)] for r in range(9)}
    scale = d ** -0.5
    rows = list(range(9))
    for step in range(3):
        if step == 2:  # rows 1 and 4 finished: they leave the batch
            rows = [r for r in rows if r not in (1, 4)]
            cache.batch_select_indices(torch.tensor([i for i, r in enumerate(range(9)) if r not in (1, 4)]))
        for li in range(layers):
            k_new = torch.randn(len(rows), kv_heads, 1, d, generator=g)
            v_new = torch.randn(len(rows), kv_heads, 1, d, generator=g)
            view, _ = cache.update(k_new, v_new, li)
            q = torch.randn(len(rows), heads, 1, d, generator=g)
            out = view.cache.attention(li, q, scale)  # (rows, 1, heads, d)
            for j, r in enumerate(rows):
                full[r][li][0] = torch.cat([full[r][li][0], k_new[j]], 1)
                full[r][li][1] = torch.cat([full[r][li][1], v_new[j]], 1)
                ref = _dense(q[j, :, 0], full[r][li][0], full[r][li][1], scale)
                torch.testing.assert_close(out[j, 0], ref, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 55 + 3


def test_attend_returns_the_log_sum_exp():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 4)
    mask[0, ..., 3] = float("-inf")
    s = (q @ k.transpose(-1, -2)) * 0.5 + mask
    for fn in (attend, attend_math):  # the CPU kernel, and the fp32 path other devices take
        out, lse = fn(q, k, v, 0.5, mask)
        torch.testing.assert_close(lse, s.logsumexp(-1))
        torch.testing.assert_close(out, s.softmax(-1) @ v)


def test_sampler_decodes_long_prompts_through_the_shared_prefix_cache(monkeypatch):
    """Two 1,300-token prompts sharing 1,100 tokens, 4 completions each: decoded with the shared cache
    (its attention really runs), the completions equal the dense padded batch's and the log-probs agree
    to rounding."""
    import stagewise.generation.sampling as sampling
    from stagewise.generation import shared_prefix

    model = long_context_tiny()
    g = torch.Generator().manual_seed(2)
    common = torch.randint(0, 256, (1100,), generator=g)
    ids = torch.stack([torch.cat([common, torch.randint(0, 256, (200,), generator=g)]) for _ in range(2)])
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=8, eos_token_ids=[259], pad_token_id=258, num_samples=4, seeds=list(range(8)),
              temperature=1.0, with_logprobs=True)
    calls = []
    real = shared_prefix.SharedPrefixCache.attention
    monkeypatch.setattr(shared_prefix.SharedPrefixCache, "attention",
                        lambda self, *a: calls.append(1) or real(self, *a))
    shared = sampling.sample(model, ids, mask, **kw)
    assert len(calls) == 2 * 7  # 2 layers x 7 decode steps after the first token
    assert model.config._attn_implementation != shared_prefix.NAME  # switched back after decoding
    monkeypatch.setattr(sampling, "SPLIT_PREFILL_FROM", 10**9)
    dense = sampling.sample(model, ids, mask, **kw)
    assert len(calls) == 2 * 7
    assert torch.equal(shared[0], dense[0]) and torch.equal(shared[1], dense[1])
    torch.testing.assert_close(shared[3], dense[3], atol=1e-4, rtol=1e-4)


def test_prefix_store_finds_the_longest_whole_block_prefix_and_keeps_to_its_budget():
    from types import SimpleNamespace

    from stagewise.generation.prefix_store import PrefixStore

    def layers(n):  # one layer of fp32 keys/values, 1 kv head of width 2: 16 bytes per token
        return [SimpleNamespace(keys=torch.zeros(1, 1, n, 2), values=torch.zeros(1, 1, n, 2))]

    store = PrefixStore(budget_bytes=16 * 25)
    a = torch.arange(10)
    store.add(a, layers(10), block=4)
    # a prompt extending the whole stored one (the conversation's next turn) gets all of it
    assert store.longest(torch.cat([a, torch.tensor([99])]), 4, below=11)[0] == 10
    assert store.longest(torch.cat([a, torch.tensor([99])]), 4, below=10)[0] == 8  # else whole blocks only
    assert store.longest(a, 4, below=8)[0] == 4  # must leave a token to compute: at most 7, one block
    other = a.clone()
    other[5] = 42
    assert store.longest(other, 4, below=10)[0] == 4  # diverges inside the second block
    assert store.longest(torch.arange(1, 11), 4, below=10) == (0, None)
    store.add(torch.arange(100, 112), layers(12), block=4)  # 10 + 12 tokens fit in 25
    store.add(torch.arange(200, 208), layers(8), block=4)  # 30 > 25: the least recently used (a) goes
    assert store.longest(a, 4, below=10) == (0, None)
    assert store.longest(torch.arange(100, 112), 4, below=12)[0] == 8
    assert store.used == 16 * 20


def long_context_tiny():
    """The tiny Llama with rotary tables for 2,048 positions."""
    from tests.conftest import build_tiny_model

    model = build_tiny_model(260).eval()
    model.config.max_position_embeddings = 2048
    return type(model)(model.config).eval()


class PrefillCounting(torch.nn.Module):
    """A model wrapper recording the length of every multi-token forward (prefill chunks) in ``seen``."""

    def __init__(self, m):
        super().__init__()
        self.m, self.config, self.seen = m, m.config, []

    def forward(self, input_ids, **k):
        if input_ids.size(1) > 1:
            self.seen.append(input_ids.size(1))
        return self.m(input_ids=input_ids, **k)


def test_engine_prefills_only_what_a_conversation_added_since_its_last_turn():
    """A 1,300-token prompt, then the same prompt extended by 400 tokens (the next turn): the second call
    runs only the 400 new tokens through the model (to the next block boundary, then whole blocks),
    and its logits are a fresh prefill's (fp32: equal to rounding; another chunking of the same
    tokens)."""
    import stagewise.generation.sampling as sampling
    from stagewise.generation.engines import LocalGenerator, SamplingParams
    from tests.conftest import build_tokenizer

    model = long_context_tiny()
    counting = PrefillCounting(model)
    seen = counting.seen

    g = torch.Generator().manual_seed(3)
    first = torch.randint(0, 256, (1300,), generator=g)
    second = torch.cat([first, torch.randint(0, 256, (400,), generator=g)])
    engine = LocalGenerator(counting, build_tokenizer(), device="cpu")
    params = SamplingParams(max_new_tokens=1, greedy=True, stop_token_ids=(259,))
    engine.generate([first.tolist()], n=1, seeds=None, params=params)
    assert sum(seen) == 1300
    seen.clear()
    engine.generate([second.tolist()], n=1, seeds=None, params=params)
    assert seen == [1536 - 1300, 1700 - 1536] and engine.prefix_store.hits == 1
    with torch.no_grad():
        ids = second[None]
        _, reused = sampling.prefill(model, ids, torch.ones_like(ids), torch.arange(1700)[None], lockstep=False,
                                     store=engine.prefix_store)
        _, fresh = sampling.prefill(model, ids, torch.ones_like(ids), torch.arange(1700)[None], lockstep=False)
    assert torch.allclose(reused, fresh, atol=1e-5), (reused - fresh).abs().max()


def test_a_turns_completion_is_stored_with_its_prompt_and_not_prefilled_again():
    """A 1,300-token prompt sampled (seeded) until a stop token at step i >= 2; the next turn (that prompt,
    the completion, 300 more tokens) prefills only from the stop token on: the i decoded tokens' keys
    and values come from the store. Its logits are a fresh prefill's (fp32, to rounding)."""
    import stagewise.generation.sampling as sampling
    from stagewise.generation.engines import LocalGenerator, SamplingParams
    from tests.conftest import build_tokenizer

    model = long_context_tiny()
    counting = PrefillCounting(model)
    seen = counting.seen

    g = torch.Generator().manual_seed(5)
    first = torch.randint(0, 256, (1300,), generator=g).tolist()
    probe = LocalGenerator(model, build_tokenizer(), device="cpu", prefix_cache_gib=0)
    drawn = probe.generate([first], n=1, seeds=[7], params=SamplingParams(max_new_tokens=12, temperature=1.0,
                                                                          stop_token_ids=(-1,))).tokens[0]
    i = next(j for j in range(2, 12) if drawn[j] not in drawn[:j])  # a token first drawn at step i >= 2
    engine = LocalGenerator(counting, build_tokenizer(), device="cpu")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=(drawn[i],))
    completion = engine.generate([first], n=1, seeds=[7], params=params).tokens[0]
    assert completion == drawn[:i + 1]
    seen.clear()
    second = first + completion + torch.randint(0, 256, (300,), generator=g).tolist()
    engine.generate([second], n=1, seeds=[8], params=params)
    stored = 1300 + i  # the prompt and the i decoded tokens run through the model (not the stop token)
    assert seen == [1536 - stored, len(second) - 1536]
    with torch.no_grad():
        ids = torch.tensor([second])
        _, reused = sampling.prefill(model, ids, torch.ones_like(ids), torch.arange(len(second))[None],
                                     lockstep=False, store=engine.prefix_store)
        _, fresh = sampling.prefill(model, ids, torch.ones_like(ids), torch.arange(len(second))[None], lockstep=False)
    assert torch.allclose(reused, fresh, atol=1e-5), (reused - fresh).abs().max()


def test_prefix_store_extends_a_stored_prompt_and_drops_its_copy_first():
    from types import SimpleNamespace

    from stagewise.generation.prefix_store import PrefixStore

    store = PrefixStore(budget_bytes=16 * 40)  # 16 bytes per token (one fp32 layer, 1 kv head of width 2)
    a = torch.arange(10)
    store.add(a, [SimpleNamespace(keys=torch.zeros(1, 1, 10, 2), values=torch.zeros(1, 1, 10, 2))], block=4)
    more_kv = [(torch.ones(1, 1, 3, 2), torch.full((1, 1, 3, 2), 2.0))]
    assert store.extend(a, torch.tensor([50, 51, 52]), more_kv, block=4)
    assert not store.extend(torch.arange(1, 11), torch.tensor([1]), more_kv, block=4)  # not a stored prompt
    store.add(torch.arange(100, 120), [SimpleNamespace(keys=torch.zeros(1, 1, 20, 2),
                                                       values=torch.zeros(1, 1, 20, 2))], block=4)
    # 10 + 13 + 20 tokens > 40: the prompt's own copy goes first, the extended one stays
    assert store.used == 16 * 33 and sorted(e.tokens.numel() for e in store.entries.values()) == [13, 20]
    n, layers = store.longest(torch.cat([a, torch.tensor([50, 51, 52, 7])]), 4, below=14)
    assert n == 13 and torch.equal(layers[0].values[0, 0, 10:], torch.full((3, 2), 2.0))
    assert torch.equal(layers[0].keys[0, 0, :10], torch.zeros(10, 2))


def test_a_decode_step_asks_the_device_nothing_per_layer(monkeypatch):
    """Host syncs (int(tensor), .item(), .tolist()) serialise kernel launches on a GPU: a decode
    step's per-layer update + attention must not need any (a 36-layer model made 72 per token)."""
    g = torch.Generator().manual_seed(0)
    kv_heads, heads, d, layers = 2, 4, 8, 6
    caches = [[(torch.randn(1, kv_heads, n, d, generator=g), torch.randn(1, kv_heads, n, d, generator=g))
               for _ in range(layers)] for n in (20, 17)]
    cache = SharedPrefixCache.from_prompts(caches, [(0, 16), (0, 16)], room=8)
    cache.batch_repeat_interleave(2)
    cache.groups()  # once per batch
    syncs = []
    for name in ("__int__", "item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            syncs.append(_name) or _real(self, *a, **k))
    for _ in range(3):  # three decode steps through every layer
        for li in range(layers):
            view, _ = cache.update(torch.randn(4, kv_heads, 1, d), torch.randn(4, kv_heads, 1, d), li)
            view.cache.attention(li, torch.randn(4, heads, 1, d), d ** -0.5)
    assert syncs == []
    monkeypatch.undo()
    assert cache.tail_max == [int(n.max()) for n in cache.tail_len] == [4 + 3] * layers


def test_cuda_attention_takes_a_kernel_that_returns_the_log_sum_exp(monkeypatch):
    """On CUDA the tail and segment attention go to the memory-efficient SDPA kernel (it returns the
    log-sum-exp and takes a mask), not to fp32 matmuls over the whole prefix. Checked here through the
    dispatch, with the kernel replaced by a recording stub (no GPU on this machine); make gpu-check
    compares the real kernel with the math path."""
    from stagewise.generation import shared_prefix

    assert shared_prefix.kernel_for("cuda") is shared_prefix.attend_cuda
    assert shared_prefix.kernel_for("cpu") is shared_prefix.attend_cpu
    assert shared_prefix.kernel_for("mps") is shared_prefix.attend_math
    seen = []

    def kernel(q, k, v, bias, compute_lse, dropout, causal, scale):
        seen.append((tuple(bias.shape) if bias is not None else None, compute_lse, causal, scale))
        out, lse = attend_math(q, k, v, scale, bias, causal)
        return out, torch.nn.functional.pad(lse, (0, 32 - lse.size(-1))), None, None  # lse padded as CUDA's

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", kernel, raising=False)
    monkeypatch.setattr(shared_prefix, "_cuda_kernel_failed", [])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 4)
    mask[0, ..., 3] = float("-inf")
    out, lse = shared_prefix.attend_cuda(q, k, v, 0.5, mask)
    ref_out, ref_lse = attend_math(q, k, v, 0.5, mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert seen == [((2, 3, 4, 4), True, False, 0.5)]
    # a prefill chunk's attention to itself: the kernel's own causal flag, no bias
    out, lse = shared_prefix.attend_cuda(q, k, v, 0.5, causal=True)
    ref_out, ref_lse = attend_math(q, k, v, 0.5, torch.full((4, 4), float("-inf")).triu(1))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert seen[1] == (None, True, True, 0.5)


def test_prefix_store_keeps_what_conversations_share_once():
    """Three conversations opening with the same two blocks: those blocks are stored once (a head),
    each conversation's own positions in its entry; every lookup returns the prompt's own keys and
    values; a conversation's previous turn is dropped first, and a head goes with its last entry."""
    from types import SimpleNamespace

    from stagewise.generation.prefix_store import PrefixStore

    def kv_of(tokens):  # one layer, 1 kv head of width 2 (16 bytes per token): keys tell the tokens apart
        k = tokens.float()[None, None, :, None].expand(1, 1, -1, 2).contiguous()
        return [SimpleNamespace(keys=k, values=-k)]

    system = torch.arange(8)  # two blocks of 4
    convs = [torch.cat([system, torch.tensor([100 + i, 200 + i, 300 + i])]) for i in range(3)]
    store = PrefixStore(budget_bytes=16 * 39)
    for c in convs:
        store.add(c, kv_of(c), block=4)
    assert len(store.heads) == 1 and store.used == 16 * (8 + 3 * 3)  # not 3 x 11
    for c in convs:
        n, layers = store.longest(torch.cat([c, torch.tensor([7])]), 4, below=12)
        assert n == 11 and torch.equal(layers[0].keys, kv_of(c)[0].keys)
        assert torch.equal(layers[0].values, -layers[0].keys)
    # conversation 0's next turn: it extends the whole stored turn and points to the head; 8 + 3 x 3 + 23
    # tokens are over the budget, and the turn it extended goes first (not the others, used since)
    turn = torch.cat([convs[0], torch.arange(500, 520)])
    assert store.longest(turn, 4, below=len(turn))[0] == 11
    store.add(turn, kv_of(turn), block=4)
    assert sorted((e.tokens[8].item(), e.tokens.numel()) for e in store.entries.values()) == \
        [(100, 31), (101, 11), (102, 11)]
    assert store.used == 16 * (8 + 2 * 3 + 23)
    head = next(iter(store.heads.values()))
    assert all(e.head is head for e in store.entries.values()) and head.refs == 3
    n, layers = store.longest(torch.cat([turn, torch.tensor([7])]), 4, below=len(turn) + 1)
    assert n == len(turn) and torch.equal(layers[0].keys, kv_of(turn)[0].keys)
    assert store.longest(torch.cat([convs[0], torch.tensor([7])]), 4, below=12)[0] == 8  # its old turn: gone
    # the head goes with the last entry that points to it
    for key in list(store.entries):
        store._drop(key, 4)
    assert store.used == 0 and not store.heads and not store.index


def test_causal_attention_with_lse_matches_the_masked_reference():
    from stagewise.generation.shared_prefix import attend_causal

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 7, 8, generator=g) for _ in range(3))
    future = torch.full((7, 7), float("-inf")).triu(1)
    out, lse = attend_causal(q, k, v, 0.3)
    ref_out, ref_lse = attend_math(q, k, v, 0.3, future)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_a_chunk_over_a_cache_attends_as_dense_causal_attention():
    """q (1, 4 heads, m, d) over 2 kv heads of n keys, the last m of them the chunk's own: the split
    (cached keys unmasked, GQA folded into the queries; the chunk causally; merged) equals dense
    bottom-right causal attention; a chunk with no cache goes to transformers' SDPA, a batch of rows is
    refused (the model builds no padding mask under this attention)."""
    from types import SimpleNamespace

    import pytest

    from stagewise.generation.shared_prefix import chunk_over_cache_attention_forward

    g = torch.Generator().manual_seed(3)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    for m, n in [(1, 9), (5, 40), (16, 16)]:
        q = torch.randn(1, 4, m, 8, generator=g)
        k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
        out, _ = chunk_over_cache_attention_forward(module, q, k, v, None, scaling=0.4)
        assert out.shape == (1, m, 4, 8)
        for i in range(m):  # query i sits at position n - m + i: it reads keys 0 .. n - m + i
            seen = n - m + i + 1
            torch.testing.assert_close(out[0, i], _dense(q[0, :, i], k[0, :, :seen], v[0, :, :seen], 0.4))
    two = torch.randn(2, 4, 3, 8, generator=g)
    with pytest.raises(ValueError, match="one unpadded row"):
        chunk_over_cache_attention_forward(module, two, torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), None)


def test_prefill_chunks_that_continue_a_cache_give_the_models_own_logits_and_cache(monkeypatch):
    """A tiny GQA Llama prefilled in two chunks (the second continues the first's cache): under the
    chunk attention, logits and keys/values equal the model's own SDPA path to fp32 rounding, the
    split really ran (its causal kernel was called), and the model's attention is restored after."""
    from contextlib import nullcontext

    from transformers import DynamicCache

    import stagewise.generation.shared_prefix as sp
    from tests.conftest import build_tiny_model

    model = build_tiny_model(260).eval()
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(4))
    calls = []
    real = sp.attend_causal
    monkeypatch.setattr(sp, "attend_causal", lambda *a: calls.append(1) or real(*a))
    results = []
    for split in (False, True):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :200], past_key_values=cache, use_cache=True)
            with sp.chunk_over_cache_attention(model) if split else nullcontext():
                out = model(input_ids=ids[:, 200:], position_ids=torch.arange(200, 300)[None], past_key_values=cache,
                            use_cache=True)
        results.append((out.logits, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]))
        assert len(calls) == (2 if split else 0)  # once per layer, only under the split
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for (k1, v1), (k0, v0) in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(k1, k0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"

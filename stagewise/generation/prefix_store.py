"""Prompt caches kept between generate calls, found again by their whole-block prefixes.

    store = PrefixStore(budget_bytes=2**30)
    hit = store.longest(tokens, block=512)        # (length, layers) of the longest stored whole-block prefix
    store.add(tokens, layers, block=512)          # after prefilling `tokens`

Why: a multi-turn episode's next prompt is its last prompt plus what was said since, and every
episode of a tau2 domain starts with the same ~5,000 tokens of policy and tool schemas. Within one
engine (one rollout phase, one evaluation: the weights do not change) prefilling them again each
turn was most of the sampler's time. This is vLLM's automatic prefix caching, at our 512-token
block granularity: blocks sit at fixed offsets, so a block computed from a stored cache is bit for
bit the block computed afresh. A prompt that extends a whole stored prompt (the same conversation's
previous turn) starts from all of it, so a turn prefills only what was said since; its numbers
then follow the conversation's own turns (the same whatever the batch), unless the budget dropped
that prompt in between.

Least recently used prompts are dropped once the stored keys and values pass ``budget_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def block_hashes(tokens: torch.Tensor, block: int) -> list[int]:
    """hashes[b] identifies tokens[: (b + 1) * block], for every whole block (chained: O(n))."""
    out, h = [], 0
    ids = tokens.tolist()
    for s in range(0, len(ids) - block + 1, block):
        h = hash((h, tuple(ids[s:s + block])))
        out.append(h)
    return out


class PrefixStore:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[int, tuple[torch.Tensor, list]] = OrderedDict()  # id -> (tokens, layers)
        self.index: dict[int, int] = {}  # hash of a whole-block prefix -> entry id holding it
        self.sizes: dict[int, int] = {}
        self.used, self._next = 0, 0
        self.hits = self.reused_tokens = 0

    def longest(self, tokens: torch.Tensor, block: int, below: int) -> tuple[int, list | None]:
        """The longest stored prefix of ``tokens`` shorter than ``below`` tokens: a whole stored prompt
        (an episode's previous turn: its next turn prefills only what was said since) or else the
        longest whole-block prefix; (its length, the stored prompt's cache layers, to be cut
        there), or (0, None)."""
        hashes = block_hashes(tokens[: min(len(tokens), below - 1) // block * block], block)
        for b in range(len(hashes), 0, -1):
            entry = self.index.get(hashes[b - 1])
            if entry is None:
                continue
            stored, layers = self.entries[entry]
            n = b * block
            if stored.numel() >= n and torch.equal(stored[:n], tokens[:n]):  # not a hash collision
                full = stored.numel()
                if n < full < below and full <= tokens.numel() and torch.equal(stored, tokens[:full]):
                    n = full  # the whole stored prompt: this conversation's previous turn
                self.entries.move_to_end(entry)
                self.hits += 1
                self.reused_tokens += n
                return n, layers
        return 0, None

    def add(self, tokens: torch.Tensor, layers: list, block: int) -> None:
        """Keep a prefilled prompt's cache (layers with ``.keys`` / ``.values``, (1, kv_heads, n, d)),
        reachable through each of its whole-block prefixes."""
        hashes = block_hashes(tokens, block)
        if not hashes or self.budget <= 0:
            return
        size = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in layers)
        if size > self.budget:
            return
        entry, self._next = self._next, self._next + 1
        self.entries[entry] = (tokens, layers)
        self.sizes[entry] = size
        self.used += size
        for h in hashes:
            self.index[h] = entry  # the newest prompt holding a prefix answers for it
        while self.used > self.budget:
            old, (old_tokens, _) = self.entries.popitem(last=False)
            self.used -= self.sizes.pop(old)
            for h in block_hashes(old_tokens, block):
                if self.index.get(h) == old:
                    del self.index[h]

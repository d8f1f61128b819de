"""Prompt caches kept between generate calls, found again by their whole-block prefixes.

    store = PrefixStore(budget_bytes=2**30)
    hit = store.longest(tokens, block=256)        # (length, layers) of the longest stored whole-block prefix
    store.add(tokens, layers, block=256)          # after prefilling `tokens`

Why: a multi-turn episode's next prompt is its last prompt plus what was said since, and every
episode of a tau2 domain starts with the same ~5,000 tokens of policy and tool schemas. Within one
engine (one rollout phase, one evaluation: the weights do not change) prefilling them again each
turn was most of the sampler's time. This is vLLM's automatic prefix caching, at our 256-token
block granularity: blocks sit at fixed offsets, so a block computed from a stored cache is bit for
bit the block computed afresh. A prompt that extends a whole stored prompt (the same conversation's
previous turn) starts from all of it, so a turn prefills only what was said since; its numbers
then follow the conversation's own turns (the same whatever the batch), unless the budget dropped
that prompt in between.

Memory: what different conversations share (the whole blocks of a domain's system prompt) is
kept once, as a *head* that their entries point to, and each entry keeps only its own tail: 40
tau2 conversations cost one ~5k-token head and 40 tails, not 40 copies of the policy (without
this, 40 retail conversations overflowed a 4 GiB store, and a store that overflows in a cyclic
access pattern misses on every turn). A prompt's previous turn, once the next turn has extended
it, is the first to be dropped; otherwise the least recently used prompts go once the stored keys
and values pass ``budget_bytes`` (a head goes with the last entry pointing to it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


def block_hashes(tokens: torch.Tensor, block: int) -> list[int]:
    """hashes[b] identifies tokens[: (b + 1) * block], for every whole block (chained: O(n))."""
    out, h = [], 0
    ids = tokens.tolist()
    for s in range(0, len(ids) - block + 1, block):
        h = hash((h, tuple(ids[s:s + block])))
        out.append(h)
    return out


def nbytes(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


@dataclass
class _Head:
    """Keys and values of a whole-block prefix several stored prompts share: (1, kv_heads, n, d) per layer."""
    tokens: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    size: int
    refs: int = 0


@dataclass
class _Entry:
    tokens: torch.Tensor  # the whole prompt
    head: _Head | None  # its first len(head.tokens) positions, shared; None: ``tail`` is the whole prompt
    tail: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, the positions after the head
    size: int  # the tail's bytes (the head is counted once, with the head)


class _Joined:
    """A stored prompt's layer as the sampler reads it (``.keys`` / ``.values``, the whole prompt)."""

    def __init__(self, head: tuple | None, tail: tuple):
        self._head, self._tail = head, tail

    def _cat(self, i: int) -> torch.Tensor:
        if self._head is None:
            return self._tail[i]
        return torch.cat([self._head[i], self._tail[i]], dim=2) if self._tail[i].size(2) else self._head[i]

    @property
    def keys(self) -> torch.Tensor:
        return self._cat(0)

    @property
    def values(self) -> torch.Tensor:
        return self._cat(1)


class PrefixStore:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # id -> entry, least recently used first
        self.index: dict[int, int] = {}  # hash of a whole-block prefix -> entry id holding it
        self.heads: dict[int, _Head] = {}  # hash of a head's whole prefix -> head
        self.ends: dict[int, list[int]] = {}  # hash of a prompt's whole blocks -> the entries of those blocks
        self.used, self._next = 0, 0
        self.hits = self.reused_tokens = 0

    def longest(self, tokens: torch.Tensor, block: int, below: int) -> tuple[int, list | None]:
        """The longest stored prefix of ``tokens`` shorter than ``below`` tokens: a whole stored prompt
        (an episode's previous turn: its next turn prefills only what was said since) or else the
        longest whole-block prefix; (its length, the stored prompt's cache layers, to be cut
        there), or (0, None)."""
        hashes = block_hashes(tokens[: min(len(tokens), below - 1) // block * block], block)
        whole = blocks = None  # (length, entry id)
        for b in range(len(hashes), 0, -1):
            # stored prompts whose whole blocks are these b: is one of them a prefix of tokens?
            for key in self.ends.get(hashes[b - 1], ()):
                stored = self.entries[key].tokens
                n = stored.numel()
                if n < below and n <= tokens.numel() and (whole is None or n > whole[0]) and \
                        torch.equal(stored, tokens[:n]):
                    whole = (n, key)
            if whole is not None:
                break
        for b in range(len(hashes), 0, -1):
            key = self.index.get(hashes[b - 1])
            if key is not None and torch.equal(self.entries[key].tokens[:b * block], tokens[:b * block]):
                blocks = (b * block, key)  # (the equality rules out a hash collision)
                break
        if whole is None and blocks is None:
            return 0, None
        extended = whole is not None and (blocks is None or whole[0] >= blocks[0])
        n, key = whole if extended else blocks
        # a conversation's previous turn is stored again once extended: this copy is the first to go
        self.entries.move_to_end(key, last=not extended)
        self.hits += 1
        self.reused_tokens += n
        return n, self._layers(self.entries[key])

    def _layers(self, entry: _Entry) -> list:
        if entry.head is None:
            return [_Joined(None, kv) for kv in entry.tail]
        return [_Joined(h, t) for h, t in zip(entry.head.kv, entry.tail)]

    def add(self, tokens: torch.Tensor, layers: list, block: int) -> None:
        """Keep a prefilled prompt's cache (layers with ``.keys`` / ``.values``, (1, kv_heads, n, d)),
        reachable through each of its whole-block prefixes; its whole blocks shared with another
        conversation's stored prompt are kept once, as a head."""
        hashes = block_hashes(tokens, block)
        if not hashes or self.budget <= 0:
            return
        kv = [(layer.keys, layer.values) for layer in layers]
        if nbytes(kv) > self.budget:
            return
        head = self._head_for(tokens, hashes, kv, block)
        start = 0 if head is None else head.tokens.numel()
        tail = [(k[:, :, start:].clone(), v[:, :, start:].clone()) if start else (k, v) for k, v in kv]
        self._insert(tokens, hashes, head, tail, block)

    def extend(self, tokens: torch.Tensor, more: torch.Tensor, more_kv: list[tuple[torch.Tensor, torch.Tensor]],
               block: int) -> bool:
        """Keep ``tokens + more`` where ``tokens`` is a stored prompt and ``more_kv`` (per layer (k, v) of
        (1, kv_heads, len(more), d)) the keys and values of ``more`` after it: a turn's completion, which
        decoding computed, so the episode's next turn need not prefill it again. The prompt's copy goes
        first from then on. -> False when the prompt is no longer stored (nothing kept)."""
        hashes = block_hashes(tokens, block)
        if not hashes or not more.numel():
            return False
        key = next((k for k in self.ends.get(hashes[-1], ()) if torch.equal(self.entries[k].tokens, tokens)), None)
        if key is None:
            return False
        entry = self.entries[key]
        tail = [(torch.cat([k, mk.to(k.dtype)], dim=2), torch.cat([v, mv.to(v.dtype)], dim=2))
                for (k, v), (mk, mv) in zip(entry.tail, more_kv)]
        self.entries.move_to_end(key, last=False)
        whole = torch.cat([tokens, more.to(tokens.device)])
        self._insert(whole, block_hashes(whole, block), entry.head, tail, block)
        return True

    def _insert(self, tokens: torch.Tensor, hashes: list[int], head: _Head | None, tail: list, block: int) -> None:
        entry = _Entry(tokens, head, tail, nbytes(tail))
        key, self._next = self._next, self._next + 1
        self.entries[key] = entry
        self.used += entry.size
        if head is not None:
            head.refs += 1
        for h in hashes:
            self.index[h] = key  # the newest prompt holding a prefix answers for it
        self.ends.setdefault(hashes[-1], []).append(key)
        while self.used > self.budget and len(self.entries) > 1:
            self._drop(next(iter(self.entries)), block)
        if self.used > self.budget:  # the new prompt alone, with its head, is over the budget
            self._drop(key, block)

    def _head_for(self, tokens: torch.Tensor, hashes: list[int], kv: list, block: int) -> _Head | None:
        """The head this prompt's first positions can point to: a stored head that is a prefix of it,
        or a new one of the whole blocks it shares with another conversation's stored prompt (not one
        its own previous turn: a stored prompt that this one extends)."""
        for b in range(len(hashes), 0, -1):
            head = self.heads.get(hashes[b - 1])
            if head is not None and head.tokens.numel() < tokens.numel() and \
                    torch.equal(head.tokens, tokens[:head.tokens.numel()]):
                return head
        for b in range(len(hashes), 0, -1):
            key = self.index.get(hashes[b - 1])
            if key is None:
                continue
            other, n = self.entries[key], b * block
            if n >= tokens.numel() or not torch.equal(other.tokens[:n], tokens[:n]):
                continue
            if other.tokens.numel() <= tokens.numel() and torch.equal(other.tokens, tokens[:other.tokens.numel()]):
                return None  # its own previous turn: nothing shared with another conversation
            head_kv = [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in kv]
            head = _Head(tokens[:n].clone(), head_kv, nbytes(head_kv))
            self.heads[hashes[b - 1]] = head
            self.used += head.size
            if other.head is None:  # the other prompt's copy of those blocks goes: it points to the head too
                self.used -= other.size
                other.tail = [(k[:, :, n:].clone(), v[:, :, n:].clone()) for k, v in other.tail]
                other.size, other.head = nbytes(other.tail), head
                self.used += other.size
                head.refs += 1
            return head
        return None

    def _drop(self, key: int, block: int) -> None:
        entry = self.entries.pop(key)
        self.used -= entry.size
        hashes = block_hashes(entry.tokens, block)
        for h in hashes:
            if self.index.get(h) == key:
                del self.index[h]
        same_blocks = self.ends[hashes[-1]]
        same_blocks.remove(key)
        if not same_blocks:
            del self.ends[hashes[-1]]
        head = entry.head
        if head is not None:
            head.refs -= 1
            if head.refs == 0:
                self.used -= head.size
                self.heads = {h: x for h, x in self.heads.items() if x is not head}

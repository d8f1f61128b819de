"""SFT data: conversations (``data/records.py`` reads them) -> token ids with an assistant-only loss
mask -> padding-free packed rows.

    ids, train = tokenize_conversation(tok, conv, max_len=512)             # train[i]: token i is learnt
    rows = pack([(ids, train), ...], max_len=512)                          # PackedRow(ids, positions, targets)

Only assistant tokens (each assistant turn's text and the end-of-turn token that follows it) are
learnt; system, user and template tokens are context. Where the chat template renders a turn
differently once later turns follow (not prefix-preserving), the conversation is refused with a
clear error rather than trained on misaligned masks.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.generation.chat_template import assistant_spans


def tokenize_conversation(tokenizer, conv: list[dict], max_len: int) -> tuple[list[int], list[bool]] | None:
    """-> (ids, train) truncated to max_len, or None when truncation leaves nothing to learn."""
    text, spans = assistant_spans(tokenizer, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # a token is learnt when it starts inside a learnt span (a token merging the turn's first
    # character with the template's whitespace before it starts outside and stays context)
    train = [any(s <= a < e for s, e in spans) and b > a for a, b in offsets]
    if not ids:
        return None
    ids, train = ids[:max_len], train[:max_len]
    if not any(train[1:]):  # position 0 is never a target: nothing precedes it
        return None
    return ids, train


# --- packing ----------------------------------------------------------------------------------------


IGNORE = -100


@dataclass
class PackedRow:
    ids: list[int]
    positions: list[int]  # restart at 0 for every example: attention never crosses examples
    targets: list[int]  # next-token id where that token is learnt, IGNORE elsewhere

    def __len__(self) -> int:
        return len(self.ids)


def example_targets(ids: list[int], train: list[bool]) -> list[int]:
    """targets[t] = ids[t+1] when token t+1 is learnt (position t predicts it), IGNORE otherwise."""
    return [ids[t + 1] if train[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def pack(examples: list[tuple[list[int], list[bool]]], max_len: int, packing: bool = True) -> list[PackedRow]:
    """Examples in order into rows of at most max_len tokens (one example per row without packing)."""
    rows: list[PackedRow] = []
    cur = PackedRow([], [], [])
    for ids, train in examples:
        if cur.ids and (not packing or len(cur) + len(ids) > max_len):
            rows.append(cur)
            cur = PackedRow([], [], [])
        cur.ids += ids
        cur.positions += list(range(len(ids)))
        cur.targets += example_targets(ids, train)
    if cur.ids:
        rows.append(cur)
    return rows

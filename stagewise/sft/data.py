"""SFT data: conversations (``data/records.py`` reads them) -> token ids with an assistant-only loss
mask -> padding-free packed rows.

    ids, train = tokenize_example(tok, example, max_len=512)               # train[i]: token i is learnt
    rows = pack([(ids, train), ...], max_len=512)                          # PackedRow(ids, positions, targets)

An episode record (``stagewise demos``: ``messages``, ``tools``, ``context_turns``) is rendered as
the episode loop built it (``tokenize_episode``): the opening with its tool schemas, each policy
turn as its own tokens plus the end-of-turn token, and what came back (tool results, the
customer's reply) as the template's continuation, so SFT trains on exactly the tokens a rollout of
the same conversation holds; only the policy's turns are learnt.

Only assistant tokens (each assistant turn's text and the end-of-turn token that follows it) are
learnt (but a turn with ``"weight": 0``, as in OpenAI's fine-tuning format: e.g. a wrong tool call
that a demonstration shows being corrected); system, user and template tokens are context. Where
the chat template renders a turn differently once later turns follow (not prefix-preserving), the
conversation is refused with a clear error rather than trained on misaligned masks.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.domains.base import Domain
from stagewise.errors import DataError
from stagewise.generation.chat_template import ChatRenderer, assistant_spans, turn_end_id


def tokenize_example(tokenizer, example: dict, max_len: int) -> tuple[list[int], list[bool]] | None:
    """A domain example (an episode record or a conversation) -> (ids, train) truncated to max_len,
    or None when truncation leaves nothing to learn."""
    if "context_turns" in example:
        ids, train = tokenize_episode(tokenizer, example["messages"], example.get("tools") or [],
                                      int(example["context_turns"]))
        return _truncated(ids, train, max_len)
    return tokenize_conversation(tokenizer, Domain.conversation(example), max_len)


def tokenize_episode(tokenizer, messages: list[dict], tools: list[dict],
                     context_turns: int) -> tuple[list[int], list[bool]]:
    """An episode's conversation -> (ids, train) exactly as ``rl/episodes.py`` built its tokens:
    ``messages[:context_turns]`` is the prompt; then each assistant message is a policy turn (its
    text's tokens and the end-of-turn token, learnt), and the messages up to the next one are what
    the environment appended (context). Messages after the last policy turn are not part of it."""
    renderer, stop_id = ChatRenderer(tokenizer), turn_end_id(tokenizer)
    stop = tokenizer.convert_ids_to_tokens(stop_id)
    ids = renderer.opening_ids(messages[:context_turns], tools)
    train = [False] * len(ids)
    k = context_turns
    while k < len(messages):
        turn = messages[k]
        if turn["role"] != "assistant":
            raise DataError(f"an episode record's message {k} is a {turn['role']!r} message where the policy's turn "
                            f"(assistant) comes (context_turns={context_turns})")
        own = tokenizer(turn["content"], add_special_tokens=False)["input_ids"] + [stop_id]
        ids += own
        train += [turn.get("weight", 1) != 0] * len(own)  # weight 0: a turn shown, not taught (a wrong call)
        j = k + 1
        while j < len(messages) and messages[j]["role"] != "assistant":
            j += 1
        if j < len(messages):  # the environment answered and the policy went on
            glue = renderer.continuation_ids(messages[:k], turn["content"], stop, messages[k + 1:j], tools)
            ids += glue
            train += [False] * len(glue)
        k = j
    return ids, train


def tokenize_conversation(tokenizer, conv: list[dict], max_len: int) -> tuple[list[int], list[bool]] | None:
    """-> (ids, train) truncated to max_len, or None when truncation leaves nothing to learn."""
    text, spans = assistant_spans(tokenizer, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # a token is learnt when it starts inside a learnt span (a token merging the turn's first
    # character with the template's whitespace before it starts outside and stays context)
    train = [any(s <= a < e for s, e in spans) and b > a for a, b in offsets]
    return _truncated(ids, train, max_len)


def _truncated(ids: list[int], train: list[bool], max_len: int) -> tuple[list[int], list[bool]] | None:
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

    @property
    def single(self) -> bool:
        """The row holds one example (positions 0 .. len-1)."""
        return self.positions.count(0) == 1


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

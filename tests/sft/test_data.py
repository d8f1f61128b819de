"""SFT data: record formats and their errors, assistant-only masks, packing."""

import json

import pytest

from stagewise.data.records import RecordFormat, read_records, to_conversation
from stagewise.errors import DataError
from stagewise.sft.data import IGNORE, example_targets, pack, tokenize_conversation

MULTI_TURN = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_dir):
    from stagewise.models import load_tokenizer

    return load_tokenizer(str(tiny_chat_dir))


def learnt_text(tok, ids, train, skip_special=True):
    return tok.decode([i for i, t in zip(ids, train) if t], skip_special_tokens=skip_special)


def test_only_assistant_turns_are_learnt(chat_tok):
    ids, train = tokenize_conversation(chat_tok, MULTI_TURN, max_len=512)
    # decoding the learnt tokens gives exactly the assistant texts, each followed by its end-of-turn token
    assert learnt_text(chat_tok, ids, train) == "Hello!4"
    assert learnt_text(chat_tok, ids, train, skip_special=False) == "Hello!<eos>4<eos>"
    # everything else (system, user, role tags, newlines) is context
    context = chat_tok.decode([i for i, t in zip(ids, train) if not t], skip_special_tokens=True)
    for part in ("Be brief.", "Hi there", "2+2?", "<|assistant|>", "<|user|>"):
        assert part in context


def test_an_assistant_turn_with_weight_0_is_context(chat_tok):
    """OpenAI's fine-tuning format: ``"weight": 0`` shows a turn without teaching it, e.g. a wrong tool
    call that the demonstration then corrects (the model learns the correction, not the mistake)."""
    from stagewise.sft.data import tokenize_example

    rec = {"messages": [{"role": "user", "content": "Order 12?"},
                        {"role": "assistant", "content": "CALL get_order(user=7)", "weight": 0},
                        {"role": "tool", "content": "error: unexpected argument user"},
                        {"role": "assistant", "content": "CALL get_order(id=12)"},
                        {"role": "tool", "content": "shipped"},
                        {"role": "assistant", "content": "It has shipped."}]}
    conv = to_conversation(rec, "d:1", RecordFormat())
    assert conv[1] == {"role": "assistant", "content": "CALL get_order(user=7)", "weight": 0}
    ids, train = tokenize_conversation(chat_tok, conv, max_len=512)
    assert learnt_text(chat_tok, ids, train) == "CALL get_order(id=12)It has shipped."
    assert "CALL get_order(user=7)" in chat_tok.decode(ids)  # still in the context the later turns see
    # an episode record (``stagewise demos``: token-in / token-out, as a rollout built it) likewise
    episode = {"messages": conv, "tools": [], "context_turns": 1}
    ids, train = tokenize_example(chat_tok, episode, max_len=512)
    assert learnt_text(chat_tok, ids, train) == "CALL get_order(id=12)It has shipped."
    # weight 1 is the default: written out, it changes nothing
    ones = [{**m, "weight": 1} if m["role"] == "assistant" else m for m in rec["messages"]]
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in rec["messages"]]
    assert to_conversation({"messages": ones}, "d:2", RecordFormat()) == plain


def test_assistant_mask_with_the_bundled_models_real_template():
    """SmolLM2's ChatML template and BPE tokenizer (merges across the turn boundary are the risk)."""
    pytest.importorskip("gguf")
    from stagewise.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("bundled:smollm2-135m-instruct"))
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, mostly."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": " Green"}]
    ids, train = tokenize_conversation(tok, conv, max_len=512)
    assert learnt_text(tok, ids, train) == "Blue, mostly. Green"
    assert learnt_text(tok, ids, train, skip_special=False).count("<|im_end|>") == 2


def test_record_formats_give_the_same_conversation():
    fmt = RecordFormat()
    a = to_conversation({"prompt": "q?", "completion": "a."}, "f:1", fmt)
    b = to_conversation({"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]},
                        "f:2", fmt)
    c = to_conversation({"question": "q", "reply": "a."}, "f:3",
                        RecordFormat(prompt_template="{question}?", response_field="reply"))
    assert a == b == c == [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]
    with_sys = to_conversation({"prompt": "q?", "answer": 7}, "f:4", RecordFormat(system="S"))
    assert with_sys == [{"role": "system", "content": "S"}, {"role": "user", "content": "q?"},
                        {"role": "assistant", "content": "7"}]
    # structured fields render readably inside a template
    d = to_conversation({"profile": {"diet": "vegan"}, "history": ["a", "b"], "r": "x"}, "f:5",
                        RecordFormat(prompt_template="{profile}|{history}", response_field="r"))
    assert d[0]["content"] == "diet: vegan|a\nb"


@pytest.mark.parametrize("rec, fmt, fragment", [
    ({"messages": [{"role": "user", "content": "q"}]}, RecordFormat(), "must end with an assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}]}, RecordFormat(), "messages[0].role 'bot' is not one of"),
    ({"messages": [{"role": "user"}]}, RecordFormat(), "messages[0] needs string 'role' and 'content'"),
    ({"messages": []}, RecordFormat(), "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, RecordFormat(), "a system message may only come first"),
    ({"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}]},
     RecordFormat(), "messages[0].weight: only an assistant message has a weight"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     RecordFormat(), "messages[1].weight must be 0 (context) or 1 (learnt), got 0.5"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "0"}]},
     RecordFormat(), "messages[1].weight must be 0 (context) or 1 (learnt), got '0'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     RecordFormat(), "every assistant turn has weight 0: nothing to learn"),
    ({"prompt": "q", "completion": ""}, RecordFormat(), "'completion' is empty"),
    ({"prompt": "q", "completion": ["a"]}, RecordFormat(), "'completion' must be a string"),
    ({"text": "q"}, RecordFormat(), "expected 'messages', or 'prompt' with 'completion'"),
    ({"query": "q"}, RecordFormat(prompt_template="{profile} {query}"), "missing field 'profile'"),
    ({"query": "q"}, RecordFormat(prompt_template="{query}"), "missing field 'response'"),
])
def test_bad_records_name_file_and_row(rec, fmt, fragment):
    with pytest.raises(DataError) as e:
        to_conversation(rec, "data.jsonl:7", fmt)
    assert str(e.value).startswith("data.jsonl:7: ") and fragment in str(e.value), str(e.value)


def test_read_jsonl_parquet_and_datasets_dir_with_skipping(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    p = tmp_path / "d.jsonl"
    p.write_bytes(("\ufeff" + "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n{broken\n[1]\n"
                   + "\n".join(json.dumps(r) for r in rows[2:]) + "\n").encode())
    with pytest.raises(DataError, match=r"d.jsonl:4: invalid JSON"):
        read_records(p)
    recs, skipped = read_records(p, on_error="skip")
    assert [r for _, r in recs] == rows and len(skipped) == 2 and skipped[1].startswith(
        f"{p}:5: expected a JSON object")
    assert recs[2][0] == f"{p}:6"
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "d.parquet", tmp_path / "saved"):
        recs, _ = read_records(src)
        assert [r for _, r in recs] == rows and recs[0][0].endswith(":row 1")
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.jsonl")


def test_packing_restarts_positions_and_never_predicts_across_examples():
    ex = [([1, 2, 3], [False, True, True]), ([4, 5], [False, True]), ([6, 7, 8, 9], [False, False, True, True])]
    rows = pack(ex, max_len=6)
    assert [r.ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert rows[0].positions == [0, 1, 2, 0, 1] and rows[1].positions == [0, 1, 2, 3]
    # position 2 (token 3) would predict token 4 of the next example: ignored
    assert rows[0].targets == [2, 3, IGNORE, 5, IGNORE]
    assert rows[1].targets == [IGNORE, 8, 9, IGNORE]
    assert [r.ids for r in pack(ex, max_len=6, packing=False)] == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert example_targets([1, 2], [True, True]) == [2, IGNORE]  # the first token has no context


def test_truncation_keeps_the_start_and_drops_examples_with_nothing_left(chat_tok):
    long = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "yes"}]
    assert tokenize_conversation(chat_tok, long, max_len=20) is None  # the answer is cut off
    ids, train = tokenize_conversation(chat_tok, long, max_len=80)
    assert len(ids) <= 80 and learnt_text(chat_tok, ids, train) == "yes"


def test_one_example_per_row_steps_share_an_opening_and_each_epoch_holds_every_example_once():
    """Agent episodes of two domains (two system prompts): the stream deals each epoch's shuffled
    examples into steps of one opening where it can; steps run on across epochs (74 = 9 x 8 + 2)."""
    from stagewise.sft.sft import RowStream

    opening = {1: [1] * 300, 2: [2] * 300}
    examples = [(opening[d] + [d * 1000 + k], [False] * 300 + [True]) for d, n in ((1, 27), (2, 47)) for k in range(n)]
    stream = RowStream(examples, seed=0, stage=0, max_len=8192, packing=False, group=8)
    steps = [stream.step_rows(s, 8) for s in range(3 * 74 // 8)]
    one_opening = sum(len({r.ids[0] for r in rows}) == 1 for rows in steps)
    assert one_opening >= 0.8 * len(steps), one_opening
    flat = [r.ids[-1] for rows in steps for r in rows]
    for e in range(2):  # whole epochs: every example exactly once
        assert sorted(flat[e * 74:(e + 1) * 74]) == sorted(ex[0][-1] for ex in examples)
    plain = RowStream(examples, seed=0, stage=0, max_len=8192, packing=False)  # no grouping: shuffled only
    assert sum(len({r.ids[0] for r in plain.step_rows(s, 8)}) == 1 for s in range(27)) < 0.3 * 27

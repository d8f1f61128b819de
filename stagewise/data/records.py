"""Records from JSONL / parquet / a saved ``datasets`` directory, and records as chat conversations:
what the ``jsonl`` and ``chat`` domains and SFT data read.

    records, skipped = read_records("data/chats.jsonl", on_error="skip")   # [(where, dict)], where = file:row
    conv = to_conversation(record, where, RecordFormat())                  # [{"role", "content"}, ...]

Record formats (one per file, detected per row):
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
                                                                     every assistant turn is learnt, but
                                                                     one with "weight": 0 (OpenAI's
                                                                     fine-tuning format): context
    the same with "tools" (schemas) and "context_turns": an episode record (``stagewise demos``),
                                                                     the turns after the first context_turns
    {"prompt": str | messages, "completion": str}                    (also "answer" instead of "completion")
    any fields + a ``prompt_template`` such as "Profile: {profile}\\nQuery: {query}" and a
    ``response_field`` ("response"): the template is the user turn, the field the assistant's answer.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from stagewise.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RecordFormat:
    prompt_template: str | None = None  # "{field} ..." -> the user turn
    response_field: str = "response"  # with prompt_template: the assistant's answer
    system: str | None = None  # a system message put first (unless the record has one)


# --- reading --------------------------------------------------------------------------------------


def read_records(path: str | Path, on_error: str = "raise") -> tuple[list[tuple[str, dict]], list[str]]:
    """-> ([(where, record)], [problems skipped]). JSONL (a UTF-8 BOM and blank lines are fine),
    parquet, or a directory written by ``datasets.Dataset.save_to_disk``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir() or p.suffix in (".parquet", ".arrow"):
        return _read_table(p), []
    out, skipped = [], []
    with p.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _problem(f"{where}: invalid JSON ({e.msg})", on_error, skipped)
                continue
            if not isinstance(obj, dict):
                _problem(f"{where}: expected a JSON object, got {type(obj).__name__}", on_error, skipped)
                continue
            out.append((where, obj))
    if not out:
        raise DataError(f"{p}: no records")
    return out, skipped


def _read_table(p: Path) -> list[tuple[str, dict]]:
    import datasets

    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{p}: a DatasetDict with splits {list(ds)}; point to one split's directory")
        else:
            ds = datasets.Dataset.from_parquet(str(p)) if p.suffix == ".parquet" else datasets.Dataset.from_file(str(p))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (unreadable table: one line naming the file)
        raise DataError(f"{p}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if len(ds) == 0:
        raise DataError(f"{p}: no records")
    return [(f"{p}:row {i + 1}", dict(r)) for i, r in enumerate(ds)]


def _problem(msg: str, on_error: str, skipped: list[str]) -> None:
    if on_error != "skip":
        raise DataError(msg)
    skipped.append(msg)


# --- records -> conversations -------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def to_conversation(rec: dict, where: str, fmt: RecordFormat) -> list[dict]:
    """One record -> a validated conversation ending with an assistant turn. Raises DataError(where: ...)."""
    if fmt.prompt_template is not None:
        missing = [f for f in template_fields(fmt.prompt_template) + [fmt.response_field] if f not in rec]
        if missing:
            raise DataError(f"{where}: missing field '{missing[0]}' (prompt_template / response_field)")
        values = {f: _text(rec[f]) for f in template_fields(fmt.prompt_template)}
        conv = [{"role": "user", "content": fmt.prompt_template.format(**values)},
                {"role": "assistant", "content": _as_str(rec[fmt.response_field], where, fmt.response_field)}]
    elif "messages" in rec:
        conv = _messages(rec["messages"], where, "messages")
    elif "prompt" in rec and ("completion" in rec or "answer" in rec):
        key = "completion" if "completion" in rec else "answer"
        prompt = rec["prompt"]
        conv = ([{"role": "user", "content": _as_str(prompt, where, "prompt")}] if not isinstance(prompt, list)
                else _messages(prompt, where, "prompt"))
        conv.append({"role": "assistant", "content": _as_str(rec[key], where, key)})
    else:
        raise DataError(f"{where}: expected 'messages', or 'prompt' with 'completion', or a prompt_template "
                        f"(keys here: {sorted(rec)[:8]})")
    if fmt.system and conv[0]["role"] != "system":
        conv = [{"role": "system", "content": fmt.system}] + conv
    if conv[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (ends with {conv[-1]['role']})")
    if not any(m["content"].strip() for m in conv if m["role"] == "assistant"):
        raise DataError(f"{where}: every assistant turn is empty: nothing to learn")
    if not any(m["content"].strip() for m in conv if m["role"] == "assistant" and m.get("weight", 1)):
        raise DataError(f"{where}: every assistant turn has weight 0: nothing to learn")
    return conv


def _messages(msgs, where: str, key: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: '{key}' must be a non-empty list of chat messages")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{j}] needs string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{j}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        if m["role"] == "system" and j > 0:
            raise DataError(f"{where}: {key}[{j}]: a system message may only come first")
        weight = m.get("weight", 1)
        if m["role"] != "assistant" and "weight" in m:
            raise DataError(f"{where}: {key}[{j}].weight: only an assistant message has a weight (it says whether "
                            f"the turn is learnt); a {m['role']} message is always context")
        if type(weight) is not int or weight not in (0, 1):
            raise DataError(f"{where}: {key}[{j}].weight must be 0 (context) or 1 (learnt), got {weight!r}")
        out.append({"role": m["role"], "content": m["content"], **({"weight": 0} if weight == 0 else {})})
    return out


def _as_str(v, where: str, key: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise DataError(f"{where}: '{key}' must be a string (got {type(v).__name__})")
    if isinstance(v, str) and not v.strip():
        raise DataError(f"{where}: '{key}' is empty")
    return str(v)


def _text(v) -> str:
    """A template field's value as text: lists become one item per line, dicts 'key: value' lines."""
    if isinstance(v, list):
        return "\n".join(_text(x) for x in v)
    if isinstance(v, dict):
        return "\n".join(f"{k}: {_text(x)}" for k, x in v.items())
    return str(v)

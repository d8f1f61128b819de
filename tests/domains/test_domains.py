import json
import sys

import pytest

from stagewise.config import DomainSpec, RewardSpec
from stagewise.domains.base import Domain, build_domain
from stagewise.errors import ConfigError, DataError
from stagewise.registry import names
from tests.helpers import correct


@pytest.mark.parametrize("name", ["add", "max", "sub", "mul", "next", "smaller"])
def test_builtin_splits_are_disjoint_and_seeded(name):
    d = build_domain(DomainSpec(name=name, eval_size=40, train_size=300), seed=1)
    train = {json.dumps(e["prompt"]) for e in d.train}
    held = {json.dumps(e["prompt"]) for e in d.eval}
    assert len(held) == 40 and len(train) == len(d.train) and not (train & held)
    again = build_domain(DomainSpec(name=name, eval_size=40, train_size=300), seed=1)
    assert again.eval == d.eval and again.train == d.train
    other = build_domain(DomainSpec(name=name, eval_size=40, train_size=300), seed=2)
    assert other.eval != d.eval


def test_rewards_and_metric_of_builtin_domains():
    add = build_domain(DomainSpec(name="add"), 0)
    ex = {"prompt": "What is 2 + 3?", "answer": "5"}
    assert add.score("2 + 3 = 5", ex)["last_number"] == 1.0 and correct(add, "2 + 3 = 5", ex)
    assert not correct(add, "5 is not 6", ex)
    mx = build_domain(DomainSpec(name="max"), 0)
    ex = {"prompt": "Which number is larger, 11 or 85?", "answer": "85", "options": [11, 85]}
    assert not correct(mx, "11 is larger than 85.", ex)  # the last number would say yes: gameable
    assert correct(mx, "85", ex) and correct(mx, "The larger number is 85.", ex)
    assert mx.weigh(mx.score("85", ex)) == pytest.approx(1.0 + 0.2 * 1.0)


def test_reward_override_from_config():
    d = build_domain(DomainSpec(name="add", rewards=[RewardSpec(name="numeric", weight=2.0)]), 0)
    assert d.rewards == [("numeric", 2.0)]
    assert d.weigh(d.score("7", {"answer": "7"})) == 2.0


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_domain_loads_and_splits(tmp_path):
    lines = [json.dumps({"prompt": f"capital of country {i}?", "answer": f"city{i}"}) for i in range(30)]
    lines.append(json.dumps({"prompt": [{"role": "user", "content": "chat form?"}], "answer": 3}))
    p = write_jsonl(tmp_path / "d.jsonl", lines)
    d = build_domain(DomainSpec(name="caps", type="jsonl", eval_size=5, args={"path": p, "reward": "contains"}), 0)
    assert len(d.eval) == 5 and len(d.train) == 26
    assert not ({json.dumps(e["prompt"]) for e in d.train} & {json.dumps(e["prompt"]) for e in d.eval})
    assert correct(d, "It is City7.", {"answer": "city7"})


def test_jsonl_with_bom_and_blank_lines_is_accepted(tmp_path):
    """Editors on Windows write a UTF-8 byte-order mark; blank lines (a trailing one, say) are common."""
    rows = [json.dumps({"prompt": f"q{i}", "answer": i}) for i in range(10)]
    p = tmp_path / "bom.jsonl"
    p.write_bytes(("\ufeff" + rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n\n  \n").encode("utf-8"))
    d = build_domain(DomainSpec(name="b", type="jsonl", eval_size=2, args={"path": str(p)}), 0)
    assert len(d.train) + len(d.eval) == 10
    assert sorted(e["prompt"] for e in d.train + d.eval) == sorted(f"q{i}" for i in range(10))


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "invalid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"prompt": "x"}', "missing key 'answer'"),
    ('{"answer": "x"}', "missing key 'prompt'"),
    ('{"prompt": "", "answer": "x"}', "'prompt' is empty"),
    ('{"prompt": [{"role": "user"}], "answer": "x"}', "each chat message needs string 'role' and 'content'"),
    ('{"prompt": "x", "answer": [1]}', "'answer' must be a string or a number"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, fragment):
    p = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "ok", "answer": "1"}', "", line])
    with pytest.raises(DataError) as e:
        build_domain(DomainSpec(name="b", type="jsonl", args={"path": p}), 0)
    assert f"bad.jsonl:3: {fragment}" in str(e.value)


def test_jsonl_unknown_reward_type(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "a", "answer": "1"}'] * 3)
    with pytest.raises(ConfigError, match="args.reward"):
        build_domain(DomainSpec(name="b", type="jsonl", args={"path": p, "reward": "fuzzy"}), 0)


def test_plugin_domain_from_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(
        "from stagewise.domains.base import Domain\n"
        "def build(spec, seed):\n"
        "    items = [{'prompt': f'say {i}', 'answer': str(i)} for i in range(20)]\n"
        "    return Domain(spec.name, items[5:], items[:5], [('exact', 1.0)], 'exact')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = build_domain(DomainSpec(name="echo", type="my_tasks:build"), 0)
    assert isinstance(d, Domain) and len(d.eval) == 5 and correct(d, "3.", {"answer": "3"})
    with pytest.raises(ConfigError, match="cannot load plugin"):
        build_domain(DomainSpec(name="x", type="my_tasks:nope"), 0)
    sys.modules.pop("my_tasks", None)


def test_registry_lists_builtins():
    # importing stagewise.domains registers the built-in builders (no build needed first)
    assert {"add", "max", "sub", "jsonl"} <= set(names("domain"))

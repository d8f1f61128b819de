"""``stagewise demos``: tau2 oracle demonstrations load as SFT data whose learnt tokens are exactly
the agent's turns and whose tokens are exactly the episode's; the endpoint agent sends the
episode's prompt as token ids; the model agent and a single-turn domain's oracle work end to end."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from stagewise.cli import main
from stagewise.config import load_config
from stagewise.demos import write_demos
from stagewise.domains.base import build_domain
from stagewise.generation.chat_template import turn_end_id
from stagewise.models import load_tokenizer, resolve_model_path
from stagewise.sft.data import tokenize_example

BUNDLED = "bundled:smollm2-135m-instruct"


def tau2_config(tmp_path: Path) -> Path:
    raw = {"model": {"name_or_path": BUNDLED}, "output_dir": str(tmp_path / "run"),
           "domains": [{"name": "airline", "type": "tau2_airline", "eval_size": 20,
                        "args": {"user": {"kind": "scripted"}}},
                       {"name": "airline_demos", "type": "chat", "args": {"path": str(tmp_path / "airline.jsonl")}}],
           "stages": [{"kind": "sft", "domains": ["airline_demos"], "steps": 1}],
           "rollout": {"max_turns": 30, "max_new_tokens": 256, "max_episode_tokens": 3000},
           "sft": {"max_seq_len": 8192}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_tau2_oracle_demos_are_sft_records_that_learn_exactly_the_agents_turns(tmp_path, capsys):
    pytest.importorskip("tau2")
    cfg_path = tau2_config(tmp_path)
    out = tmp_path / "airline.jsonl"
    # the chat domain of the demonstrations does not exist yet: only --domain is built
    assert main(["demos", str(cfg_path), "--domain", "airline", "--limit", "3", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "kept 3 of 3 episodes" in said and "render to other tokens" not in said, said
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["parts"]["pass"] for r in records] == [1.0] * 3 and {r["agent"] for r in records} == {"oracle"}
    assert any(m["role"] == "tool" for r in records for m in r["messages"])  # tool calls and their results

    cfg = load_config(cfg_path)
    demos = build_domain(cfg.domains[1], cfg.seed)  # the file, read back by the chat domain SFT trains on
    tok = load_tokenizer(resolve_model_path(BUNDLED))
    end = turn_end_id(tok)
    for ex in demos.train + demos.eval:
        ids, train = tokenize_example(tok, ex, max_len=8192)
        agent = [m["content"] for m in ex["messages"][ex["context_turns"]:] if m["role"] == "assistant"]
        learnt = [i for i, t in zip(ids, train) if t]
        expected = [i for text in agent for i in tok(text, add_special_tokens=False)["input_ids"] + [end]]
        assert learnt == expected  # the agent's turns and their end tokens, nothing else
        # the prompt (system prompt with the tools, greeting, the customer's first message) is context
        assert not any(train[:len(tok(ex["messages"][0]["content"])["input_ids"])])


def test_with_mistake_puts_an_earlier_value_in_the_wrong_place():
    from stagewise.demos import with_mistake

    call = lambda name, **a: f'<tool_call>{json.dumps({"name": name, "arguments": a})}</tool_call>'  # noqa: E731
    turns = [call("get_user_details", user_id="mia_1"), call("get_reservation_details", reservation_id="ABC123"),
             "Thank you, that is done."]
    mistaken, k = with_mistake(turns)
    assert k == 1 and mistaken == [turns[0], call("get_reservation_details", reservation_id="mia_1")] + turns[1:]
    assert with_mistake([call("get_user_details", user_id="mia_1"), "Done."]) is None  # nothing seen before
    assert with_mistake(["I cannot help with that."]) is None


def test_a_correction_needs_the_tools_error_and_a_turn_after_it():
    from stagewise.demos import corrected
    from stagewise.rl.episodes import Episode

    opening = [{"role": "system", "content": "tools"}, {"role": "user", "content": "hi"}]
    turns = [{"role": "assistant", "content": "call A"}, {"role": "tool", "content": "{}"},
             {"role": "assistant", "content": "call B(wrong)"}, {"role": "tool", "content": "Error: not found"},
             {"role": "assistant", "content": "call B"}, {"role": "tool", "content": "{}"}]
    episode = lambda msgs: Episode(None, {}, None, [], opening + msgs, opening=opening)  # noqa: E731
    assert corrected(episode(turns), 1)
    assert not corrected(episode(turns), 0)  # that call succeeded: nothing to correct
    assert not corrected(episode(turns[:4]), 1)  # cut off after the error: no correction follows
    assert not corrected(episode(turns[:2]), 1)  # cut off before the mistake


def test_tau2_oracle_corrections_show_a_wrong_call_its_error_and_the_right_call(tmp_path, capsys):
    """--corrections: each task also played with one wrong call (weight 0) before the right one; the
    episode still passes, and SFT learns every agent turn but the wrong one."""
    pytest.importorskip("tau2")
    cfg_path = tau2_config(tmp_path)
    out = tmp_path / "airline.jsonl"
    assert main(["demos", str(cfg_path), "--domain", "airline", "--limit", "3", "--corrections",
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "render to other tokens" not in said, said
    records = [json.loads(line) for line in out.read_text().splitlines()]
    fixed = [r for r in records if any(m.get("weight") == 0 for m in r["messages"])]
    assert len(records) - len(fixed) == 3 and fixed, said  # the 3 clean episodes, and corrections
    assert all(r["parts"]["pass"] == 1.0 for r in records)
    for r in fixed:
        msgs = r["messages"]
        (w,) = [i for i, m in enumerate(msgs) if m.get("weight") == 0]
        assert msgs[w + 1]["role"] == "tool" and msgs[w + 1]["content"].startswith("Error")
        right = next(m for m in msgs[w + 1:] if m["role"] == "assistant")
        wrong_call, right_call = (json.loads(m["content"][len("<tool_call>"):-len("</tool_call>")])
                                  for m in (msgs[w], right))
        assert wrong_call["name"] == right_call["name"]
        assert sum(wrong_call["arguments"][a] != v for a, v in right_call["arguments"].items()) == 1

    cfg = load_config(cfg_path)
    demos = build_domain(cfg.domains[1], cfg.seed)
    tok = load_tokenizer(resolve_model_path(BUNDLED))
    end = turn_end_id(tok)
    checked = 0
    for ex in demos.train + demos.eval:
        if not any(m.get("weight") == 0 for m in ex["messages"]):
            continue
        ids, train = tokenize_example(tok, ex, max_len=8192)
        agent = [m["content"] for m in ex["messages"][ex["context_turns"]:]
                 if m["role"] == "assistant" and m.get("weight", 1) == 1]
        learnt = [i for i, t in zip(ids, train) if t]
        assert learnt == [i for text in agent for i in tok(text, add_special_tokens=False)["input_ids"] + [end]]
        checked += 1
    assert checked == len(fixed)
    capsys.readouterr()
    assert main(["demos", str(cfg_path), "--domain", "airline", "--agent", "model", "--corrections",
                 "--out", str(out)]) == 2
    assert "error: --corrections: only the oracle agent plays a scripted mistake" in capsys.readouterr().err


def test_a_single_turn_domains_oracle_writes_its_reference_answers(tmp_path, tiny_chat_dir):
    raw = {"model": {"name_or_path": str(tiny_chat_dir)}, "output_dir": str(tmp_path / "run"),
           "domains": [{"name": "add", "eval_size": 4, "train_size": 5}], "stages": [{"domains": ["add"], "steps": 1}]}
    cfg = load_config(raw=raw)
    dom = build_domain(cfg.domains[0], cfg.seed)
    stats = write_demos(cfg, [dom], domain="add", split="train", agent="oracle", out=tmp_path / "add.jsonl")
    records = [json.loads(line) for line in (tmp_path / "add.jsonl").read_text().splitlines()]
    assert stats.kept == stats.episodes == 5 and stats.token_mismatches == 0
    assert [r["messages"][-1]["content"] for r in records] == [str(t["answer"]) for t in dom.train]


class _Completions(BaseHTTPRequestHandler):
    """An OpenAI-compatible completions server that records each request and answers a fixed text."""

    requests: list = []
    answer = "7"

    def do_POST(self):  # noqa: N802  (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        reply = json.dumps({"choices": [{"text": type(self).answer, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_the_endpoint_agent_sends_the_episodes_prompt_as_token_ids(tmp_path, tiny_chat_dir):
    server = HTTPServer(("127.0.0.1", 0), _Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        raw = {"model": {"name_or_path": str(tiny_chat_dir)}, "output_dir": str(tmp_path / "run"),
               "domains": [{"name": "add", "eval_size": 4, "train_size": 3}],
               "stages": [{"domains": ["add"], "steps": 1}]}
        cfg = load_config(raw=raw)
        dom = build_domain(cfg.domains[0], cfg.seed)
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        stats = write_demos(cfg, [dom], domain="add", split="train", agent="endpoint", url=url, model="teacher",
                            out=tmp_path / "add.jsonl", min_reward=-1.0)
    finally:
        server.shutdown()
    tok = load_tokenizer(str(tiny_chat_dir))
    from stagewise.generation.chat_template import ChatRenderer

    prompts = [ChatRenderer(tok).opening_ids(dom.conversation(t)[:-1], []) for t in dom.train]
    sent = _Completions.requests
    assert [path for path, _ in sent] == ["/v1/completions"] * 3
    assert sorted(body["prompt"] for _, body in sent) == sorted(prompts)  # token ids, not text (sent in parallel)
    assert {body["model"] for _, body in sent} == {"teacher"} and stats.kept == 3 and stats.token_mismatches == 0


def test_the_model_agent_and_bad_arguments(tmp_path, tiny_chat_dir, capsys):
    raw = {"model": {"name_or_path": str(tiny_chat_dir)}, "output_dir": str(tmp_path / "run"),
           "domains": [{"name": "add", "eval_size": 4, "train_size": 4}], "stages": [{"domains": ["add"], "steps": 1}],
           "rollout": {"max_new_tokens": 4}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "model.jsonl"
    assert main(["demos", str(cfg), "--domain", "add", "--agent", "model", "--trials", "2", "--min-reward", "-1",
                 "--out", str(out)]) == 0
    assert "kept 8 of 8 episodes" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 8
    assert main(["demos", str(cfg), "--domain", "nope", "--out", str(out)]) == 2
    assert "--domain nope: the config has no such domain (has add)" in capsys.readouterr().err
    assert main(["demos", str(cfg), "--domain", "add", "--agent", "endpoint", "--out", str(out)]) == 2
    assert "--agent endpoint needs --url" in capsys.readouterr().err


@pytest.mark.parametrize("flags,dtype", [({"avx2"}, "float32"), ({"avx2", "amx_bf16"}, "bfloat16")])
def test_the_model_agent_decodes_in_what_this_cpu_computes(tmp_path, tiny_chat_dir, monkeypatch, flags, dtype):
    """dist.mixed_precision: auto, as the product's default: bf16 only where the CPU has it in hardware."""
    import torch

    import stagewise.demos as demos
    import stagewise.machine as machine

    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = []
    real = demos.load_model
    monkeypatch.setattr(demos, "load_model", lambda *a, **k: loaded.append(k["dtype"]) or real(*a, **k))
    raw = {"model": {"name_or_path": str(tiny_chat_dir)}, "output_dir": str(tmp_path / "run"),
           "domains": [{"name": "add", "eval_size": 2, "train_size": 2}], "stages": [{"domains": ["add"], "steps": 1}],
           "rollout": {"max_new_tokens": 2}}
    cfg = load_config(_write(tmp_path, raw))
    dom = build_domain(cfg.domains[0], seed=0)
    write_demos(cfg, [dom], domain="add", split="train", agent="model", min_reward=-1, out=tmp_path / "m.jsonl",
                log=lambda _: None)
    assert loaded == [getattr(torch, dtype)]


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


"""Multi-turn GRPO through the real loop on the tiny model: a simulated user keeps episodes going for
three turns (tests/plugins.py); only the policy's tokens are trained on; resume is exact."""

from __future__ import annotations

import json

import torch

from stagewise.continual.curriculum import run_curriculum
from tests.helpers import load_weights, tiny_config

MULTI_TURN = ["domains=[{name: chat, type: ascii_chat, eval_size: 4}]", "stages=[{domains: [chat], steps: 4}]",
              "rollout.engine=short_turns", "rollout.max_new_tokens=4", "rollout.max_turns=3",
              "rollout.max_episode_tokens=96", "rollout.prompts_per_step=2", "rollout.num_generations=4",
              "grpo.micro_batch_size=4", "optim.lr=1e-2", "eval.before_first_stage=false"]


def steps_of(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_multi_turn_stage_trains_on_policy_tokens_only(tiny_chat_dir, tmp_path):
    cfg = tiny_config(tiny_chat_dir, tmp_path / "mt", overrides=MULTI_TURN + ["logging.dump_rollouts=true"])
    run_curriculum(cfg)
    rows = steps_of(tmp_path / "mt")
    assert len(rows) == 4
    from stagewise.generation.chat_template import ChatRenderer
    from stagewise.models import load_tokenizer

    renderer = ChatRenderer(load_tokenizer(str(tiny_chat_dir)))
    prompt_lengths = [len(renderer.opening_ids([{"role": "user", "content": f"Say seven {i} times."}], []))
                      for i in range(1, 40)]
    for r in rows:  # every episode ran its three turns of 1-4 policy tokens
        assert r["episode/turns"] == 3.0 and 3.0 <= r["episode/policy_tokens"] <= 12.0
        assert r["completion_len_mean"] > r["episode/policy_tokens"]  # user replies are in the sequence
        assert r["episode/tool_calls"] == 0.0 and r["truncated_frac"] == 0.0 and r["reward_std"] > 0
        assert min(prompt_lengths) <= r["episode/prompt_tokens"] <= max(prompt_lengths)
    dumped = [json.loads(x) for x in (tmp_path / "mt" / "rollouts.jsonl").read_text().splitlines()]
    assert len(dumped) == 4 * 8 and all(d["completion"].count("[user] More ") == 2 for d in dumped)
    report = (tmp_path / "mt" / "report.md").read_text()
    assert "## Multi-turn episodes" in report and "| 1 | 3.00 → 3.00 | 0.00 → 0.00 |" in report
    final, base = load_weights(tmp_path / "mt" / "final_model"), load_weights(tiny_chat_dir)
    assert any(not torch.equal(final[k], base[k]) for k in base)


def test_multi_turn_resume_mid_stage_is_exact(tiny_chat_dir, tmp_path):
    run_curriculum(tiny_config(tiny_chat_dir, tmp_path / "ref", overrides=MULTI_TURN))
    cfg = tiny_config(tiny_chat_dir, tmp_path / "cut", overrides=MULTI_TURN)
    assert run_curriculum(cfg, stop_after=2)["stopped"]
    run_curriculum(cfg, resume=True)
    a, b = load_weights(tmp_path / "ref" / "final_model"), load_weights(tmp_path / "cut" / "final_model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same rewards, losses, gradient norms and episode statistics at every step (timings aside; the
    # compute dtype is logged once per process, so the resumed process logs it again)
    strip = lambda rows: [{k: v for k, v in r.items() if not any(  # noqa: E731
        w in k for w in ("time", "_per_s", "memory", "compute_dtype"))} for r in rows]
    assert strip(steps_of(tmp_path / "ref")) == strip(steps_of(tmp_path / "cut"))

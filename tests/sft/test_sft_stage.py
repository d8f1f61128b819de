"""SFT stages on the tiny model, run by the real curriculum: learning, a mixed SFT -> GRPO curriculum,
micro-batch x accumulation invariance, automatic micro-batch with a simulated out-of-memory,
resume in the middle of an SFT stage, malformed records skipped and counted."""

import json
import math
from pathlib import Path

import pytest
import torch

from stagewise.config import load_config
from stagewise.continual.curriculum import run_curriculum
from tests.helpers import default_compute_dtype, load_weights


def write_data(path, n=48, bad_lines=()):
    lines = [json.dumps({"prompt": f"What is {i} + {i % 5}?", "completion": "777"}) for i in range(n)]
    for at, text in bad_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_raw(model_dir, out, data_path, steps=6, sft=None, stages=None, **extra):
    raw = {
        "name": "sft", "output_dir": str(out), "seed": 0, "model": {"name_or_path": str(model_dir)},
        "plugins": ["tests.plugins"],
        "domains": [{"name": "sevens_chat", "type": "chat", "eval_size": 8, "args": {"path": str(data_path)}},
                    {"name": "add", "eval_size": 6, "args": {"lo": 1, "hi": 9}, "rewards": [{"name": "sevens"}]}],
        "sft": {"batch_size": 8, "micro_batch_size": 4, "max_seq_len": 64, **(sft or {})},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "rollout": {"prompts_per_step": 2, "num_generations": 4, "max_new_tokens": 6},
        "grpo": {"micro_batch_size": 4},
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "stages": stages or [{"kind": "sft", "domains": ["sevens_chat"], "steps": steps}],
    }
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def steps_of(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "stage_step" in r]


def test_mixed_sft_then_grpo_curriculum_hands_over_and_fills_one_report(tiny_chat_dir, tmp_path):
    data = write_data(tmp_path / "sevens.jsonl")
    stages = [{"kind": "sft", "domains": ["sevens_chat"], "steps": 12},
              {"kind": "grpo", "domains": ["add"], "steps": 2}]
    res = run_curriculum(load_config(raw=sft_raw(tiny_chat_dir, tmp_path / "mix", data, stages=stages)))
    out = tmp_path / "mix"
    rows = steps_of(out)
    sft_losses = [r["loss"] for r in rows if r["stage"] == 1]
    assert len(sft_losses) == 12 and sft_losses[-1] < 0.5 * sft_losses[0]  # SFT learnt "777"
    # the held-out loss of the SFT domain fell after stage 1, and the matrices cover both kinds
    L = res["loss_matrix"]
    assert L[1][0] < 0.5 * L[0][0]
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_row" in r]
    assert [r["eval_perplexity/sevens_chat"] for r in evals] == pytest.approx([math.exp(row[0]) for row in L])
    assert res["matrix"][0][0] is None and res["matrix"][0][1] is not None  # chat data has no accuracy metric
    # the GRPO stage started from the SFT stage's export: its completions are already full of 7s
    grpo = [r for r in rows if r["stage"] == 2]
    assert grpo[0]["reward"] > 0.15, grpo[0]["reward"]  # a random tiny model: ~0.01
    compute = default_compute_dtype()  # the default precision on this CPU
    assert grpo[0]["train_compute_dtype"] == compute and rows[0]["train_compute_dtype"] == compute
    report = (out / "report.md").read_text()
    assert "Held-out loss matrix" in report and "Accuracy matrix" in report and "| 1 | sft |" in report
    for png in ("loss_matrix.png", "accuracy_matrix.png", "sft_loss_curves.png", "reward_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final_model")


def test_sft_micro_batch_times_accumulation_invariance(tiny_chat_dir, tmp_path):
    """4x1, 2x2, 1x4 rows per micro-batch x accumulation: the token-mean over the whole step is the
    objective, so the weights agree (fp32: this compares arithmetic). The rows hold one example each
    (two do not fit 64 tokens), so each micro-batch runs as a prefix tree of its own rows: another
    order of summation, hence agreement to 1% of the largest update (a micro-batch weighted twice
    moves the weights by the order of the update itself)."""
    data = write_data(tmp_path / "d.jsonl")
    finals = []
    for micro in (8, 4, 1):
        out = tmp_path / f"m{micro}"
        raw = sft_raw(tiny_chat_dir, out, data, steps=3, sft={"micro_batch_size": micro},
                      dist={"mixed_precision": "no"}, eval={"before_first_stage": False})
        run_curriculum(load_config(raw=raw))
        finals.append(load_weights(out / "final_model"))
    from tests.rl.test_invariance import assert_within, largest_update

    tolerance = 0.01 * largest_update(finals[0], load_weights(tiny_chat_dir))
    assert tolerance > 1e-6  # the run trained: equality is not the trivial "nothing moved"
    for other in finals[1:]:
        assert_within(finals[0], other, tolerance)
    steps = [r for r in map(json.loads, (tmp_path / "m8" / "metrics.jsonl").read_text().splitlines())
             if "stage_step" in r]
    assert all(r["shared_prefix"] == 1.0 for r in steps)


def test_automatic_micro_batch_backs_off_on_out_of_memory(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STAGEWISE_FAULTS", "oom@micro=3-8")  # 8 and 4 rows "do not fit"
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "auto"
    run_curriculum(load_config(raw=sft_raw(tiny_chat_dir, out, data, steps=2, sft={"micro_batch_size": "auto"},
                                           dist={"strategy": "zero2"}, eval={"before_first_stage": False})))
    assert "automatic micro-batch: 2 rows of 64 tokens fit (8, 4 ran out of memory)" in capsys.readouterr().out
    start = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "micro_batch" in r)
    assert (start["micro_batch"], start["accumulation"], start["micro_batch_too_big"]) == (2, 4, [8, 4])
    ds = json.loads((out / "deepspeed_config" / "ds_config_zero2.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (2, 4, 8)


def test_resume_in_the_middle_of_an_sft_stage_is_exact(tiny_chat_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    raw = lambda out: sft_raw(tiny_chat_dir, out, data, steps=4, eval={"before_first_stage": False})  # noqa: E731
    run_curriculum(load_config(raw=raw(tmp_path / "full")))
    cfg = load_config(raw=raw(tmp_path / "cut"))
    assert run_curriculum(cfg, stop_after=2)["stopped"]
    run_curriculum(cfg, resume=True)
    a, b = load_weights(tmp_path / "full" / "final_model"), load_weights(tmp_path / "cut" / "final_model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in steps_of(tmp_path / "full")] == [r["loss"] for r in steps_of(tmp_path / "cut")]


def test_malformed_records_skipped_and_counted(tiny_chat_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", bad_lines=[(3, "{oops"), (10, '{"prompt": "q", "completion": ""}')])
    with pytest.raises(Exception, match=r"d.jsonl:4: invalid JSON"):
        run_curriculum(load_config(raw=sft_raw(tiny_chat_dir, tmp_path / "strict", data, steps=1)))
    out = tmp_path / "lenient"
    run_curriculum(load_config(raw=sft_raw(tiny_chat_dir, out, data, steps=1, data={"on_error": "skip"})))
    assert "domains.sevens_chat: skipped 2 malformed record(s)" in capsys.readouterr().out
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data_skipped/sevens_chat"] == 2


def test_sweep_runs_every_ablation_once_and_compares_them(tiny_chat_dir, tmp_path, capsys):
    import csv

    import yaml

    from stagewise.sweep import run_sweep

    data = write_data(tmp_path / "d.jsonl")
    raw = sft_raw(tiny_chat_dir, tmp_path / "sweep", data, steps=2, eval={"before_first_stage": False})
    raw["ablations"] = {"slow": {"optim.lr": 1e-4}, "fast": {"optim.lr": 3e-3}, "unused": {"optim.lr": 1e-3}}
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))  # the sweep follows the file's order
    root = run_sweep(cfg, only=["slow", "fast"])
    assert root == tmp_path / "sweep"
    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert [r["ablation"] for r in rows] == ["slow", "fast"]
    assert not (root / "unused").exists()
    by = {r["ablation"]: r for r in rows}
    # a larger lr lowers the training loss faster: the table reflects the runs
    assert float(by["fast"]["final_train_loss"]) < float(by["slow"]["final_train_loss"])
    for r in rows:
        assert float(r["held_out_loss"]) > 0 and float(r["tokens_per_s"]) > 0 and float(r["peak_memory_mb"]) > 100
        assert (Path(r["output_dir"]) / "final_model" / "config.json").is_file()
    assert "| fast |" in (root / "sweep.md").read_text()
    assert (root / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # a second sweep repeats nothing that finished
    stamp = (root / "fast" / "final_model" / "model.safetensors").stat().st_mtime
    capsys.readouterr()
    run_sweep(cfg, only=["slow", "fast"])
    assert "fast already finished" in capsys.readouterr().out
    assert (root / "fast" / "final_model" / "model.safetensors").stat().st_mtime == stamp


def test_seed_memory_setup_zero3_offload_checkpointing_auto_batch(tiny_chat_dir, tmp_path):
    """The reference SFT script's ZeRO-3 profile: CPU offload of optimizer and parameters, activation checkpointing,
    bf16, automatic micro-batch; the generated DeepSpeed JSON says so, and the stage learns."""
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "z3"
    raw = sft_raw(tiny_chat_dir, out, data, steps=4, sft={"micro_batch_size": "auto"},
                  dist={"strategy": "zero3", "offload": "optimizer_and_params", "mixed_precision": "bf16"},
                  model={"gradient_checkpointing": True}, eval={"before_first_stage": False})
    run_curriculum(load_config(raw=raw))
    ds = json.loads((out / "deepspeed_config" / "ds_config_zero3.json").read_text())
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True and ds["train_micro_batch_size_per_gpu"] == 8
    losses = [r["loss"] for r in steps_of(out)]
    assert losses[-1] < losses[0]
    assert json.loads((out / "final_model" / "config.json").read_text())["dtype"] == "float32"

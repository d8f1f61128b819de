"""Bad input, table-driven: every bad config, data file, DeepSpeed JSON or launch flag ends with one
line that names the field or file:line, a non-zero exit, and no output directory left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stagewise.cli import main
from tests.helpers import tiny_raw

GOOD_JSONL = '{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?", "answer": "6"}\n{"prompt": "1+1?", "answer": "2"}\n'

ZERO2_WITH_JSON = ["dist.strategy=zero2", "dist.deepspeed_config=DIR/ds.json"]

# (case id, files to write {name: text}, extra CLI args, expected fragment of the one error line)
CASES = [
    ("unknown key", {}, ["optim.lrr=1"], "optim.lrr: unknown key"),
    ("unknown top-level key", {}, ["colour=red"], "colour: unknown key"),
    ("wrong type", {}, ["optim.lr=abc"], "optim.lr: Input should be a valid number"),
    ("negative lr", {}, ["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    ("top_p above 1", {}, ["rollout.top_p=1.5"], "rollout.top_p: Input should be less than or equal to 1"),
    ("one generation", {}, ["rollout.num_generations=1"],
     "rollout.num_generations: Input should be greater than or equal to 2"),
    ("micro-batch does not divide", {}, ["grpo.micro_batch_size=3"],
     "grpo.micro_batch_size=3 must divide the 8 completions"),
    ("unknown domain in a stage", {}, ["stages.0.domains=[nope]"], "unknown domain 'nope'"),
    ("unknown domain type", {}, ["domains.0.type=adition"], "domains.0.type: unknown domain type 'adition'"),
    ("unknown reward", {}, ["domains.0.rewards=[{name: exactt}]"], "domains.0.rewards.0.name: unknown reward 'exactt'"),
    ("unknown loss", {}, ["grpo.loss=dapoo"], "grpo.loss: unknown loss 'dapoo'"),
    ("unknown advantage", {}, ["grpo.advantage=x"], "grpo.advantage: unknown advantage 'x'"),
    ("unknown rollout engine", {}, ["rollout.engine=vlm"], "rollout.engine: unknown rollout engine 'vlm'"),
    ("unknown stage kind", {}, ["stages.0.kind=dpo"], "stages.0.kind: unknown stage kind 'dpo'"),
    ("episode shorter than a turn", {}, ["rollout.max_episode_tokens=2"],
     "max_episode_tokens=2 is smaller than one turn"),
    ("stage override breaks the merged config", {}, ["stages.0.optim={lr: -3}"],
     "stages.0.optim.lr: Input should be greater than 0"),
    ("stage override of a rollout", {}, ["stages.0.rollout={num_generations: 1}"],
     "num_generations: Input should be greater than or equal to 2"),
    ("repeated stage names", {}, ["stages.0.name=x", "stages.1.name=x"], "stages: names repeat"),
    ("plugin that fails to import", {}, ["plugins=[no_such_module_xyz]"],
     "plugins.0: cannot import 'no_such_module_xyz'"),
    ("plugin domain that is not there", {}, ["domains.0.type=json:nope"],
     "domains.add.type: cannot load plugin 'json:nope'"),
    ("missing model", {}, ["model.name_or_path=/no/such/model"], "/no/such/model"),
    ("unknown bundled model", {}, ["model.name_or_path=bundled:gpt5"], "unknown bundled model 'bundled:gpt5'"),
    ("offload without ZeRO", {}, ["dist.offload=optimizer"], "offload=optimizer needs a ZeRO strategy"),
    ("fp16 on CPU", {}, ["dist.mixed_precision=fp16"], "fp16 needs a GPU"),
    ("unknown ablation", {}, ["--ablation", "nope"], "ablation: unknown ablation 'nope'"),
    ("missing data file", {}, ["domains.0.type=jsonl", "domains.0.args={path: DIR/none.jsonl, reward: exact}"],
     "none.jsonl: file not found"),
    ("malformed JSONL line", {"bad.jsonl": GOOD_JSONL + "{not json\n"},
     ["domains.0.type=jsonl", "domains.0.args={path: DIR/bad.jsonl, reward: exact}"], "bad.jsonl:4: invalid JSON"),
    ("JSONL line that is not an object", {"arr.jsonl": "[1, 2]\n" + GOOD_JSONL},
     ["domains.0.type=jsonl", "domains.0.args={path: DIR/arr.jsonl, reward: exact}"],
     "arr.jsonl:1: expected a JSON object"),
    ("empty JSONL", {"empty.jsonl": "\n\n"},
     ["domains.0.type=jsonl", "domains.0.args={path: DIR/empty.jsonl, reward: exact}"], "empty.jsonl: no records"),
    ("chat record with a bad role", {"chat.jsonl": '{"messages": [{"role": "robot", "content": "x"}]}\n'},
     ["domains.0.type=chat", "domains.0.args={path: DIR/chat.jsonl}", "stages.0.kind=sft"], "chat.jsonl:1"),
    ("DeepSpeed JSON missing", {}, ZERO2_WITH_JSON,
     "dist.deepspeed_config: file not found"),
    ("DeepSpeed JSON malformed", {"ds.json": '{"zero_optimization": {"stage": 2,}}'},
     ZERO2_WITH_JSON, "is not valid JSON"),
    ("DeepSpeed JSON with another ZeRO stage", {"ds.json": '{"zero_optimization": {"stage": 3}}'},
     ZERO2_WITH_JSON, "zero_optimization.stage=3 but dist.strategy is zero2"),
    ("DeepSpeed JSON with another batch", {"ds.json": '{"train_micro_batch_size_per_gpu": 2}'},
     ZERO2_WITH_JSON, "train_micro_batch_size_per_gpu=2 but the run uses 4"),
    ("DeepSpeed JSON without precision it needs", {"ds.json": '{"bf16": {"enabled": false}}'},
     ZERO2_WITH_JSON + ["dist.mixed_precision=bf16"], "bf16.enabled=False but dist.mixed_precision asks for it"),
    ("DeepSpeed JSON that turns off the overflow check",
     {"ds.json": '{"bf16": {"enabled": true, "check_grad_overflow": false}}'},
     ZERO2_WITH_JSON + ["dist.mixed_precision=bf16"], "check_grad_overflow=false"),
    ("DeepSpeed JSON that is a list", {"ds.json": "[1]"},
     ZERO2_WITH_JSON, "expected a JSON object"),
    ("DeepSpeed JSON for a DDP run", {"ds.json": "{}"}, ["dist.deepspeed_config=DIR/ds.json"],
     "deepspeed_config is only used with a zero1/zero2/zero3 strategy"),
]


def write_config(tmp: Path, model_dir: Path) -> Path:
    raw = tiny_raw(model_dir, tmp / "out")
    raw["ablations"] = {"small": {"optim.lr": 1e-4}}
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("case, files, args, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, tiny_model_dir, capsys, case, files, args, fragment):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cfg = write_config(tmp_path, tiny_model_dir)
    code = main(["run", str(cfg), *[a.replace("DIR", str(tmp_path)) for a in args]])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[")]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), f"{case}: left an output directory behind"


@pytest.mark.parametrize("argv, fragment", [
    (["launch", "--strategy", "zero2", "--num-processes", "0", "cfg"], "--num-processes"),
    (["launch", "--strategy", "zero9", "cfg"], "--strategy"),
    (["run"], "config"),
    (["run", "no_such_config.yaml"], "no_such_config.yaml"),
])
def test_bad_launch_flags(tmp_path, capsys, argv, fragment, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage line + error line, status 2
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err

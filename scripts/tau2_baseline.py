"""Base pass rates on tau2-bench's test splits: a model as the agent (greedy, as the accuracy matrix
evaluates it), a local model as the customer.

    python scripts/tau2_baseline.py                              # the bundled SmolLM2 as both
    python scripts/tau2_baseline.py --tasks 5 --max-turns 6      # a quicker look

Prints one row per domain: tasks, prompt tokens, pass^1, agent turns (mean of the first five
conversations), seconds. A domain whose prompt does not fit the model's context says so (the
bundled SmolLM2 has 8,192 positions; telecom's solo prompt is longer). The oracle and do-nothing
baselines are measured by tests/domains/test_tau2.py.
"""

from __future__ import annotations

import argparse
import time

import torch

from stagewise.config import DomainSpec
from stagewise.domains.base import build_domain
from stagewise.errors import ConfigError
from stagewise.evaluation import evaluate_domain
from stagewise.models import load_tokenizer, resolve_model_path
from stagewise.rl.episodes import ChatRenderer, EpisodeLimits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--user", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--domains", nargs="+", default=["airline", "retail", "telecom"])
    ap.add_argument("--tasks", type=int, default=1000, help="test tasks per domain (default: all)")
    ap.add_argument("--max-turns", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--max-episode-tokens", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    limits = EpisodeLimits(max_turns=args.max_turns, max_tokens=args.max_episode_tokens, max_tool_errors=10)
    rows = []
    for name in args.domains:
        spec_args = {"solo": True} if name == "telecom" else {"user": {"kind": "local", "model": args.user}}
        dom = build_domain(DomainSpec(name=name, type=f"tau2_{name}", eval_size=args.tasks, args=spec_args), seed=0)
        env = dom.make_env(dom.eval[0])
        renderer = ChatRenderer(tok)
        prompt_len = len(renderer.opening_ids(renderer.with_tool_prompt(env.opening(), env.tool_schemas()),
                                              env.tool_schemas()))
        t0 = time.time()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rate, samples, _ = evaluate_domain(model, tok, dom, max_new_tokens=args.max_new_tokens,
                                                batch_size=args.batch_size, limits=limits)
        except ConfigError as e:
            rows.append((name, len(dom.eval), prompt_len, "does not fit", "", f"{time.time() - t0:.0f}"))
            print(f"{name}: {e}", flush=True)
            continue
        turns = sum(s["turns"] for s in samples) / max(len(samples), 1)
        rows.append((name, len(dom.eval), prompt_len, f"{rate:.3f}", f"{turns:.1f}", f"{time.time() - t0:.0f}"))
        print(f"{name}: pass^1 {rate:.3f} over {len(dom.eval)} tasks, {time.time() - t0:.0f} s", flush=True)
        for s in samples[:1]:
            print("  sample:", s["completion"][:600].replace("\n", " | "))
    print("\n| domain | test tasks | prompt tokens | pass^1 | agent turns (first 5) | seconds |\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()

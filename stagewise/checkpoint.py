"""Atomic training checkpoints (accelerate save_state/load_state) and HF model export.

Layout: ``<dir>/checkpoints/step-N/`` holds accelerate's state (model, optimizer, scheduler, RNG
of every process, registered objects such as the step counters) plus ``manifest.json``. It is
written as ``.tmp-step-N`` and renamed once complete, so a directory named ``step-N`` is always
whole; a crash leaves only a ``.tmp-*`` that is ignored and cleaned up. Every process takes part
in save and load (ZeRO shards are per rank); only the main process renames, prunes and writes
the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"


class Counters:
    """Step counters and data position, saved with the checkpoint (register_for_checkpointing)."""

    def __init__(self):
        self.step = 0  # optimizer steps done in this stage; the data position is a function of it
        self.samples = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.samples = int(d["step"]), int(d["samples"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root/checkpoints, oldest first (a manifest marks completion)."""
    base = Path(root) / "checkpoints"
    if not base.is_dir():
        return []
    done = [p for p in base.glob("step-*") if (p / MANIFEST).is_file() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator, root: str | Path, step: int, manifest: dict, keep_last: int = 2) -> Path:
    """Collective: every process must call it. Returns the final directory."""
    base = Path(root) / "checkpoints"
    final, tmp = base / f"step-{step}", base / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {**manifest, "step": step, "saved_at": time.time(), "num_processes": accelerator.num_processes,
                "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in base.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Collective. Restores everything save_checkpoint saved; returns the manifest."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        from stagewise.errors import StagewiseError

        raise StagewiseError(f"{path}: saved with {manifest['num_processes']} processes, resuming with "
                             f"{accelerator.num_processes}; resume with the same number")
    accelerator.load_state(str(path))
    return manifest


def export_model(accelerator, model, tokenizer, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Collective. Write a plain HF model dir (loadable by AutoModelForCausalLM.from_pretrained).

    Under ZeRO-3 ``get_state_dict`` gathers the full 16-bit weights (the DeepSpeed config sets
    stage3_gather_16bit_weights_on_model_save). LoRA adapters are merged into the export.
    """
    out = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if hasattr(unwrapped, "lm"):  # our PolicyLogprobs wrapper: export the HF model inside
            unwrapped = unwrapped.lm
            state_dict = {k[3:]: v for k, v in state_dict.items() if k.startswith("lm.")}
        if getattr(getattr(unwrapped, "config", None), "tie_word_embeddings", False):
            state_dict.pop("lm_head.weight", None)  # tied: a gathered ZeRO-3 dict holds it twice
        if hasattr(unwrapped, "merge_and_unload"):  # peft: export merged weights, not adapters
            import copy

            merged = copy.deepcopy(unwrapped).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "stagewise.json").write_text(json.dumps({"exported_at": time.time(), **(extra or {})}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return out


def is_exported(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "stagewise.json").is_file()

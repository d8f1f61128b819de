"""Atomic training checkpoints (accelerate save_state/load_state) and HF model export.

Layout: ``<dir>/checkpoints/step-N/`` holds accelerate's state (model, optimizer, scheduler, RNG
of every process, registered objects such as the step counters) plus ``manifest.json``. It is
written as ``.tmp-step-N`` and renamed once complete, so a directory named ``step-N`` is always
whole; a crash leaves only a ``.tmp-*`` that is ignored and cleaned up. Every process takes part
in save and load (ZeRO / FSDP shards are per rank); only the main process renames, prunes and
writes the manifest.

The manifest lists every file with its size and SHA-256. Before resuming, the newest checkpoint
is verified (by the main process; the others take its choice and check they can see it); a
missing, truncated or altered file (a disk error, a copy cut short, someone's cleanup script)
makes it refused with one line naming the file, and the previous complete checkpoint is used
instead. A save that fails (e.g. a full disk) leaves the previous checkpoint
as it was and stops every rank with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from stagewise import faults
from stagewise.errors import TrainingError

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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(d: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under d but the manifest."""
    return {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST}


def checkpoint_problem(path: Path) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; else what is wrong."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    if not isinstance(files, dict):
        return f"{MANIFEST} lists no file table"
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['size']}"
        if sha256(p) != meta["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None


def latest_checkpoint(root: str | Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint that verifies; corrupt or incomplete ones are reported and skipped."""
    from stagewise.tracking import print0

    for ckpt in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if not quiet:
            print0(f"[stagewise] warning: refusing checkpoint {ckpt}: {problem}; trying the previous one")
    return None


def agreed_checkpoint(root: str | Path, quiet: bool = False) -> Path | None:
    """Collective: the checkpoint every rank resumes from. The main process verifies (checksums every
    file: tens of GB at GPU scale, so once, not on every rank) and the others take its choice; each
    rank then checks it can see that checkpoint, so machines without a shared filesystem stop here
    with one line instead of resuming from different states."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return latest_checkpoint(root, quiet)
    if td.get_rank() == 0:
        found = latest_checkpoint(root, quiet)
        choice = [found.name if found is not None else ""]
    else:
        choice = [None]
    td.broadcast_object_list(choice, src=0, device=_collective_device())
    chosen = Path(root) / "checkpoints" / choice[0] if choice[0] else None
    if chosen is not None:
        require_shared(chosen / MANIFEST, f"checkpoint {chosen}")
    return chosen


def require_shared(path: Path, what: str) -> None:
    """Collective: every rank must see ``path`` (written by the main process). A rank that does not,
    after ``STAGEWISE_SHARED_FS_WAIT_S`` seconds (60; a network filesystem may show new files late),
    stops every rank."""
    import torch

    from stagewise.parallel.collectives import reduce_sum

    deadline = time.time() + float(os.environ.get("STAGEWISE_SHARED_FS_WAIT_S", "60"))
    while not path.exists() and time.time() < deadline:
        time.sleep(1.0)
    missing = reduce_sum(torch.tensor([float(not path.exists())], device=_collective_device())).item()
    if missing:
        raise TrainingError(f"{int(missing)} process(es) cannot see {what} that the main process wrote "
                            f"({path}): output_dir must be on a filesystem every machine shares")


def _collective_device():
    from stagewise.parallel.collectives import device

    return device()


def save_checkpoint(strategy, root: str | Path, step: int, manifest: dict, keep_last: int = 2,
                    counters: Counters | None = None) -> Path:
    """Collective: every process must call it. Returns the final directory. The counters go into the
    manifest (JSON), not into a pickle: accelerate loads registered objects with weights_only=False."""
    accelerator = strategy.acc
    base = Path(root) / "checkpoints"
    final, tmp = base / f"step-{step}", base / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    strategy.save_state(tmp)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    faults.maybe_kill("ckpt_state", step=step, rank=rank)
    error = None
    if accelerator.is_main_process:
        try:
            if faults.active("disk_full", step=step):
                raise OSError(28, "No space left on device (injected)")
            info = {**manifest, "step": step, "saved_at": time.time(), "num_processes": accelerator.num_processes,
                    "counters": counters.state_dict() if counters is not None else None, "files": file_table(tmp)}
            with (tmp / MANIFEST).open("w") as fh:
                fh.write(json.dumps(info, indent=2))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            error = f"{e.strerror or e}"
    # every rank learns whether the main process could finish the checkpoint, so all stop together
    import torch

    from stagewise.parallel.collectives import reduce_sum

    failed = reduce_sum(torch.tensor([float(error is not None)], device=accelerator.device)).item() > 0
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
        raise TrainingError(f"could not write checkpoint {final} ({error or 'failed on the main process'}); "
                            f"{kept}; free space, then continue with --resume")
    faults.maybe_kill("ckpt_manifest", step=step, rank=rank)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        faults.maybe_kill("ckpt_renamed", step=step, rank=rank)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in base.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        require_shared(final / MANIFEST, f"checkpoint {final}")
    return final


def load_checkpoint(strategy, path: str | Path, counters: Counters | None = None) -> dict:
    """Collective. Restores everything save_checkpoint saved; returns the manifest."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest.get("num_processes", strategy.acc.num_processes) != strategy.acc.num_processes:
        from stagewise.errors import StagewiseError

        raise StagewiseError(f"{path}: saved with {manifest['num_processes']} processes, resuming with "
                             f"{strategy.acc.num_processes}; resume with the same number")
    import pickle

    try:
        strategy.load_state(path)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met a Python object it will not build
        from stagewise.errors import StagewiseError

        raise StagewiseError(f"{path}: refusing to load a checkpoint file that holds Python objects other than "
                             f"tensors ({str(e).splitlines()[0][:160]}); it may have been tampered with. Delete "
                             f"this checkpoint to resume from the previous one") from None
    if counters is not None:
        counters.load_state_dict(manifest.get("counters") or {"step": manifest["step"], "samples": 0})
    return manifest


def export_model(strategy, tokenizer, out_dir: str | Path, *, init_path: str, model_cfg,
                 extra: dict | None = None) -> Path:
    """Collective. Write a plain HF model dir (loadable by AutoModelForCausalLM.from_pretrained).

    The weights are the fp32 master weights under every strategy (``strategy.full_state_dict``), so a
    stage hands the next one exactly what it trained, whether it ran single, DDP, ZeRO or FSDP.
    LoRA: the adapters are merged into the stage's starting weights re-read from ``init_path`` in
    fp32 (the frozen base weights inside a bf16 DeepSpeed engine are bf16 copies).
    """
    out = Path(out_dir)
    state_dict = strategy.full_state_dict()
    if strategy.acc.is_main_process:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if strategy.is_lora:
            merge_lora(init_path, model_cfg, state_dict).save_pretrained(tmp, safe_serialization=True)
        else:
            if getattr(strategy.lm.config, "tie_word_embeddings", False):
                state_dict.pop("lm_head.weight", None)  # tied: a full (gathered) state dict holds it twice
            strategy.lm.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            _record_dtype(tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        faults.maybe_kill("export", stage=int((extra or {}).get("stage", -1)) + 1, rank=strategy.acc.process_index)
        (tmp / "stagewise.json").write_text(json.dumps({"exported_at": time.time(), **(extra or {})}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    strategy.acc.wait_for_everyone()
    return out


def merge_lora(init_path: str, model_cfg, state_dict: dict):
    """The stage's starting weights (fp32, from disk) with the trained LoRA adapters merged in."""
    import torch

    from stagewise.models import load_model, replicated_init

    with replicated_init():
        model = load_model(init_path, model_cfg.model_copy(update={"gradient_checkpointing": False}),
                           dtype=torch.float32)
    adapters = {k: v for k, v in state_dict.items() if "lora_" in k}
    missing = [k for k in model.state_dict() if "lora_" in k and k not in adapters]
    if not adapters or missing:
        raise RuntimeError(f"LoRA export: adapter weights missing from the trained state ({missing[:3]})")
    model.load_state_dict(adapters, strict=False)
    return model.merge_and_unload()


def _record_dtype(model_dir: Path, state_dict: dict) -> None:
    """save_pretrained writes the dtype of the module (bf16 inside a bf16 DeepSpeed engine), not that
    of the weights it was given: record the weights' dtype."""
    floats = {str(v.dtype).removeprefix("torch.") for v in state_dict.values() if v.is_floating_point()}
    if len(floats) == 1:
        cfg_path = model_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = floats.pop()
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def is_exported(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "stagewise.json").is_file()

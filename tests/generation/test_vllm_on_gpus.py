"""The GPU paths of the colocated vLLM engine, on CPU, against a stub ``vllm`` that records how it
is called: which device and executor each rank's engine gets, the staged wake around a weight push,
the context length it is built with, and what stagewise refuses before building one."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from stagewise.config import RolloutConfig, VLLMOptions
from stagewise.errors import ConfigError
from stagewise.generation import vllm_engine


class StubLLM:
    """``vllm.LLM`` as far as stagewise uses it; every call is appended to ``calls``."""

    calls: list = []
    built: list = []  # the keyword arguments of every engine built
    moves_device_to = None  # as vLLM's own executor does: torch.accelerator.set_device_index(cuda:0)

    def __init__(self, **kw):
        StubLLM.built.append(kw)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            dtype=torch.bfloat16, max_model_len=4096 if kw.get("max_model_len") == -1 else kw["max_model_len"]))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs=None):
        weights = list(kwargs["weights_iterator"])
        self.calls.append(("collective_rpc", method, sorted(kwargs), [(n, t.dtype) for n, t in weights]))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.fixture
def stub_vllm(monkeypatch):
    """A stub ``vllm`` package (CUDA build unless a test says otherwise); this process has no engine
    yet; the environment the engine sets is restored after the test."""
    module = types.ModuleType("vllm")
    module.LLM = StubLLM
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(device_type="cuda")
    module.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(vllm_engine, "_engine", [])
    for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL", "VLLM_CPU_KVCACHE_SPACE",
                "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(StubLLM, "calls", [])
    monkeypatch.setattr(StubLLM, "built", [])
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: int(__import__("os").environ.get("LOCAL_RANK", 0)))
    yield SimpleNamespace(platform=platforms.current_platform, synced=synced)
    from stagewise.parallel import runtime

    for key, value in runtime._saved_env.items():  # what set_env changed
        monkeypatch.setenv(key, value) if value is not None else monkeypatch.delenv(key, raising=False)
    runtime._saved_env.clear()


def build(device="cuda:1", **options):
    return vllm_engine.VLLMEngine("/models/qwen", options=VLLMOptions(**options), seed=0, device=torch.device(device))


def test_each_launched_rank_gets_an_engine_on_its_own_gpu(stub_vllm, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    build("cuda:1")
    kw = StubLLM.built[-1]
    # without it vLLM's uniprocess executor puts every rank on cuda:0 and moves the process there
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 1 and kw["enable_sleep_mode"] is True


def test_a_plain_one_gpu_run_keeps_vllms_own_executor(stub_vllm):
    build("cuda:0")  # no launcher: RANK unset, which external_launcher would need
    assert "distributed_executor_backend" not in StubLLM.built[-1]


def test_an_engine_that_moves_the_process_to_another_gpu_is_refused(stub_vllm, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match="moved this process from cuda:1 to cuda:0"):
        build("cuda:1")


def test_max_model_len_fits_the_kv_cache_budget_unless_given(stub_vllm):
    engine = build("cuda:0")
    assert StubLLM.built[-1]["max_model_len"] == -1  # vLLM: the longest the budget holds, <= the model's
    assert engine.context == 4096  # what vLLM chose: prompts are checked against it
    build("cuda:0", max_model_len=8192)
    assert StubLLM.built[-1]["max_model_len"] == 8192


def test_weights_wake_first_then_the_push_then_the_kv_cache_for_three_cycles(stub_vllm):
    """vLLM's sleep-mode recipe for weight updates: the KV cache is not resident during the push."""
    lm = torch.nn.Linear(2, 2)
    weights = SimpleNamespace(name="ddp", is_lora=False, device=torch.device("cuda", 0),
                              named_weights=lambda: iter([("w", lm.weight.detach()), ("b", lm.bias.detach())]))
    rollouts = vllm_engine.VLLMRollouts(weights, tokenizer=None, rollout=RolloutConfig(), seed=0,
                                        model_path="/models/qwen")
    for _ in range(3):
        with rollouts.generator() as engine:
            StubLLM.calls.append(("generate",))
            assert engine is rollouts.engine
    cycle = [("wake_up", ["weights"]),
             ("collective_rpc", "reload_weights", ["weights_iterator"], [("w", torch.bfloat16), ("b", torch.bfloat16)]),
             ("reset_prefix_cache",), ("wake_up", ["kv_cache"]), ("generate",), ("sleep", 2)]
    assert StubLLM.calls == cycle * 3
    assert stub_vllm.synced == [torch.device("cuda", 0)] * 3  # the push time includes its queued copies


def test_the_engine_sleeps_after_a_failed_push(stub_vllm, monkeypatch):
    def broken():
        raise RuntimeError("gather failed")
        yield

    weights = SimpleNamespace(name="ddp", is_lora=False, device=torch.device("cuda", 0), named_weights=broken)
    rollouts = vllm_engine.VLLMRollouts(weights, tokenizer=None, rollout=RolloutConfig(), seed=0, model_path="/m")
    with pytest.raises(RuntimeError, match="gather failed"):
        with rollouts.generator():
            pass
    assert StubLLM.calls == [("wake_up", ["weights"]), ("sleep", 2)]


def test_one_engine_per_process_refuses_other_options(stub_vllm):
    first = vllm_engine.process_engine("/m", VLLMOptions(), 0, torch.device("cuda", 0))
    assert vllm_engine.process_engine("/m", VLLMOptions(), 0, torch.device("cuda", 0)) is first
    with pytest.raises(ConfigError, match="cannot change"):
        vllm_engine.process_engine("/m", VLLMOptions(gpu_memory_utilization=0.5), 0, torch.device("cuda", 0))
    assert len(StubLLM.built) == 1


def test_a_cpu_run_with_a_gpu_build_of_vllm_is_refused(stub_vllm):
    with pytest.raises(ConfigError, match="cuda build and would run on that device"):
        build("cpu")
    assert StubLLM.built == []
    stub_vllm.platform.device_type = "cpu"
    build("cpu")
    assert "gpu_memory_utilization" not in StubLLM.built[-1]


def test_stage_level_vllm_options_are_refused_before_loading(tmp_path):
    from stagewise.config import load_config
    from stagewise.continual.preflight import check_one_vllm_engine
    from tests.helpers import tiny_raw

    raw = tiny_raw(tmp_path / "model", tmp_path / "out", stages=2, steps=1)
    raw["rollout"]["engine"] = "vllm"
    check_one_vllm_engine(load_config(raw=raw))
    raw["stages"][1]["rollout"] = {"vllm": {"gpu_memory_utilization": 0.5}}
    with pytest.raises(ConfigError, match=r"stages.1.rollout.vllm: the vLLM engine is built once per run"):
        check_one_vllm_engine(load_config(raw=raw))


def test_cuda_graphs_on_gpus_eager_on_cpu_unless_set(stub_vllm):
    build("cuda:0")
    assert StubLLM.built[-1]["enforce_eager"] is False
    build("cuda:0", enforce_eager=True)
    assert StubLLM.built[-1]["enforce_eager"] is True
    stub_vllm.platform.device_type = "cpu"
    build("cpu")
    assert StubLLM.built[-1]["enforce_eager"] is True

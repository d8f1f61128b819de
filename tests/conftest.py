"""Shared fixtures: a tiny random Llama (2 layers, width 64) and a byte-level tokenizer, built
offline from a config — tests never download anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import stagewise.builtins  # noqa: E402,F401  (every built-in registry name, as a run has them)
from tests.tiny import (  # noqa: E402,F401  (re-exported: tests import them from here)
    CHAT_TEMPLATE,
    CHATML_TEMPLATE,
    build_tiny_model,
    build_tokenizer,
    make_tiny_dir,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """The same tiny model with a role-tagged chat template (SFT needs to find assistant turns)."""
    return make_tiny_dir(tmp_path_factory.mktemp("tiny_chat") / "model", template=CHATML_TEMPLATE)


@pytest.fixture()
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from stagewise.models import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(str(tiny_model_dir))


def gpu_session(config) -> bool:
    """`pytest -m gpu`: the GPU tests only. Any other selection is the CPU suite."""
    return (config.option.markexpr or "").strip() == "gpu"


def pytest_configure(config):
    # The CPU suite runs on CPU even where GPUs are visible: its pinned numbers are CPU fp32 ones,
    # and its 2-process tests would otherwise put both ranks on cuda:0 (NCCL: duplicate GPU).
    # Hidden before anything asks CUDA, for this process and every process a test launches.
    if not gpu_session(config):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    import torch

    if gpu_session(config) and torch.cuda.is_available():
        return
    reason = ("GPU tests run on their own: pytest -m gpu (make gpu-check runs them)" if not gpu_session(config)
              else "needs a CUDA GPU (run on the GPU machine)")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

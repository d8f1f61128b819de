import time

import pytest
import torch

from stagewise.config import LoraConfig, ModelConfig
from stagewise.errors import ModelLoadError
from stagewise.models import load_model, load_model_config, resolve_model_path
from tests.helpers import load_model_and_tokenizer


def test_local_dir_loads_with_dtype(tiny_model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16 and tok.pad_token is not None


@pytest.mark.parametrize("path, fragment", [
    ("/no/such/dir", "path not found"),
    ("./missing/model.gguf", "GGUF file not found"),
    ("bundled:nope", "unknown bundled model"),
])
def test_missing_model_is_a_clear_error(path, fragment):
    with pytest.raises(ModelLoadError, match=fragment):
        resolve_model_path(path)


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_id_not_in_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local HF cache|cannot load"):
        load_model(resolve_model_path("someone/not-cached-model"), ModelConfig())
    with pytest.raises(ModelLoadError, match="not a local model directory, and not loadable as a hub model id"):
        load_model_config(resolve_model_path("someone/not-cached-model"))


def test_missing_relative_checkpoint_path_is_one_line(tmp_path, monkeypatch):
    """`checkpoints/mymodel` when checkpoints/ exists is a path; the run says so in one line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ModelLoadError, match="path not found: checkpoints/mymodel"):
        resolve_model_path("checkpoints/mymodel")


def test_cli_missing_model_path_is_one_line(tmp_path):
    """The real path a user takes: no OSError traceback from AutoConfig, exit 2, one line."""
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "domains": [{"name": "add"}],
                                   "model": {"name_or_path": "checkpoints/mymodel"},
                                   "stages": [{"domains": ["add"], "steps": 1}]}))
    r = subprocess.run([sys.executable, "-m", "stagewise", "run", str(cfg)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "checkpoints/mymodel" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was created for a run that could not start


def test_lora_and_gradient_checkpointing(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8), gradient_checkpointing=True)
    model = load_model(str(tiny_model_dir), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    inner = model.base_model.model
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing


@pytest.mark.slow
def test_bundled_model_converts_once_then_loads_fast(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path / "cache"))
    t0 = time.time()
    model, tok = load_model_and_tokenizer(ModelConfig())
    first = time.time() - t0
    t0 = time.time()
    model2, tok2 = load_model_and_tokenizer(ModelConfig())
    second = time.time() - t0
    with capsys.disabled():  # shown in the test log on purpose
        print(f"\nbundled SmolLM2-135M: first load (convert + cache) {first:.1f} s, second load {second:.2f} s")
    assert second < 3.0
    assert list((tmp_path / "cache" / "gguf").glob("*/model.safetensors"))
    assert model.config.num_hidden_layers == 30 and tok.chat_template
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n
    # a real instruct model: it answers a trivial question
    from stagewise.generation.chat_template import eos_ids
    from stagewise.generation.sampling import sample
    from tests.helpers import encode_prompts

    ids, mask = encode_prompts(tok, ["What is the capital of France?"])
    out, cmask, _ = sample(model, ids, mask, max_new_tokens=12, eos_token_ids=eos_ids(tok),
                           pad_token_id=tok.pad_token_id, greedy=True)
    assert "Paris" in tok.decode(out[0][cmask[0].bool()])


def test_attn_implementation_reaches_the_model(tiny_model_dir):
    from stagewise.config import ModelConfig
    from stagewise.models import load_model

    assert load_model(str(tiny_model_dir), ModelConfig(attn_implementation="eager")).config._attn_implementation \
        == "eager"
    assert load_model(str(tiny_model_dir), ModelConfig()).config._attn_implementation == "sdpa"


def test_copies_of_one_gguf_share_their_conversion_and_other_bytes_do_not(tmp_path, monkeypatch):
    """Keyed by content: each venv's copy of the bundled model (another path, another mtime) finds
    the conversion another made; a file with other bytes gets its own."""
    import os

    from stagewise.models import gguf_cache_dir

    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path / "cache"))
    data = os.urandom(5 << 20)  # more than one read block
    a, b, c = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf", tmp_path / "venv3" / "m.gguf"
    for path, body in ((a, data), (b, data), (c, data[:-1] + bytes([data[-1] ^ 1]))):
        path.parent.mkdir()
        path.write_bytes(body)
    os.utime(b, (1, 1))
    assert gguf_cache_dir(a) == gguf_cache_dir(b)
    assert gguf_cache_dir(a) != gguf_cache_dir(c)
    assert gguf_cache_dir(a).parent == tmp_path / "cache" / "gguf" and gguf_cache_dir(a).name.startswith("m-")

"""Model cards (README.md) in the final model and every stage's export: Hugging Face front matter,
the curriculum, the matrices as far as the run had got, the resolved config, the library versions."""

from __future__ import annotations

import yaml

from stagewise.continual.model_card import base_model
from stagewise.machine import package_version


def front_matter_and_body(path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_final_models_card_has_front_matter_matrix_config_and_versions(finished_run, tiny_chat_dir):
    out, res = finished_run
    meta, body = front_matter_and_body(out / "final_model" / "README.md")
    assert meta["base_model"] == str(tiny_chat_dir) and meta["library_name"] == "transformers"
    assert meta["tags"] == ["stagewise", "sft", "grpo", "continual-learning"]
    loss = res["loss_matrix"]
    assert "| after 1: add | 0.000 | 0.000 |" in body and "| after 2: max | 0.000 | 0.000 |" in body
    assert f"| after 2: max | {loss[2][0]:.3f} | {loss[2][1]:.3f} |" in body  # the loss matrix
    assert f"| BWT | {res['metrics']['BWT']:+.3f} |" in body and "| 2 | grpo | max | 1 | yes |" in body
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == yaml.safe_load((out / "config.yaml").read_text())
    assert f"| transformers | {package_version('transformers')} |" in body and "| deepspeed |" in body
    # huggingface_hub reads it back as a card
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "final_model" / "README.md").data.base_model == str(tiny_chat_dir)


def test_a_stage_exports_card_holds_the_matrix_up_to_that_stage(finished_run):
    out, res = finished_run
    meta, body = front_matter_and_body(out / "stage-1-add" / "model" / "README.md")
    assert meta["tags"] == ["stagewise", "sft", "continual-learning"]  # the kinds this model went through
    assert "after stage 1 of 2" in body and "| 2 | grpo | max | 1 | no |" in body
    assert "| after 1: add |" in body and "after 2: max" not in body
    assert "Continual-learning metrics" not in body  # defined over the whole curriculum


def test_a_bundled_models_card_names_the_model_it_was_made_from():
    assert base_model("bundled:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model("org/some-model") == "org/some-model" and base_model("/data/m.gguf") == "/data/m.gguf"

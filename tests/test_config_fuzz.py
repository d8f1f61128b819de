"""Property-based fuzzing of the config loader and dotted overrides: whatever the input, loading
either gives a RunConfig or raises the clean StagewiseError that the CLI prints as one line."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagewise.config import RunConfig, load_config
from stagewise.errors import StagewiseError

BASE = {"name": "fuzz", "model": {"name_or_path": "bundled:smollm2-135m-instruct"},
        "domains": [{"name": "add"}, {"name": "max"}],
        "stages": [{"domains": ["add"], "steps": 2}, {"domains": ["max"], "steps": 2}]}
KEYS = ["name", "seed", "model", "model.lora", "model.lora.r", "domains", "domains.0",
        "domains.0.name", "domains.0.type",
        "domains.0.args", "domains.1.rewards", "stages", "stages.0", "stages.0.steps", "stages.1.domains",
        "stages.0.kind", "stages.1.epochs", "stages.0.optim", "stages.0.optim.lr", "stages.1.rollout", "optim.lr",
        "optim.schedule", "rollout.num_generations", "rollout.top_p", "rollout.max_turns", "rollout.engine",
        "grpo.loss", "grpo.micro_batch_size", "sft.micro_batch_size", "dist.strategy", "dist.offload",
        "checkpoint.every", "eval.max_new_tokens", "logging", "ablations", "plugins", "data.on_error", "x", "stages.9",
        "domains.-1.name", "optim..lr", ".", "stages.a"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
override_text = st.one_of(st.sampled_from(KEYS), st.text(max_size=15)).flatmap(
    lambda key: st.one_of(values.map(lambda v: f"{key}={yaml.safe_dump(v, default_flow_style=True).strip()}"),
                          st.text(max_size=20).map(lambda t: f"{key}={t}"), st.just(key)))

FUZZ = settings(max_examples=500, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(raw=None, overrides=(), ablation=None):
    try:
        assert isinstance(load_config(raw=raw, overrides=list(overrides), ablation=ablation), RunConfig)
    except StagewiseError as e:
        assert str(e) and "\n" not in str(e).strip().splitlines()[0]


@FUZZ
@given(st.lists(override_text, max_size=4))
def test_overrides_never_raise_anything_but_the_clean_error(overrides):
    load(dict(BASE), overrides)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted({k.split(".")[0] for k in KEYS if k and k[0] != "."})), values,
                       max_size=4))
def test_raw_configs_never_raise_anything_but_the_clean_error(extra):
    load({**BASE, **extra})


@FUZZ
@given(values, st.one_of(st.none(), st.text(max_size=6)))
def test_ablations_never_raise_anything_but_the_clean_error(ablations, name):
    load({**BASE, "ablations": ablations}, ablation=name)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "a: [unclosed\n", "\t- tab\n", "{a: 1}: 2\n"])
def test_yaml_files_that_are_not_configs(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(StagewiseError):
        load_config(p)

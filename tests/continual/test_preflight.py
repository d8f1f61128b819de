"""Preflight: every registry name, plugin, shape and domain is checked before any model loads, with
one line naming the field (the CLI's bad-input table runs the same checks through `stagewise run`)."""

import pytest

from stagewise.config import load_config
from stagewise.continual.preflight import build_domains, check_config
from stagewise.errors import ConfigError

BASE = {
    "name": "t", "output_dir": "out",
    "domains": [{"name": "add"}, {"name": "max"}],
    "stages": [{"domains": ["add"], "steps": 5}, {"domains": ["max"], "steps": 5}],
}


@pytest.mark.parametrize("override, fragment", [
    (["grpo.advantage=gpro"], "grpo.advantage: unknown advantage 'gpro' (known: batch_std, dr_grpo, grpo)"),
    (["stages.1.grpo={loss: dapoo}"], "stages.1.grpo.loss: unknown loss 'dapoo'"),
    (["domains.0.type=adition"], "domains.0.type: unknown domain type 'adition'"),
    (["plugins=[no_such_module_xyz]"], "plugins.0: cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
    (["rollout.engine=vlm"], "rollout.engine: unknown rollout engine 'vlm' (known: local"),
    (["stages.1.rollout={engine: x}"], "stages.1.rollout.engine: unknown rollout engine 'x'"),
    (["stages.0.kind=dpo"], "stages.0.kind: unknown stage kind 'dpo' (known: grpo"),
    (["rollout.prompts_per_step=3"], "stages.0: rollout.prompts_per_step=3 must be divisible by the 2 processes"),
])
def test_names_and_shapes_are_checked_before_any_model(override, fragment):
    cfg = load_config(raw=BASE, overrides=override)  # loading alone is schema only
    with pytest.raises(ConfigError) as e:
        check_config(cfg, world=2)
    assert fragment in str(e.value)


def test_reward_names_are_checked_when_the_domains_are_built():
    cfg = load_config(raw=BASE, overrides=["domains.1.rewards=[{name: exactt}]"])
    check_config(cfg, world=1)  # an environment's rewards are its own parts: known only once it is built
    with pytest.raises(ConfigError, match=r"domains.1.rewards.0.name: unknown reward 'exactt' \(known: .*last_number"):
        build_domains(cfg)


def test_a_stage_that_learns_from_rewards_needs_them():
    cfg = load_config(raw={**BASE, "domains": [{"name": "add"}, {"name": "max", "rewards": []}]})
    with pytest.raises(ConfigError, match="stages.1: domain 'max' defines no reward, and a grpo stage learns"):
        build_domains(cfg)


def test_the_default_config_passes(tmp_path):
    cfg = load_config(raw=BASE)
    check_config(cfg, world=4)
    assert [d.name for d in build_domains(cfg)] == ["add", "max"]

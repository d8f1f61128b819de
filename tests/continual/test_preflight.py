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


def mixed_curriculum(tmp_path, replay: float) -> dict:
    """sft on demonstrations (no reward), grpo on a tool environment (calculator: no conversations),
    then the same kinds again with replay: what each later stage may replay depends on its kind."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(f'{{"messages": [{{"role": "user", "content": "{a}+2?"}}, '
                             f'{{"role": "assistant", "content": "{a + 2}"}}]}}\n' for a in range(4)))
    chat = {"type": "chat", "eval_size": 1, "args": {"path": str(demos)}}
    return {**BASE,
            "domains": [{"name": "calc", "type": "calculator"}, {"name": "max"}, {"name": "add_demos", **chat},
                        {"name": "max_demos", **chat}],
            "stages": [{"kind": "sft", "domains": ["add_demos"], "steps": 1},
                       {"kind": "grpo", "domains": ["calc"], "steps": 1},
                       {"kind": "sft", "domains": ["max_demos"], "steps": 1, "replay": replay},
                       {"kind": "grpo", "domains": ["max"], "steps": 1, "replay": replay}]}


def test_replay_takes_the_earlier_domains_a_stage_of_its_kind_can_train_on(tmp_path):
    from stagewise.continual.preflight import replay_pool

    cfg = load_config(raw=mixed_curriculum(tmp_path, 0.25))
    by_name = {d.name: d for d in build_domains(cfg)}
    # an sft stage cannot learn an environment without conversations, nor a grpo stage demonstrations
    # without a reward: before, both were handed every earlier domain (the rollout of a chat record, an
    # sft "conversation" made of a task that has none)
    pool, left_out = replay_pool(cfg, 2, by_name)
    assert [d.name for d in pool] == ["add_demos"] and list(left_out) == ["calc"]
    pool, left_out = replay_pool(cfg, 3, by_name)
    assert [d.name for d in pool] == ["calc"] and left_out == {"add_demos": "defines no reward",
                                                               "max_demos": "defines no reward"}


@pytest.mark.parametrize("stages, fragment", [
    ([{"kind": "sft", "domains": ["add_demos"], "steps": 1},
      {"kind": "grpo", "domains": ["calc"], "steps": 1, "replay": 0.25}],
     "stages.1.replay=0.25: no earlier stage's domain can be replayed in a grpo stage (add_demos defines no reward)"),
    ([{"kind": "grpo", "domains": ["calc"], "steps": 1, "replay": 0.25}],
     "stages.0.replay=0.25: no earlier stage's domain can be replayed in a grpo stage (stage 1 has no earlier stage)"),
])
def test_replay_with_nothing_to_replay_is_refused(tmp_path, stages, fragment):
    cfg = load_config(raw={**mixed_curriculum(tmp_path, 0.0), "stages": stages})
    with pytest.raises(ConfigError) as e:
        build_domains(cfg)
    assert fragment in str(e.value)

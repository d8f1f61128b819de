"""The built-in tool domain: disjoint splits, tasks whose answers are right, reward parts checked."""

import pytest

from stagewise.config import DomainSpec
from stagewise.continual.curriculum import run_curriculum
from stagewise.domains.base import build_domain
from stagewise.errors import ConfigError
from tests.helpers import tiny_config


def test_tasks_and_splits():
    dom = build_domain(DomainSpec(name="calc", type="calculator", eval_size=50, train_size=500), seed=3)
    assert len(dom.eval) == 50 and len(dom.train) == 500
    assert not {t["prompt"] for t in dom.eval} & {t["prompt"] for t in dom.train}
    for t in dom.eval:
        import re

        a, op, b = re.search(r"(\d+) (times|plus) (\d+)", t["prompt"]).groups()
        assert t["answer"] == str(int(a) * int(b) if op == "times" else int(a) + int(b))
    env = dom.make_env(dom.eval[0])
    assert [f.__name__ for f in env.tools()] == ["multiply", "add"]
    assert env.opening()[-1] == {"role": "user", "content": dom.eval[0]["prompt"]}


def test_reward_override_uses_the_environment_parts():
    dom = build_domain(DomainSpec(name="calc", type="calculator", rewards=[{"name": "correct"}]), seed=0)
    assert dom.rewards == [("correct", 1.0)] and dom.metric == "correct" and dom.environment is not None
    with pytest.raises(ConfigError, match="reward parts are correct, used_tool; unknown: exact"):
        build_domain(DomainSpec(name="calc", type="calculator", rewards=[{"name": "exact"}]), seed=0)


def test_sft_stage_on_an_environment_is_refused_before_any_model_loads(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "x", overrides=[
        "domains=[{name: calc, type: calculator}]", "stages=[{kind: sft, domains: [calc], steps: 1}]"])
    with pytest.raises(ConfigError, match="'calc' is an environment; an sft stage needs reference conversations"):
        run_curriculum(cfg)

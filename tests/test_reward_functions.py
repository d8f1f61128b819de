"""Reward functions in TRL's form: the weighted nansum, what a function is passed, async functions
awaited together, None, and the one-line errors that name the function (load, raise, wrong length)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from stagewise.config import DomainSpec, RewardSpec, load_config
from stagewise.domains.base import build_domain
from stagewise.errors import ConfigError, RewardError
from stagewise.reward_functions import (
    MetricLog,
    RewardBatch,
    RewardContext,
    call_all,
    combine,
    function_name,
    load,
    per_sample,
)
from stagewise.rewards import only_answer
from tests.trl_docs import async_io, logging_extra, think_format, token_length

NAN = math.nan


# --- the combination: a pure function ---------------------------------------------------------


def test_combine_is_the_weighted_nansum_and_flags_rows_no_function_scores():
    values = torch.tensor([[1.0, NAN, 0.5],   # 1.0 * 1 + 0.5 * 2          = 2.0
                           [NAN, NAN, NAN],   # nothing applies             -> 0.0, unscorable
                           [0.0, 2.0, NAN],   # 0 * 1 + 2.0 * -0.5          = -1.0
                           [3.0, 4.0, 0.25]])  # 3 - 2 + 0.5                 = 1.5
    rewards, unscorable = combine(values, torch.tensor([1.0, -0.5, 2.0]))
    assert rewards.tolist() == [2.0, 0.0, -1.0, 1.5]
    assert unscorable.tolist() == [False, True, False, False]
    # a domain without rewards (an SFT-only one): reward 0, nothing to warn about
    rewards, unscorable = combine(torch.zeros(2, 0), torch.zeros(0))
    assert rewards.tolist() == [0.0, 0.0] and unscorable.tolist() == [False, False]


# --- what a function gets ---------------------------------------------------------------------


def batch(n: int = 2, conversational: bool = False, **fields) -> RewardBatch:
    prompts = [[{"role": "user", "content": f"q{i}"}] if conversational else f"q{i}" for i in range(n)]
    texts = [f"a{i}" for i in range(n)]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    examples = [{"prompt": p, **{k: v[i] for k, v in fields.items() if v[i] is not ...}} for i, p in enumerate(prompts)]
    return RewardBatch(prompts, completions, [[1, 2, 3][:i + 1] for i in range(n)], examples)


def test_a_function_gets_what_trl_passes():
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return [0.0] * len(prompts)

    state, log = object(), MetricLog()
    b = batch(conversational=True, answer=["7", "8"], options=[[1, 2], ...], _record=["x", "y"])
    call_all([("spy", spy)], b, RewardContext(trainer_state=state, log_metric=log), "domain d")
    assert seen["prompts"] == [[{"role": "user", "content": "q0"}], [{"role": "user", "content": "q1"}]]
    assert seen["completions"] == [[{"role": "assistant", "content": "a0"}], [{"role": "assistant", "content": "a1"}]]
    assert seen["completion_ids"] == [[1], [1, 2]]
    # the record's fields as columns, but the prompt (and stagewise's own "_" fields); a field a record
    # lacks is None in its row
    assert seen["answer"] == ["7", "8"] and seen["options"] == [[1, 2], None]
    assert "prompt" not in seen and "_record" not in seen and "environments" not in seen
    assert seen["trainer_state"] is state and seen["log_metric"] is log
    seen["log_extra"]("golden", ["g0", "g1"])
    assert b.extra == [{"golden": "g0"}, {"golden": "g1"}]


def test_functions_from_trls_docs_score_their_examples():
    """The examples' own doctests (TRL's grpo_trainer docs), through our call."""
    b = RewardBatch(["The sky is", "The sun is"], [" blue.", " in the sky."], [[6303, 13], [304, 279, 12884, 13]],
                    [{"prompt": "The sky is"}, {"prompt": "The sun is"}])
    assert call_all([("len", token_length.reward_func)], b, RewardContext(), "d") == {"len": [2.0, 4.0]}
    b = RewardBatch([[{"role": "assistant", "content": "What is the result of (1 + 2) * 4?"}]] * 2,
                    [[{"role": "assistant", "content": "<think>The sum of 1 and 2 is 3, which we multiply by 4 to get "
                                                       "12.</think><answer>(1 + 2) * 4 = 12</answer>"}],
                     [{"role": "assistant", "content": "The sum of 3 and 1 is 4, which we multiply by 2 to get 8. So "
                                                       "(3 + 1) * 2 = 8."}]], [[], []], [{}, {}])
    assert call_all([("f", think_format.format_reward_func)], b, RewardContext(), "d") == {"f": [1.0, 0.0]}
    log = MetricLog()
    b = RewardBatch(["p", "p"], [r" The solution is \boxed{2}.", r" The solution is \boxed{6}."], [[], []],
                    [{"prompt": "p", "ground_truth": "2"}, {"prompt": "p", "ground_truth": "5"}])
    assert call_all([("acc", logging_extra.reward_func)], b, RewardContext(log_metric=log), "d") == {"acc": [1.0, 0.0]}
    assert b.extra == [{"golden_answer": "2", "extracted_answer": "2"}, {"golden_answer": "5", "extracted_answer": "6"}]
    assert log.flush(lambda parts: parts) == {"accuracy": 0.5}


def test_registered_rewards_take_the_same_path():
    """A per-sample reward adapted to the batched form: the record rebuilt, the text of a message."""
    b = batch(conversational=True, answer=["85", "11"], options=[[11, 85], [11, 85]])
    b.completions = [[{"role": "assistant", "content": "85"}], [{"role": "assistant", "content": "11 or 85"}]]
    assert call_all([("o", per_sample(only_answer))], b, RewardContext(), "d") == {"o": [1.0, 0.0]}
    assert function_name(per_sample(only_answer)) == "only_answer"


def test_names_as_trl_logs_them():
    import functools

    class Judge:
        def __call__(self, completions, **kw):
            return [0.0] * len(completions)

    assert function_name(token_length.reward_func) == "reward_func"
    assert function_name(functools.partial(functools.partial(think_format.format_reward_func))) == "format_reward_func"
    assert function_name(Judge()) == "Judge"


# --- async functions ----------------------------------------------------------------------------


def test_async_functions_are_awaited_together_on_one_lasting_loop():
    """Each of the two waits until both have started: run one after the other, the first would time out."""
    started, loops = [], []

    async def meet(completions):
        loops.append(asyncio.get_running_loop())
        started.append(1)
        for _ in range(2000):  # 10 s at most
            if len(started) % 2 == 0:
                return [1.0] * len(completions)
            await asyncio.sleep(0.005)
        raise TimeoutError("the other async reward function never started")

    async def first(completions, **kw):
        return await meet(completions)

    async def second(completions, **kw):
        return [2 * v for v in await meet(completions)]

    def plain(completions, **kw):
        return [3.0] * len(completions)

    fns = [("first", first), ("plain", plain), ("second", second)]
    out = call_all(fns, batch(), RewardContext(), "d")
    assert list(out) == ["first", "plain", "second"]  # in the config's order, whatever ran first
    assert out == {"first": [1.0, 1.0], "plain": [3.0, 3.0], "second": [2.0, 2.0]}
    call_all([("first", first), ("second", second)], batch(), RewardContext(), "d")
    assert len(loops) == 4 and len({id(x) for x in loops}) == 1  # clients bound to the loop stay usable
    # TRL's own async example
    assert call_all([("a", async_io.async_reward_func)], batch(), RewardContext(), "d") == {"a": [1.0, 1.0]}


# --- None: not applicable -------------------------------------------------------------------------


def math_only(completions, task, **kwargs):
    return [1.0 if c == "4" else 0.0 if t == "math" else None for c, t in zip(completions, task)]


def code_only(completions, task, **kwargs):
    return [0.5 if t == "code" else None for t in task]


def test_none_is_left_out_of_the_weighted_sum():
    dom = build_domain(DomainSpec(name="add", rewards=[
        RewardSpec(fn="tests.test_reward_functions:math_only", weight=1.0),
        RewardSpec(fn="tests.test_reward_functions:code_only", weight=2.0)]), 0)
    rows = [("2+2?", "4", "math"), ("2+2?", "4", "math"), ("sum()", "0", "code"), ("?", "0", "poem")]
    records = [{"prompt": p, "answer": a, "task": t} for p, a, t in rows]
    b = RewardBatch([r["prompt"] for r in records], ["4", "5", "def f", "x"], [[]] * 4, records)
    with pytest.warns(RuntimeWarning, match=r"domain add: every reward \(math_only, code_only\) returned None"):
        parts, rewards = dom.score_batch(b)
    assert [p["math_only"] for p in parts[:2]] == [1.0, 0.0] and math.isnan(parts[2]["math_only"])
    assert [math.isnan(p["code_only"]) for p in parts] == [True, True, False, True]
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0]  # 1; 0; 2 x 0.5; nothing applies: 0 (and the warning)
    # the metric is the domain's own (add: last_number), scored alongside
    assert [p["last_number"] for p in parts] == [1.0, 0.0, 0.0, 0.0]


# --- errors: one line naming the function ----------------------------------------------------------


def raises(completions, **kwargs):
    return [1 / 0 for _ in completions]


def too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def not_a_list(completions, **kwargs):
    return 1.0


def a_word(completions, **kwargs):
    return ["good"] * len(completions)


async def raises_later(completions, **kwargs):
    await asyncio.sleep(0)
    raise ValueError("judge unreachable:\n  connection refused")


@pytest.mark.parametrize("fn, message", [
    (raises, r"^reward function raises \(domain d\) raised ZeroDivisionError: division by zero$"),
    (too_few, r"^reward function too_few \(domain d\) returned 1 values for 2 completions$"),
    (not_a_list, r"^reward function not_a_list \(domain d\) returned a float, not a list of 2 floats \(or None\)$"),
    (a_word, r"^reward function a_word \(domain d\) returned 'good' \(a str\), not a float or None$"),
    (raises_later, r"^reward function raises_later \(domain d\) raised ValueError: judge unreachable: connection "
                   r"refused$"),
])
def test_a_failing_function_is_named_in_one_line(fn, message):
    fns = [("fine", lambda completions, **kw: [0.0] * len(completions)), (fn.__name__, fn)]
    with pytest.raises(RewardError, match=message) as e:
        call_all(fns, batch(), RewardContext(), "domain d")
    assert "\n" not in str(e.value) and e.value.exit_code == 2


NOT_CALLABLE = 3


@pytest.mark.parametrize("path, message", [
    ("tests.no_such_module:f", r"cannot load reward function 'tests.no_such_module:f' \(ModuleNotFoundError: No "
                               r"module named 'tests.no_such_module'\)"),
    ("tests.trl_docs.token_length:nope", r"cannot load reward function 'tests.trl_docs.token_length:nope' "
                                         r"\(AttributeError: .*has no attribute 'nope'\)"),
    ("tests.test_reward_functions:NOT_CALLABLE", r"'tests.test_reward_functions:NOT_CALLABLE' is a int, not a "
                                                 r"function"),
])
def test_a_function_that_cannot_be_loaded_is_refused(path, message):
    with pytest.raises(ConfigError, match=r"^where: " + message + "$"):
        load(path, "where")


def test_fn_must_name_module_and_function_at_config_load(tmp_path):
    raw = {"name": "x", "output_dir": str(tmp_path), "model": {"name_or_path": "m"},
           "domains": [{"name": "add", "rewards": [{"fn": "tests.trl_docs.token_length"}]}],
           "stages": [{"domains": ["add"], "steps": 1}]}
    with pytest.raises(ConfigError, match=r"domains\.0\.rewards\.0\.fn: 'tests.trl_docs.token_length' is not "
                                          r"'package.module:function'"):
        load_config(raw=raw)
    raw["domains"][0]["rewards"] = [{"weight": 2.0}]
    with pytest.raises(ConfigError, match=r"domains\.0\.rewards\.0: give name \(a registered reward\) or fn"):
        load_config(raw=raw)


def test_function_names_must_be_unambiguous():
    two = [RewardSpec(fn="tests.trl_docs.token_length:reward_func"),
           RewardSpec(fn="tests.trl_docs.char_length:reward_func")]
    with pytest.raises(ConfigError, match=r"^domains.add.rewards.1: two reward functions are named 'reward_func'"):
        build_domain(DomainSpec(name="add", rewards=two), 0)
    two[1] = RewardSpec(fn="tests.trl_docs.char_length:reward_func", name="chars")
    d = build_domain(DomainSpec(name="add", rewards=two), 0)
    assert d.rewards == [("reward_func", 1.0), ("chars", 1.0)] and d.metric == "last_number"
    with pytest.raises(ConfigError, match=r"^domains.add.rewards.0: 'tests.trl_docs.char_length:reward_func' would "
                                          r"be logged as 'exact', the name of a registered reward"):
        build_domain(DomainSpec(name="add", rewards=[RewardSpec(fn="tests.trl_docs.char_length:reward_func",
                                                                name="exact")]), 0)

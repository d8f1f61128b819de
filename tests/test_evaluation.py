"""Held-out evaluation with several sampled trials per task: pass^k as tau-bench defines it."""

from __future__ import annotations

import math

import pytest

from stagewise.domains.base import Domain
from stagewise.evaluation import evaluate_domain, evaluate_domains, pass_hat_k
from stagewise.rl.episodes import EpisodeLimits
from tests.helpers import local_generator
from tests.plugins import AsciiChat


def test_pass_hat_k_by_hand():
    assert pass_hat_k(3, 4, 1) == 0.75
    assert pass_hat_k(3, 4, 2) == 3 / 6  # C(3,2) / C(4,2)
    assert pass_hat_k(3, 4, 3) == 1 / 4
    assert pass_hat_k(3, 4, 4) == 0.0
    assert pass_hat_k(4, 4, 4) == 1.0
    assert math.isnan(pass_hat_k(1, 2, 3))


class Ascii1(AsciiChat):
    """Success = every character of the answer is ASCII (a random byte-level model: sometimes)."""

    def reward(self):
        text = self.answer or ""
        return {"ascii": float(bool(text) and text.isascii())}


def ascii_domain() -> Domain:
    tasks = [{"prompt": f"Say {i}.", "turns": 1} for i in range(6)]
    return Domain("ascii", tasks, tasks, rewards=[("ascii", 1.0)], metric="ascii", environment=Ascii1,
                  reward_parts=("ascii",))


def test_sampled_trials_give_pass_k_independent_of_batching(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=3, limits=EpisodeLimits(max_turns=1, max_tokens=3), trials=4, temperature=1.0, seed=5)
    first = evaluate_domain(local_generator(model, tok), tok, ascii_domain(), batch_size=8, **kw)
    rate, pass_k = first.accuracy, first.pass_k
    # other batches, same seeds
    again = evaluate_domain(local_generator(model, tok), tok, ascii_domain(), batch_size=24, **kw)
    assert (rate, pass_k, first.details) == (again.accuracy, again.pass_k, again.details)
    assert first.details["ascii"] == pytest.approx(rate) and first.details["tool_calls"] == 0
    assert sorted(pass_k) == [1, 2, 3, 4] and pass_k[1] == pytest.approx(rate)
    assert pass_k[1] >= pass_k[2] >= pass_k[3] >= pass_k[4]
    assert 0.0 < rate < 1.0, "the check needs some tasks that sometimes fail: change the seed"
    greedy = evaluate_domain(local_generator(model, tok), tok, ascii_domain(), batch_size=8, **{**kw, "trials": 1})
    assert list(greedy.pass_k) == [1] and greedy.pass_k[1] == greedy.accuracy



class Short(AsciiChat):
    """Success = the answer has fewer than 3 characters (another domain's rule, other prompts)."""

    reward_parts = ("short",)

    def reward(self):
        return {"short": float(len(self.answer or "") < 3)}


def short_domain() -> Domain:
    tasks = [{"prompt": f"Name {i} things.", "turns": 1} for i in range(5)]
    return Domain("short", tasks, tasks, rewards=[("short", 1.0)], metric="short", environment=Short,
                  reward_parts=("short",))


@pytest.mark.parametrize("trials", [1, 3])
def test_domains_sharing_batches_score_as_each_alone(tiny, trials):
    """Several domains' episodes in one batch: each domain's numbers are those it gets alone, whatever
    the batch size (a task counted under another domain, or a padding episode counted, would differ)."""
    model, tok = tiny
    kw = dict(max_new_tokens=3, limits=EpisodeLimits(max_turns=1, max_tokens=3), trials=trials, temperature=1.0,
              seed=5)
    alone = [evaluate_domain(local_generator(model, tok), tok, d, batch_size=4, **kw)
             for d in (ascii_domain(), short_domain())]
    for batch_size in (5 * trials, 64):
        together = evaluate_domains(local_generator(model, tok), tok, [ascii_domain(), short_domain()],
                                    batch_size=batch_size, **kw)
        for a, b in zip(alone, together):
            assert (a.accuracy, a.pass_k, a.details, a.samples) == (b.accuracy, b.pass_k, b.details, b.samples)
    assert alone[0].details["ascii"] == pytest.approx(alone[0].accuracy)
    assert alone[1].details["short"] == pytest.approx(alone[1].accuracy)
    assert alone[0].details["tool_calls"] == 0 and "ascii" not in alone[1].details

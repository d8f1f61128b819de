"""Multi-turn episodes, token-in/token-out: a scripted policy drives the real environment, chat
template and tool-call parsing; the tokens of the episode and its masks are checked exactly."""

from __future__ import annotations

import re

import pytest
import torch

from stagewise.config import DomainSpec
from stagewise.domains.base import Domain, build_domain
from stagewise.envs.base import Environment, TRLEnvironment
from stagewise.errors import ConfigError
from stagewise.generation.engines import Generation, LocalGenerator, SamplingParams
from stagewise.rl.episodes import EpisodeLimits, run_episodes
from stagewise.rl.rollout import batch_from_episodes, generate_rollouts
from tests.conftest import CHATML_TEMPLATE, build_tokenizer


class ScriptedEngine:
    """A policy written in Python: turn text = policy(prompt text so far); its tokens end with <eos>."""

    def __init__(self, tok, policy, finished: bool = True):
        self.tok, self.policy, self.finished, self.turns = tok, policy, finished, []

    def generate(self, prompts, *, n, seeds, params):
        out = []
        for p in prompts:
            text = self.policy(self.tok.decode(p))
            self.turns.append(text)
            out += [self.tok(text, add_special_tokens=False)["input_ids"]
                    + ([self.tok.eos_token_id] if self.finished else [])] * n
        return Generation(out, [self.finished] * len(out))


def question(prompt: str) -> tuple[int, str, int]:
    a, op, b = re.findall(r"(\d+) (times|plus) (\d+)", prompt)[-1]
    return int(a), op, int(b)


def oracle(prompt: str) -> str:
    """Call the right tool for the last question, then answer with what the tool returned."""
    after_question = prompt[prompt.rfind("<|user|>"):]
    if "<|tool|>" in after_question:
        return re.findall(r"<\|tool\|>(.*?)<eos>", after_question)[-1]
    a, op, b = question(prompt)
    name = "multiply" if op == "times" else "add"
    return f'<tool_call>{{"name": "{name}", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>'


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def calc():
    return build_domain(DomainSpec(name="calc", type="calculator", eval_size=4), seed=0)


PARAMS = SamplingParams(max_new_tokens=64, greedy=True, stop_token_ids=(1,))
LIMITS = EpisodeLimits(max_turns=4, max_tokens=512, max_tool_errors=2)


def episodes(tok, policy, dom, tasks, limits=LIMITS, finished=True):
    return run_episodes(ScriptedEngine(tok, policy, finished), tok, [(dom, t) for t in tasks], group_size=1,
                        seeds=None, params=PARAMS, limits=limits)


def test_oracle_scores_one_and_a_wrong_policy_zero(tok, calc):
    good = episodes(tok, oracle, calc, calc.eval)
    assert [e.parts for e in good] == [{"correct": 1.0, "used_tool": 1.0}] * 4
    assert all(e.done and not e.truncated and e.turns == 2 and e.tool_calls == 1 for e in good)
    assert [e.reward for e in good] == [1.2] * 4  # correct 1.0 + 0.2 x used_tool
    wrong = episodes(tok, lambda p: "41", calc, calc.eval)  # answers at once, without the tool
    assert [e.parts for e in wrong] == [{"correct": 0.0, "used_tool": 0.0}] * 4
    # the right number without calling the tool does not count: the domain is about using it
    cheat = episodes(tok, lambda p: str((lambda a, op, b: a * b if op == "times" else a + b)(*question(p))),
                     calc, calc.eval)
    assert all(e.parts["correct"] == 0.0 for e in cheat)


SEEN_BY_FN: dict = {}


def calls_made(prompts, completions, completion_ids, environments, **kwargs):
    """A TRL-form reward on an environment domain (TRL: environment_factory): it gets the episodes'
    environments and the messages after the opening."""
    SEEN_BY_FN.update(prompts=prompts, completions=completions, completion_ids=completion_ids)
    return [float(len(env.tool_calls)) for env in environments]


def test_an_environment_domain_takes_trl_reward_functions_beside_its_parts(tok):
    from stagewise.config import RewardSpec

    dom = build_domain(DomainSpec(name="calc", type="calculator", eval_size=4, rewards=[
        RewardSpec(name="correct"), RewardSpec(fn="tests.rl.test_episodes:calls_made", weight=0.5)]), seed=0)
    good = episodes(tok, oracle, dom, dom.eval[:2])
    assert [e.parts for e in good] == [{"correct": 1.0, "used_tool": 1.0, "calls_made": 1.0}] * 2
    assert [e.reward for e in good] == [1.5] * 2  # correct 1.0 + 0.5 x one call
    assert SEEN_BY_FN["prompts"] == [e.opening for e in good]
    roles = [[m["role"] for m in c] for c in SEEN_BY_FN["completions"]]
    assert roles == [["assistant", "tool", "assistant"]] * 2
    assert SEEN_BY_FN["completion_ids"] == [e.tokens for e in good]


def test_tokens_and_masks_are_exactly_the_turns(tok, calc):
    eng = ScriptedEngine(tok, oracle)
    [e] = run_episodes(eng, tok, [(calc, calc.eval[0])], group_size=1, seeds=None, params=PARAMS, limits=LIMITS)
    batch = batch_from_episodes([e], tok.pad_token_id, "cpu")
    ids, real, policy = batch.completion_ids[0], batch.completion_mask[0].bool(), batch.policy_mask[0].bool()
    # the loss sees exactly the policy's two turns, each with its end-of-turn token
    assert tok.decode(ids[policy]) == eng.turns[0] + "<eos>" + eng.turns[1] + "<eos>"
    # what is masked out is the template's glue and the tool's result
    assert tok.decode(ids[real & ~policy]) == f"\n<|tool|>{eng.turns[1]}<eos>\n<|assistant|>"
    # prompt + episode tokens == the whole conversation rendered by the chat template (token for token)
    full = tok.apply_chat_template(e.messages, tokenize=False)
    n = len(e.prompt) + int(real.sum())
    assert tok(full, add_special_tokens=False)["input_ids"][:n] == e.prompt + ids[real].tolist()
    assert full[len(tok.decode(e.prompt + ids[real].tolist())):] == "\n"  # only the last turn's glue is left


def test_malformed_and_unknown_calls_go_back_as_errors(tok, calc):
    def policy(prompt):
        n = prompt.count("<|tool|>") - 1  # tool messages since the worked example
        if n == 2:  # after two errors: the right call
            return oracle(prompt[:prompt.rfind("<|tool|>")].rsplit("<|tool|>", 1)[0])
        return ['<tool_call>{"name": "multiply", "arguments": {"a": </tool_call>',
                '<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 2}}</tool_call>'][n] if n < 2 else (
                    oracle(prompt))

    [e] = episodes(tok, policy, calc, calc.eval[:1], EpisodeLimits(max_turns=5, max_tokens=1024, max_tool_errors=2))
    tool_msgs = [m["content"] for m in e.messages if m["role"] == "tool"][1:]
    assert "not valid JSON" in tool_msgs[0] and "unknown tool 'divide'; available: add, multiply" in tool_msgs[1]
    assert (e.tool_errors, e.tool_calls, e.turns, e.parts["correct"]) == (2, 2, 4, 1.0) and e.done
    # one error more than max_tool_errors ends the episode (unsolved, not truncated)
    [e] = episodes(tok, policy, calc, calc.eval[:1], EpisodeLimits(max_turns=5, max_tokens=1024, max_tool_errors=1))
    assert e.done and not e.truncated and e.turns == 2 and e.parts["correct"] == 0.0


def test_over_long_episodes_are_truncated(tok, calc):
    [e] = episodes(tok, oracle, calc, calc.eval[:1], EpisodeLimits(max_turns=1, max_tokens=512))
    assert e.truncated and e.turns == 1 and e.parts["correct"] == 0.0  # out of turns while calling a tool
    [e] = episodes(tok, oracle, calc, calc.eval[:1], EpisodeLimits(max_turns=4, max_tokens=40))
    assert e.truncated and len(e.tokens) <= 40 and e.parts["correct"] == 0.0
    [e] = episodes(tok, oracle, calc, calc.eval[:1], finished=False)  # a turn that hit max_new_tokens
    assert e.truncated and e.turns == 1
    # a truncated turn is scored as it stands, like a truncated single-turn completion
    sevens = build_domain(DomainSpec(name="add", args={"lo": 1, "hi": 9}, eval_size=2), seed=0)
    [e] = episodes(tok, lambda p: "so 12", sevens, sevens.eval[:1], finished=False)
    assert e.truncated and e.env.answer == "so 12"


def test_templates_that_are_not_prefix_preserving_are_refused(tok, calc):
    last_two = build_tokenizer("{% for m in messages[-2:] %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ConfigError, match="not prefix-preserving"):
        episodes(last_two, oracle, calc, calc.eval[:1])
    # turns not closed by <eos>
    no_end_token = build_tokenizer("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ConfigError, match="does not end an assistant turn with '<eos>'"):
        episodes(no_end_token, oracle, calc, calc.eval[:1])


class Counter:
    """A TRL-style environment: public methods are tools, reset(**task), get_reward()."""

    def reset(self, **task):
        self.count, self.target = 0, task["target"]
        return f" Reach {self.target}."

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.count += by
        return self.count

    def get_reward(self) -> float:
        return float(self.count == self.target)


def test_trl_style_environment_plugs_in(tok):
    tasks = [{"prompt": "Count up.", "target": 5}, {"prompt": "Count up.", "target": 3}]
    dom = Domain("counter", tasks, tasks, rewards=[("reward", 1.0)], metric="reward",
                 environment=TRLEnvironment.factory(Counter), reward_parts=("reward",))

    def policy(prompt):
        if "<|tool|>" in prompt:
            return "done"
        target = int(re.findall(r"Reach (\d+)", prompt)[-1])
        return f'<tool_call>{{"name": "increment", "arguments": {{"by": {target}}}}}</tool_call>'

    eng = ScriptedEngine(tok, policy)
    eps = run_episodes(eng, tok, [(dom, t) for t in tasks], group_size=1, seeds=None, params=PARAMS, limits=LIMITS)
    assert [e.reward for e in eps] == [1.0, 1.0]
    assert '"name": "increment"' in tok.decode(eps[0].prompt)  # the schema reached the prompt
    assert "Count up. Reach 5." in tok.decode(eps[0].prompt)  # reset()'s text joined the user message


class AskTwice(Environment):
    """A simulated user that asks once more, then ends the episode."""

    reward_parts = ("answers",)

    def reply(self, text):
        self.answers = getattr(self, "answers", []) + [text]
        return "And again?" if len(self.answers) < 2 else None

    def reward(self):
        return {"answers": float(len(self.answers))}


def test_simulated_user_replies_continue_the_episode(tok):
    tasks = [{"prompt": "Say hi."}]
    dom = Domain("ask", tasks, tasks, rewards=[("answers", 1.0)], metric=None, environment=AskTwice,
                 reward_parts=("answers",))
    [e] = episodes(tok, lambda p: "hi", dom, tasks)
    assert e.reward == 2.0 and e.turns == 2 and e.done
    assert [m["role"] for m in e.messages[1:]] == ["assistant", "user", "assistant"]


def test_a_turns_user_replies_are_asked_for_together(tok):
    """Three episodes that each talk to the user twice: reply_many gets all three of a turn at once
    (a model-backed user answers them in one batch); the episodes go on as with reply()."""
    batches = []

    class Batched(AskTwice):
        @classmethod
        def reply_many(cls, envs, texts):
            batches.append(len(envs))
            return super().reply_many(envs, texts)

    tasks = [{"prompt": f"Say hi {i}."} for i in range(3)]
    dom = Domain("ask", tasks, tasks, rewards=[("answers", 1.0)], metric=None, environment=Batched,
                 reward_parts=("answers",))
    eps = episodes(tok, lambda p: "hi", dom, tasks)
    assert batches == [3, 3]
    assert all(e.reward == 2.0 and e.turns == 2 and e.done for e in eps)


def test_reward_names_must_be_parts_of_the_environment():
    with pytest.raises(ConfigError, match="reward parts are answers; unknown: correct"):
        Domain("ask", [{}], [{}], rewards=[("correct", 1.0)], metric=None, environment=AskTwice,
               reward_parts=("answers",))


def test_single_turn_rollouts_through_the_local_engine_match_the_sampler(tiny_model_dir):
    """The local engine is our sampler: the same seeds give the same completions as calling it directly."""
    from transformers import AutoModelForCausalLM

    from stagewise.generation.chat_template import eos_ids
    from stagewise.generation.sampling import sample
    from stagewise.models import load_tokenizer
    from tests.helpers import encode_prompts

    model, tk = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(str(tiny_model_dir))
    dom = build_domain(DomainSpec(name="add", args={"lo": 1, "hi": 9}, eval_size=2), seed=0)
    examples, seeds = [(dom, dom.train[0]), (dom, dom.train[1])], list(range(100, 108))
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=tuple(eos_ids(tk)))
    batch = generate_rollouts(LocalGenerator(model, tk, device="cpu"), tk, examples, num_generations=4, params=params,
                              limits=EpisodeLimits(max_tokens=6), seeds=seeds, device="cpu")
    ids, mask = encode_prompts(tk, [ex["prompt"] for _, ex in examples])
    comp, cmask, trunc = sample(model, ids, mask, max_new_tokens=6, eos_token_ids=eos_ids(tk),
                                pad_token_id=tk.pad_token_id, num_samples=4, seeds=seeds)
    assert torch.equal(batch.prompt_ids, ids.repeat_interleave(4, 0))
    assert torch.equal(batch.completion_ids[:, :comp.size(1)] * batch.completion_mask[:, :comp.size(1)], comp * cmask)
    assert torch.equal(batch.policy_mask, batch.completion_mask) and torch.equal(batch.truncated, trunc)


def test_engine_logprobs_follow_the_policy_tokens_and_are_zero_elsewhere(tok, calc):
    """An engine that reports log-probs (vLLM): each policy token keeps its own, the tool results
    and chat glue between turns get 0, and the batch carries them aligned with the completion."""

    class Reporting(ScriptedEngine):
        def generate(self, prompts, *, n, seeds, params):
            out = super().generate(prompts, n=n, seeds=seeds, params=params)
            out.logprobs = [[-(k + 1) / 10 for k in range(len(t))] for t in out.tokens]  # -0.1, -0.2, ...
            return out

    eps = run_episodes(Reporting(tok, oracle), tok, [(calc, calc.eval[0])], group_size=1, seeds=None,
                       params=PARAMS, limits=LIMITS)
    e = eps[0]
    assert e.turns == 2 and len(e.engine_logp) == len(e.tokens) == len(e.policy_mask)
    runs, k = [], 0  # the policy's turns, as (start, length)
    while k < len(e.policy_mask):
        if e.policy_mask[k]:
            start = k
            while k < len(e.policy_mask) and e.policy_mask[k]:
                k += 1
            runs.append((start, k - start))
        else:
            assert e.engine_logp[k] == 0.0
            k += 1
    assert len(runs) == 2
    for start, length in runs:
        assert e.engine_logp[start:start + length] == pytest.approx([-(j + 1) / 10 for j in range(length)])
    batch = batch_from_episodes(eps, tok.pad_token_id, "cpu")
    assert batch.engine_logp.shape == batch.completion_ids.shape
    assert batch.engine_logp[0, :len(e.tokens)].tolist() == pytest.approx(e.engine_logp)
    plain = episodes(tok, oracle, calc, calc.eval[:1])  # an engine without log-probs: none in the batch
    assert batch_from_episodes(plain, tok.pad_token_id, "cpu").engine_logp is None

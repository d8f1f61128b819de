"""A test plugin (loaded through `plugins: [tests.plugins]`): a dense reward a tiny random model
can learn from — the fraction of completion characters that are the digit 7."""

from stagewise.registry import register


@register("reward", "sevens")
def sevens(text: str, example: dict) -> float:
    return text.count("7") / max(len(text), 1)


# --- a multi-turn environment and rollout engine the tiny random model can run --------------------

from stagewise.config import DomainSpec  # noqa: E402
from stagewise.domains.base import Domain, split_items  # noqa: E402
from stagewise.envs.base import Environment  # noqa: E402
from stagewise.rl.engines import Generation, LocalEngine  # noqa: E402


class AsciiChat(Environment):
    """A simulated user asks twice for more; the reward is the share of ASCII characters in all the
    answers (dense enough for a random byte-level model to have signal in every group)."""

    reward_parts = ("ascii",)

    def reply(self, text):
        self.answers = getattr(self, "answers", []) + [text]
        return f"More {len(self.answers)}." if len(self.answers) < self.task["turns"] else None

    def reward(self):
        text = "".join(getattr(self, "answers", []))
        return {"ascii": sum(ch.isascii() for ch in text) / max(len(text), 1)}


@register("environment_domain", "ascii_chat")
@register("domain", "ascii_chat")
def ascii_chat(spec: DomainSpec, seed: int) -> Domain:
    train, held = split_items(list(range(1, 40)), spec.eval_size, spec.train_size, seed, spec.name)
    # args.turns: answers per episode (default 3); "varied": 1 to 3, by task
    turns = lambda i: 1 + i % 3 if spec.args.get("turns") == "varied" else spec.args.get("turns", 3)  # noqa: E731
    task = lambda i: {"prompt": f"Say seven {i} times.", "turns": turns(i)}  # noqa: E731
    return Domain(spec.name, [task(i) for i in train], [task(i) for i in held], rewards=[("ascii", 1.0)],
                  metric=None, environment=AsciiChat, reward_parts=AsciiChat.reward_parts)


class ShortTurns(LocalEngine):
    """Our sampler, but a turn that reaches max_new_tokens is closed with the stop token (as if the
    policy had ended it): a random tiny model then has real multi-turn episodes."""

    def generate(self, prompts, *, n, seeds, params):
        out = super().generate(prompts, n=n, seeds=seeds, params=params)
        stop = params.stop_token_ids[-1]
        return Generation([t if f else t[:-1] + [stop] for t, f in zip(out.tokens, out.finished)],
                          [True] * len(out.tokens))


register("rollout_engine", "short_turns")(ShortTurns)

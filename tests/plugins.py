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
from stagewise.generation.engines import Generation, LocalEngine, LocalGenerator  # noqa: E402


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


@register("domain", "ascii_chat")
def ascii_chat(spec: DomainSpec, seed: int) -> Domain:
    train, held = split_items(list(range(1, 40)), spec.eval_size, spec.train_size, seed, spec.name)
    # args.turns: answers per episode (default 3); "varied": 1 to 3, by task
    turns = lambda i: 1 + i % 3 if spec.args.get("turns") == "varied" else spec.args.get("turns", 3)  # noqa: E731
    task = lambda i: {"prompt": f"Say seven {i} times.", "turns": turns(i)}  # noqa: E731
    return Domain(spec.name, [task(i) for i in train], [task(i) for i in held], rewards=[("ascii", 1.0)],
                  metric=None, environment=AsciiChat, reward_parts=AsciiChat.reward_parts)


@register("domain", "say_seven")
def say_seven(spec: DomainSpec, seed: int) -> Domain:
    """Single-turn prompts whose accuracy is an answer of 7s only (greedy): what a tiny random model
    reaches once the sevens reward has been learnt."""
    train, held = split_items(list(range(1, 40)), spec.eval_size, spec.train_size, seed, spec.name)
    task = lambda i: {"prompt": f"Say seven {i} times."}  # noqa: E731
    return Domain(spec.name, [task(i) for i in train], [task(i) for i in held], rewards=[("sevens", 1.0)],
                  metric="sevens")


class ShortTurnsGenerator(LocalGenerator):
    """Our sampler, but a turn that reaches max_new_tokens is closed with the stop token (as if the
    policy had ended it): a random tiny model then has real multi-turn episodes."""

    def generate(self, prompts, *, n, seeds, params):
        out = super().generate(prompts, n=n, seeds=seeds, params=params)
        stop = params.stop_token_ids[-1]
        return Generation([t if f else t[:-1] + [stop] for t, f in zip(out.tokens, out.finished)],
                          [True] * len(out.tokens))


class ShortTurns(LocalEngine):
    generator_class = ShortTurnsGenerator


register("rollout_engine", "short_turns")(ShortTurns)


# --- a third stage kind, written on the stage scaffold alone ------------------------------------

import os  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402

from stagewise.models import load_model  # noqa: E402
from stagewise.rl.logprobs import PolicyLogprobs  # noqa: E402
from stagewise.training.run import StageRun  # noqa: E402
from stagewise.training.stage import StageKind  # noqa: E402
from stagewise.training.step_stats import reduce_step_stats  # noqa: E402

PROBE_ROWS, PROBE_LEN = 4, 8


def probe_rows(seed: int, step: int, vocab: int) -> list[list[int]]:
    """The token rows step ``step`` of a probe stage scores: a pure function of (seed, step)."""
    rng = random.Random(f"probe:{seed}:{step}")
    return [[rng.randrange(vocab - 2) for _ in range(PROBE_LEN)] for _ in range(PROBE_ROWS)]


def logprob_sum(lm, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token log-probs, number of tokens scored) of the rows under the model."""
    if not rows:
        return torch.zeros((), device=device), torch.zeros((), device=device)
    ids = torch.tensor(rows, device=device)
    with torch.no_grad():
        logp = lm(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return picked.sum(), torch.tensor(float(picked.numel()), device=device)


def train_probe_stage(job):
    """A stage kind that only measures: each step scores its rows (each rank its share) with the
    stage's weights. It writes no scaffolding of its own, yet checkpoints, resumes and stops as the
    others do."""
    run = StageRun(job, lambda: PolicyLogprobs(load_model(job.init_path, job.cfg.model)), micro_batch=1, accumulation=1,
                   total_steps=job.cfg.stage_steps(job.index))
    lm = run.strategy.lm
    while not run.finished:
        step = run.begin_step()
        rows = probe_rows(job.cfg.seed, step, lm.config.vocab_size)[run.rank::run.world]
        total, count = logprob_sum(lm, rows, run.device)
        sums, _ = reduce_step_stats(run.device, sums={"logp": total, "tokens": count}, rows={})
        probe = sums["logp"] / sums["tokens"]
        # how the strategy wrapped the model (DDP: gradients in its buckets, no second copy)
        bucket_view = float(getattr(run.strategy.model, "gradient_as_bucket_view", -1))
        if run.end_step({"probe": probe, "ddp_bucket_view": bucket_view}, samples=PROBE_ROWS, curve=probe,
                        progress={"probe": probe}):
            return run.stopped()
    return run.finish(job.tokenizer)


register("stage", "probe")(StageKind(train=train_probe_stage, check=lambda cfg, i, world: None, needs_reward=False))


def count_gathers_per_rollout(directory: str) -> None:
    """With STAGEWISE_TEST_COUNT_GATHERS=DIR (tests/parallel/test_multiprocess.py): every rank
    appends, per ``generator()`` block of a training strategy's local engine, the all-gathers it
    ran inside the block to DIR/rank-R.jsonl (a recording stub around torch.distributed)."""
    import json
    import os
    from contextlib import contextmanager

    import torch.distributed as td

    calls = {"n": 0}
    names = ("all_gather_into_tensor", "all_gather", "_all_gather_base", "all_gather_coalesced", "all_gather_single")
    for name in names:
        real = getattr(td, name, None)
        if real is None:
            continue

        def counted(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        setattr(td, name, counted)
    block = LocalEngine.generator

    @contextmanager
    def generator(self):
        before = calls["n"]
        with block(self) as gen:
            yield gen
        if type(self.weights).__name__ == "TrainStrategy":
            with open(os.path.join(directory, f"rank-{os.environ.get('RANK', '0')}.jsonl"), "a") as fh:
                fh.write(json.dumps({"gathers": calls["n"] - before}) + "\n")

    LocalEngine.generator = generator


if os.environ.get("STAGEWISE_TEST_COUNT_GATHERS"):
    count_gathers_per_rollout(os.environ["STAGEWISE_TEST_COUNT_GATHERS"])

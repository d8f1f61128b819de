"""Episodes: the policy and an environment taking turns, kept as one token sequence.

    episodes = run_episodes(generator, tok, [(domain, task), ...], group_size=8, seeds=[...], params=..., limits=...)
    episodes[i].tokens / .policy_mask      # everything after the prompt / 1 where the policy sampled the token

Token-in / token-out: the policy's turns are the sampled ids themselves; what the environment
adds (tool results, user replies, and the template's glue around them) is rendered with the
model's chat template and tokenised on its own, then appended, masked out of the loss. The
template must be prefix-preserving (rendering more turns only appends text); each append checks
that and stops with a clear error where it is not, since the masks would otherwise be wrong.

Single-turn domains are episodes too (``TextTask``: no tools, one turn), so one loop serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stagewise.envs.base import Environment
from stagewise.envs.tools import parse_tool_calls
from stagewise.errors import ConfigError
from stagewise.generation.chat_template import ChatRenderer
from stagewise.generation.engines import SamplingParams
from stagewise.reward_functions import RewardBatch, RewardContext
from stagewise.seeds import turn_seed


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 1  # policy turns per episode
    max_tokens: int = 10**9  # tokens after the prompt (policy + environment)
    max_tool_errors: int = 2  # malformed calls, unknown tools, failing tools: more than this ends the episode


@dataclass
class Episode:
    domain: object
    task: dict
    env: Environment
    prompt: list[int]
    messages: list[dict]  # the conversation as text (for rendering appended turns and for reports)
    schemas: list = field(default_factory=list)  # the tools' JSON schemas ([]: a single-turn task)
    opening: list = field(default_factory=list)  # the messages before the policy's first turn
    tokens: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)  # 1 where the policy sampled the token
    engine_logp: list[float] | None = None  # per token: the engine's log-prob of policy tokens, 0 elsewhere
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    done: bool = False  # ended by the policy's answer, the user, or too many tool errors
    truncated: bool = False  # ran out of turns or tokens, or a turn hit max_new_tokens
    parts: dict = field(default_factory=dict)
    reward: float = 0.0
    extra: dict = field(default_factory=dict)  # columns a reward function logged for it (log_extra)

    @property
    def ended(self) -> bool:
        return self.done or self.truncated

    def transcript(self) -> str:
        """The episode after the prompt, readable: the final answer alone for a single-turn task."""
        later = self.messages[len(self.opening):]
        if len(later) == 1 and later[0]["role"] == "assistant":
            return later[0]["content"]
        return "\n".join(f"[{m['role']}] {m['content']}" for m in later)


def check_fits(domain: str, task: dict, prompt: int, n_tools: int, context: int, more: int, setting: str) -> None:
    """A prompt and what an episode may add after it (one completion for a single-turn task, the
    episode's token budget for a multi-turn one) must fit the model's context: refused, never cut."""
    if prompt + more > context:
        which = f"task {task['id']}" if "id" in task else "a task"
        raise ConfigError(f"domains.{domain}: the prompt of {which} is {prompt} tokens (with {n_tools} tool schemas) "
                          f"and an episode may add {more} more ({setting}), but the model's context is {context} "
                          f"tokens; use a model with a longer context or lower {setting} (prompts are never cut)")


def start_episodes(renderer: ChatRenderer, examples: list[tuple[object, dict]], group_size: int,
                   context: int | None = None, room: int = 0, max_new: int = 0) -> list[Episode]:
    """G episodes per (domain, task), each with its own environment; the opening is rendered once per task.
    context: the model's length limit; a prompt that leaves less than ``room`` tokens (multi-turn)
    or ``max_new`` (single-turn) is refused."""
    episodes = []
    for dom, task in examples:
        first = None
        for _ in range(group_size):
            env = dom.make_env(task)
            if first is None:
                schemas = env.tool_schemas()
                opening = renderer.with_tool_prompt(env.opening(), schemas)
                ids = renderer.opening_ids(opening, schemas)
                if context is not None:
                    check_fits(dom.name, task, len(ids), len(schemas), context, room if schemas else max_new,
                               "rollout.max_episode_tokens" if schemas else "max_new_tokens")
                first = (schemas, opening, ids)
            schemas, opening, ids = first
            episodes.append(Episode(dom, task, env, ids, list(opening), schemas, list(opening)))
    return episodes


def run_episodes(generator, tokenizer, examples: list[tuple[object, dict]], *, group_size: int,
                 seeds: list[int] | None, params: SamplingParams, limits: EpisodeLimits,
                 context: RewardContext | None = None, metric_only: bool = False) -> list[Episode]:
    """Run G episodes per example to the end with a rollout engine's generator and score them.
    seeds: one per episode (None if greedy); context: what the reward functions get besides the
    batch (a stage's trainer state and metric log); metric_only: held-out accuracy, only the metric.

    Under lockstep (the generator's ``all_done`` hook: ZeRO-3 / FSDP) every rank runs the same number
    of turns: a rank whose episodes have all ended still joins each turn's generation with an empty batch.
    """
    all_done = getattr(generator, "all_done", None)
    renderer = ChatRenderer(tokenizer)
    episodes = start_episodes(renderer, examples, group_size, getattr(generator, "context", None),
                         room=limits.max_tokens, max_new=min(limits.max_tokens, params.max_new_tokens))
    for turn in range(limits.max_turns):
        active = [i for i, e in enumerate(episodes) if not e.ended]
        if (all_done(not active) if all_done is not None else not active):
            break
        if turn == 0:  # a group shares its prompt: prefilled once, its cache repeated G times
            prompts, n = [episodes[i].prompt for i in active[::group_size]], group_size
        else:
            prompts, n = [episodes[i].prompt + episodes[i].tokens for i in active], 1
        turn_seeds = None if params.greedy else [turn_seed(seeds[i], turn) for i in active]
        gen = generator.generate(prompts, n=n, seeds=turn_seeds, params=params)
        logps = gen.logprobs or [None] * len(active)
        take_turns([(episodes[i], toks, finished, lp)
                    for i, toks, finished, lp in zip(active, gen.tokens, gen.finished, logps)],
                   tokenizer, renderer, limits)
    for e in episodes:
        if not e.ended:  # out of turns while the policy was still calling tools
            e.truncated = True
    score_episodes(episodes, context, metric_only=metric_only)
    return episodes


def score_episodes(episodes: list[Episode], context: RewardContext | None = None, *,
                   metric_only: bool = False) -> None:
    """Set each episode's parts and reward: a domain's episodes in one batch, as TRL calls its reward
    functions (prompts as the records give them, completions as text, or as messages where the
    prompt is messages or the domain is an environment)."""
    by_domain: dict[int, list[Episode]] = {}
    for e in episodes:
        by_domain.setdefault(id(e.domain), []).append(e)
    for group in by_domain.values():
        dom = group[0].domain
        if dom.environment is None:  # single-turn: the answer, and the prompt as the record has it
            prompts = [e.task["prompt"] for e in group]
            texts = [e.env.answer or "" for e in group]
            completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                           for p, t in zip(prompts, texts)]
        else:
            prompts = [e.opening for e in group]
            completions = [e.messages[len(e.opening):] for e in group]
        batch = RewardBatch(prompts, completions, [list(e.tokens) for e in group], [e.task for e in group],
                            environments=[e.env for e in group] if dom.environment is not None else None)
        parts, rewards = dom.score_batch(batch, context, metric_only=metric_only)
        for e, p, r, x in zip(group, parts, rewards.tolist(), batch.extra):
            e.parts, e.reward, e.extra = p, r, x


def take_turns(turns: list[tuple[Episode, list[int], bool, list[float] | None]], tokenizer,
               renderer: ChatRenderer, limits: EpisodeLimits) -> None:
    """Every active episode's turn: (episode, sampled ids, hit a stop token, engine log-probs or None).
    Tool calls run episode by episode; the turns that go to a (simulated) user are answered together,
    one ``reply_many`` per environment class, so a model-backed user answers them in one batch."""
    acted, to_user = [], []
    for e, toks, finished, lp in turns:
        turn = begin_turn(e, toks, finished, tokenizer, limits, lp)
        if turn is None:
            continue
        if turn.tool_messages is None:
            to_user.append((e, toks, turn.text))
        else:
            acted.append((e, toks, (turn.text, turn.tool_messages)))
    by_class: dict[type, list] = {}
    for item in to_user:
        by_class.setdefault(type(item[0].env), []).append(item)
    for cls, items in by_class.items():
        replies = cls.reply_many([e.env for e, _, _ in items], [text for _, _, text in items])
        for (e, toks, text), reply in zip(items, replies):
            if reply is None:
                e.messages.append({"role": "assistant", "content": text})
                e.done = True
            else:
                acted.append((e, toks, (text, [{"role": "user", "content": reply}])))
    for e, toks, (text, new) in acted:
        end_turn(e, toks, text, new, tokenizer, renderer, limits)


@dataclass(frozen=True)
class PolicyTurn:
    """A policy turn the episode goes on from."""

    text: str  # the turn, decoded
    tool_messages: list[dict] | None  # the results of its tool calls; None: the turn is for the user to answer


def begin_turn(e: Episode, toks: list[int], finished: bool, tokenizer, limits: EpisodeLimits,
               logprobs: list[float] | None = None) -> PolicyTurn | None:
    """Append the policy's turn and act on its tool calls. -> None when the episode ended here."""
    room = limits.max_tokens - len(e.tokens)
    if logprobs is not None:
        e.engine_logp = (e.engine_logp if e.engine_logp is not None else [0.0] * len(e.tokens)) + list(logprobs[:room])
    e.turns += 1
    e.tokens += toks[:room]
    e.policy_mask += [1] * len(toks[:room])
    text = tokenizer.decode(toks, skip_special_tokens=True)
    if not finished or len(toks) > room:  # the turn hit max_new_tokens or the episode's token budget
        e.messages.append({"role": "assistant", "content": text})
        e.env.answer = text  # scored as it stands, as a truncated single-turn completion is
        e.truncated = True
        return None
    calls, error = parse_tool_calls(text) if e.schemas else ([], None)
    if not (calls or error):
        return PolicyTurn(text, None)
    results = []
    if error:
        results.append(error)
        e.tool_errors += 1
    for call in calls:
        out, failed = e.env.run_tool(call)
        e.env.tool_calls.append({**call, "ok": not failed, "result": out})
        e.tool_calls += 1
        e.tool_errors += int(failed)
        results.append(out)
    new = [{"role": "tool", "content": r} for r in results]
    if e.tool_errors > limits.max_tool_errors or e.env.finished:
        e.messages += [{"role": "assistant", "content": text}] + new
        e.done = True
        return None
    return PolicyTurn(text, new)


def end_turn(e: Episode, toks: list[int], text: str, new: list[dict], tokenizer, renderer: ChatRenderer,
             limits: EpisodeLimits) -> None:
    """Append what answers the policy's turn (tool results or the user's reply), template glue included."""
    stop = tokenizer.convert_ids_to_tokens(toks[-1])
    ids = renderer.continuation_ids(e.messages, text, stop, new, e.schemas)
    e.messages += [{"role": "assistant", "content": text}] + new
    if len(e.tokens) + len(ids) >= limits.max_tokens:  # no room left for another policy turn
        e.truncated = True
        return
    e.tokens += ids
    e.policy_mask += [0] * len(ids)
    if e.engine_logp is not None:
        e.engine_logp += [0.0] * len(ids)

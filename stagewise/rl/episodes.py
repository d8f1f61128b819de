"""Episodes: the policy and an environment taking turns, kept as one token sequence.

    episodes = run_episodes(engine, tok, [(domain, task), ...], group_size=8, seeds=[...], params=..., limits=...)
    episodes[i].tokens / .policy      # everything after the prompt / 1 where the policy sampled the token

Token-in / token-out: the policy's turns are the sampled ids themselves; what the environment
adds (tool results, user replies, and the template's glue around them) is rendered with the
model's chat template and tokenised on its own, then appended, masked out of the loss. The
template must be prefix-preserving (rendering more turns only appends text); each append checks
that and stops with a clear error where it is not, since the masks would otherwise be wrong.

Single-turn domains are episodes too (``TextTask``: no tools, one turn), so one loop serves both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from stagewise.envs.base import Environment
from stagewise.envs.tools import parse_tool_calls
from stagewise.errors import ConfigError
from stagewise.rl.engines import SamplingParams
from stagewise.rl.prompts import render

GOLDEN = 0x9E3779B97F4A7C15


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
    policy: list[int] = field(default_factory=list)
    engine_logp: list[float] | None = None  # per token: the engine's log-prob of policy tokens, 0 elsewhere
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    done: bool = False  # ended by the policy's answer, the user, or too many tool errors
    truncated: bool = False  # ran out of turns or tokens, or a turn hit max_new_tokens
    parts: dict = field(default_factory=dict)
    reward: float = 0.0

    @property
    def ended(self) -> bool:
        return self.done or self.truncated

    def transcript(self) -> str:
        """The episode after the prompt, readable: the final answer alone for a single-turn task."""
        later = self.messages[len(self.opening):]
        if len(later) == 1 and later[0]["role"] == "assistant":
            return later[0]["content"]
        return "\n".join(f"[{m['role']}] {m['content']}" for m in later)


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of an episode's turn: turn 0 uses the episode's own seed (as single-turn GRPO)."""
    return (seed + turn * GOLDEN) % (2**61)


class ChatRenderer:
    """Renders conversations with the model's chat template and cuts out appended turns as tokens."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._tools_native: bool | None = None

    def _render(self, messages, schemas, add_generation_prompt: bool) -> str:
        kw = {"tools": schemas} if schemas and self.tools_native(schemas) else {}
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)

    def tools_native(self, schemas) -> bool:
        """Whether the chat template renders ``tools=`` itself (Qwen, Llama 3.1, ...); SmolLM2's ignores it."""
        if self._tools_native is None:
            probe = [{"role": "user", "content": "hi"}]
            plain = self.tok.apply_chat_template(probe, tokenize=False)
            self._tools_native = self.tok.apply_chat_template(probe, tokenize=False, tools=schemas) != plain
        return self._tools_native

    def with_tool_prompt(self, messages: list[dict], schemas: list[dict]) -> list[dict]:
        """For a template that ignores ``tools=``: describe the tools and the Hermes call format in the
        system message (merged into the environment's own, if it has one)."""
        if not schemas or self.tools_native(schemas):
            return messages
        lines = "\n".join(json.dumps(s["function"]) for s in schemas)
        text = (f"You can call these tools:\n<tools>\n{lines}\n</tools>\nTo call one, reply with only "
                f'<tool_call>{{"name": <tool name>, "arguments": {{...}}}}</tool_call>')
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}] + messages[1:]
        return [{"role": "system", "content": text}] + messages

    def opening_ids(self, messages: list[dict], schemas: list[dict]) -> list[int]:
        text = self._render(messages, schemas, True) if schemas else render(self.tok, messages)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def continuation_ids(self, history: list[dict], answer: str, stop_token: str, new: list[dict],
                         schemas: list[dict]) -> list[int]:
        """Token ids that follow the policy's turn (which ended with ``stop_token``) when the ``new``
        messages are appended, up to and including the next generation prompt."""
        if not getattr(self.tok, "chat_template", None):
            raise ConfigError("multi-turn episodes need a tokenizer with a chat template")
        cue = self._render(history, schemas, True)
        done = self._render(history + [{"role": "assistant", "content": answer}], schemas, False)
        nxt = self._render(history + [{"role": "assistant", "content": answer}] + new, schemas, True)
        if not done.startswith(cue):
            raise ConfigError("the chat template renders an assistant turn differently from its generation prompt "
                              "(not prefix-preserving); multi-turn token masks would be wrong. Use a template "
                              "whose rendering only appends, e.g. one without a reasoning-stripping rule")
        if not nxt.startswith(done):
            raise ConfigError("the chat template re-renders earlier turns once later ones follow (not "
                              "prefix-preserving), so a multi-turn episode cannot be extended token by token")
        end = done.rfind(stop_token)
        if end < len(cue):
            raise ConfigError(f"the chat template does not end an assistant turn with {stop_token!r}, the token "
                              f"the policy stopped at")
        return self.tok(done[end + len(stop_token):] + nxt[len(done):], add_special_tokens=False)["input_ids"]


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
    eps = []
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
            eps.append(Episode(dom, task, env, ids, list(opening), schemas, list(opening)))
    return eps


def run_episodes(engine, tokenizer, examples: list[tuple[object, dict]], *, group_size: int,
                 seeds: list[int] | None, params: SamplingParams, limits: EpisodeLimits,
                 all_done=None) -> list[Episode]:
    """Run G episodes per example to the end and score them. seeds: one per episode (None if greedy).

    all_done: the ZeRO-3 / FSDP agreement hook; then every rank runs the same number of turns (a rank
    whose episodes have all ended still joins each turn's generation with an empty batch).
    """
    renderer = ChatRenderer(tokenizer)
    eps = start_episodes(renderer, examples, group_size, getattr(engine, "context", None),
                         room=limits.max_tokens, max_new=min(limits.max_tokens, params.max_new_tokens))
    for turn in range(limits.max_turns):
        active = [i for i, e in enumerate(eps) if not e.ended]
        if (all_done(not active) if all_done is not None else not active):
            break
        if turn == 0:  # a group shares its prompt: prefilled once, its cache repeated G times
            prompts, n = [eps[i].prompt for i in active[::group_size]], group_size
        else:
            prompts, n = [eps[i].prompt + eps[i].tokens for i in active], 1
        turn_seeds = None if params.greedy else [turn_seed(seeds[i], turn) for i in active]
        gen = engine.generate(prompts, n=n, seeds=turn_seeds, params=params)
        logps = gen.logprobs or [None] * len(active)
        take_turns([(eps[i], toks, finished, lp) for i, toks, finished, lp in zip(active, gen.tokens, gen.finished, logps)],
                   tokenizer, renderer, limits)
    for e in eps:
        if not e.ended:  # out of turns while the policy was still calling tools
            e.truncated = True
        e.parts = {k: float(v) for k, v in e.env.reward().items()}
        e.reward = e.domain.weigh(e.parts)
    return eps


def take_turns(turns: list[tuple[Episode, list[int], bool, list[float] | None]], tokenizer,
               renderer: ChatRenderer, limits: EpisodeLimits) -> None:
    """Every active episode's turn: (episode, sampled ids, hit a stop token, engine log-probs or None).
    Tool calls run episode by episode; the turns that go to a (simulated) user are answered together,
    one ``reply_many`` per environment class, so a model-backed user answers them in one batch."""
    acted, to_user = [], []
    for e, toks, finished, lp in turns:
        step = begin_turn(e, toks, finished, tokenizer, limits, lp)
        if step is None:
            continue
        kind, payload = step
        (to_user if kind == "user" else acted).append((e, toks, payload))
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


def begin_turn(e: Episode, toks: list[int], finished: bool, tokenizer, limits: EpisodeLimits,
               logprobs: list[float] | None = None):
    """Append the policy's turn and act on its tool calls. -> None (the episode ended), ("tools",
    (text, tool messages)) or ("user", text): the turn is for the user to answer."""
    room = limits.max_tokens - len(e.tokens)
    if logprobs is not None:
        e.engine_logp = (e.engine_logp if e.engine_logp is not None else [0.0] * len(e.tokens)) + list(logprobs[:room])
    e.turns += 1
    e.tokens += toks[:room]
    e.policy += [1] * len(toks[:room])
    text = tokenizer.decode(toks, skip_special_tokens=True)
    if not finished or len(toks) > room:  # the turn hit max_new_tokens or the episode's token budget
        e.messages.append({"role": "assistant", "content": text})
        e.env.answer = text  # scored as it stands, as a truncated single-turn completion is
        e.truncated = True
        return None
    calls, error = parse_tool_calls(text) if e.schemas else ([], None)
    if not (calls or error):
        return "user", text
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
    return "tools", (text, new)


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
    e.policy += [0] * len(ids)
    if e.engine_logp is not None:
        e.engine_logp += [0.0] * len(ids)

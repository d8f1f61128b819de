"""Demonstrations: successful episodes of a domain, written as chat SFT records.

    stagewise demos configs/tau2_cpu.yaml --domain airline --split train --agent oracle --out airline.jsonl

An agent plays the domain's episodes through the same episode code as GRPO's rollouts
(``rl/episodes.py``: the domain's environment, its simulated customer, its evaluator); the
episodes whose metric passes (or whose reward reaches ``--min-reward``) are written, one JSON
record per line::

    {"messages": [...], "tools": [...], "context_turns": 3, "domain": "airline", "task_id": "...",
     "reward": 1.3, "parts": {...}, "agent": "oracle"}

``messages`` is the whole conversation as the policy saw it (the system prompt with its tool
description, tool results and customer turns), ``context_turns`` how many of them came before
the policy's first turn. A ``chat`` domain reads such a file, and SFT renders it back into exactly
the tokens of the episode (``sft/data.tokenize_episode``), the loss on the policy's own turns only;
the writer checks that for every record and reports any that differ.

Agents:
    oracle     the domain's scripted solution (tau2: the task's expected actions as tool calls;
               single-turn domains: the reference answer). With ``--corrections`` each task is also
               played with one wrong call before a right one (``with_mistake``): the tool's error,
               then the correction, the wrong turn written with ``"weight": 0`` (context, not
               learnt). The oracle never errs, so without them nothing shows recovering from an error.
    model      a local model (``--model PATH``: a directory, hub id in the cache, .gguf or
               ``bundled:...``; default the config's model), greedy or sampled (``--trials``)
    endpoint   an OpenAI-compatible completions server (``--url``, ``--model`` its model name) that
               serves a model with the same tokenizer as the config's model (a larger one of its
               family): prompts are sent as token ids, so the demonstrations are token for token
               what the student would have to write
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from stagewise.config import RunConfig
from stagewise.domains.base import Domain
from stagewise.envs.tools import parse_tool_calls
from stagewise.errors import ConfigError, TrainingError
from stagewise.generation.chat_template import turn_end_id
from stagewise.generation.engines import Generation, SamplingParams
from stagewise.models import load_model, load_model_config, load_tokenizer, resolve_model_path
from stagewise.parallel.runtime import frozen_dtype
from stagewise.rl.episodes import Episode, EpisodeLimits, run_episodes
from stagewise.seeds import completion_seeds
from stagewise.sft.data import tokenize_episode

AGENTS = ("oracle", "model", "endpoint")


# --- agents: rollout generators -------------------------------------------------------------------


class ScriptedAgent:
    """Writes given turns in order, one episode at a time (the oracle)."""

    def __init__(self, tokenizer, turns: list[str], context: int | None):
        self.tok, self.turns, self.context, self.k = tokenizer, turns, context, 0
        self.stop = turn_end_id(tokenizer)

    def generate(self, prompts, *, n, seeds, params: SamplingParams) -> Generation:
        if len(prompts) * n != 1:
            raise ValueError("a scripted agent plays one episode at a time")
        text = self.turns[min(self.k, len(self.turns) - 1)]
        self.k += 1
        return Generation([self.tok(text, add_special_tokens=False)["input_ids"] + [self.stop]], [True])


class EndpointAgent:
    """POST {url}/completions with the prompt as token ids (vLLM, SGLang and llama.cpp servers take
    them); the returned text, tokenised, plus the template's end of turn when the server stopped."""

    def __init__(self, url: str, model: str, tokenizer, context: int | None, *, timeout_s: float = 300.0,
                 retries: int = 3, workers: int = 8, api_key: str | None = None):
        self.url, self.model, self.tok, self.context = url.rstrip("/"), model, tokenizer, context
        self.timeout_s, self.retries, self.workers = timeout_s, retries, workers
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.stop = turn_end_id(tokenizer)

    def _one(self, prompt: list[int], seed: int | None, params: SamplingParams) -> tuple[list[int], bool]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p, "n": 1}
        if seed is not None:
            body["seed"] = seed
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"}
                                                          if self.api_key else {})}
        req = urllib.request.Request(f"{self.url}/completions", data=json.dumps(body).encode(), headers=headers)
        last = None
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    choice = json.loads(r.read())["choices"][0]
                ids = self.tok(choice.get("text") or "", add_special_tokens=False)["input_ids"]
                finished = choice.get("finish_reason") == "stop"
                return (ids + [self.stop] if finished else ids), finished
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as e:
                last = e
                time.sleep(min(2**attempt, 10))
        raise TrainingError(f"demos endpoint {self.url}: no answer after {self.retries} tries ({last})")

    def generate(self, prompts, *, n, seeds, params: SamplingParams) -> Generation:
        jobs = [(p, None if seeds is None else seeds[i * n + j]) for i, p in enumerate(prompts) for j in range(n)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            out = list(pool.map(lambda job: self._one(job[0], job[1], params), jobs))
        return Generation([ids for ids, _ in out], [done for _, done in out])


# --- writing --------------------------------------------------------------------------------------


@dataclass
class DemoStats:
    episodes: int
    kept: int
    mean_reward: float
    token_mismatches: int  # kept records whose SFT rendering differs from the episode's tokens
    seconds: float


def episode_record(e: Episode, agent: str, unlearnt: int | None = None) -> dict:
    """A finished episode as a chat SFT record (see the module docstring); ``unlearnt``: the index
    of a policy turn written with weight 0 (a wrong call, shown, not taught)."""
    # up to the policy's last turn: what came after it (the done tool's result) is not trained on
    last = max(i for i, m in enumerate(e.messages) if m["role"] == "assistant")
    messages = [dict(m) for m in e.messages[:last + 1]]
    if unlearnt is not None:
        turns = [m for m in messages[len(e.opening):] if m["role"] == "assistant"]
        turns[unlearnt]["weight"] = 0
    return {"messages": messages, "tools": e.schemas, "context_turns": len(e.opening),
            "domain": e.domain.name, "task_id": e.task.get("id"), "reward": e.reward, "parts": e.parts, "agent": agent}


def with_mistake(turns: list[str]) -> tuple[list[str], int] | None:
    """The oracle's turns with one wrong call before a right one, and the wrong turn's index; None
    when no call can be made wrong this way. The mistake is the one the warm-up's agent made most
    (README): a string argument given the value another argument had in an earlier call (the user id
    where a reservation id goes). The right call follows it unchanged."""
    seen: list[tuple[str, str]] = []  # (argument, value) of the earlier calls' string arguments
    for k, text in enumerate(turns):
        calls, error = parse_tool_calls(text)
        if error or len(calls) != 1:
            continue
        name, args = calls[0]["name"], calls[0]["arguments"]
        for key, value in args.items():
            other = next((v for a, v in seen if a != key and v != value), None) if isinstance(value, str) else None
            if other is not None:
                wrong = f'<tool_call>{json.dumps({"name": name, "arguments": {**args, key: other}})}</tool_call>'
                return turns[:k] + [wrong] + turns[k:], k
        seen += [(a, v) for a, v in args.items() if isinstance(v, str)]
    return None


def corrected(e: Episode, wrong: int) -> bool:
    """The episode shows a correction: the wrong turn's call came back as a tool error, and a turn
    followed (not an episode cut off by its limits before or right after the mistake)."""
    turns = [i for i, m in enumerate(e.messages) if i >= len(e.opening) and m["role"] == "assistant"]
    if wrong + 1 >= len(turns):
        return False
    after = e.messages[turns[wrong] + 1]
    return after["role"] == "tool" and after["content"].lower().startswith("error")


def kept(e: Episode, min_reward: float | None) -> bool:
    """The episode is a demonstration: its metric passed (default), or its reward reached ``min_reward``."""
    if min_reward is not None:
        return e.reward >= min_reward
    return e.domain.succeeded(e.parts)


def find_domain(domains: list[Domain], name: str) -> Domain:
    for d in domains:
        if d.name == name:
            return d
    raise ConfigError(f"--domain {name}: the config has no such domain (has {', '.join(d.name for d in domains)})")


def write_demos(cfg: RunConfig, domains: list[Domain], *, domain: str, split: str, agent: str, out: Path,
                model: str | None = None, url: str | None = None, trials: int = 1, temperature: float = 1.0,
                min_reward: float | None = None, limit: int | None = None, batch: int = 8,
                corrections: bool = False, log=print) -> DemoStats:
    """Play every task of ``domain``'s ``split`` with ``agent`` and write the passing episodes to
    ``out`` (JSONL, replaced only once complete); ``corrections`` (oracle): each task also with one
    wrong call and its correction. -> counts."""
    if corrections and agent != "oracle":
        raise ConfigError("--corrections: only the oracle agent plays a scripted mistake; drop it for --agent "
                          f"{agent}")
    dom = find_domain(domains, domain)
    if min_reward is None and dom.metric is None:
        raise ConfigError(f"--domain {domain}: it has no accuracy metric; give --min-reward to say what is kept")
    tasks = {"train": dom.train, "eval": dom.eval}[split][:limit]
    student = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(student, cfg.model.trust_remote_code)
    context = getattr(load_model_config(student, cfg.model.trust_remote_code), "max_position_embeddings", None)
    r = cfg.rollout
    limits = EpisodeLimits(max_turns=r.max_turns, max_tokens=r.max_episode_tokens, max_tool_errors=r.max_tool_errors)
    greedy = trials == 1
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=temperature, top_p=r.top_p, top_k=r.top_k,
                            greedy=greedy, stop_token_ids=(turn_end_id(tok),))
    t0, episodes, written, mismatches = time.time(), [], [], 0
    unlearnt: dict[int, int] = {}  # id(episode) -> its wrong turn's index

    def play(generator, examples, group: int, offset: int) -> list[Episode]:
        seeds = None if greedy else completion_seeds(cfg.seed, 0, 0, offset, len(examples) * group)
        return run_episodes(generator, tok, examples, group_size=group, seeds=seeds, params=params, limits=limits)

    if agent == "oracle":
        for i, task in enumerate(tasks):
            turns = dom.oracle_turns(task)
            if turns is None:
                raise ConfigError(f"--agent oracle: domain {domain} has no scripted solution (tau2 domains and "
                                  f"domains with reference answers have one); use --agent model or endpoint")
            episodes += play(ScriptedAgent(tok, turns, context), [(dom, task)], 1, i)
            mistake = with_mistake(turns) if corrections else None
            if mistake is not None:
                (e,) = play(ScriptedAgent(tok, mistake[0], context), [(dom, task)], 1, i)
                if corrected(e, mistake[1]):  # a wrong call the tool accepted shows no correction
                    unlearnt[id(e)] = mistake[1]
                    episodes.append(e)
            _progress(log, len(episodes), len(tasks) * (1 + corrections), t0)
    else:
        if agent == "endpoint":
            if not url:
                raise ConfigError("--agent endpoint needs --url (an OpenAI-compatible server, e.g. http://host:8000/v1)")
            generator = EndpointAgent(url, model or "default", tok, context)
        else:
            from stagewise.generation.engines import LocalGenerator

            path = resolve_model_path(model) if model else student
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            lm = load_model(path, cfg.model.model_copy(update={"lora": None, "gradient_checkpointing": False}),
                            dtype=frozen_dtype(cfg.dist)).to(device).eval()
            generator = LocalGenerator(lm, tok, device=device, prefix_cache_gib=r.prefix_cache_gib)
        with torch.no_grad():
            for i in range(0, len(tasks), batch):
                chunk = [(dom, t) for t in tasks[i:i + batch]]
                episodes += play(generator, chunk, trials, i * trials)
                _progress(log, len(episodes), len(tasks) * trials, t0)
    for e in episodes:
        if not kept(e, min_reward):
            continue
        record = episode_record(e, agent, unlearnt.get(id(e)))
        # the rendering check compares every policy turn, the unlearnt one too
        ids, train = tokenize_episode(tok, [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]],
                                      record["tools"], record["context_turns"])
        if ids != e.prompt + e.tokens or train != [False] * len(e.prompt) + [bool(m) for m in e.policy_mask]:
            mismatches += 1
        written.append(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as fh:
        for record in written:
            fh.write(json.dumps(record) + "\n")
    os.replace(tmp, out)
    mean = sum(e.reward for e in episodes) / max(len(episodes), 1)
    return DemoStats(len(episodes), len(written), mean, mismatches, time.time() - t0)


def _progress(log, done: int, total: int, t0: float) -> None:
    if done == total or done % 10 == 0:
        log(f"[stagewise] demos: {done}/{total} episodes ({time.time() - t0:.0f} s)")

"""Simulated users: the other side of a conversation, chosen by name (registry ``user_simulator``).

    users = build_user_simulator({"kind": "local", "model": "bundled:smollm2-135m-instruct"})
    session = users.session(system="<guidelines + scenario>", tools=[...schemas...], task=task)
    session.first_message("Hi! How can I help you today?")   # -> "I want to cancel my flight."
    turn = session.respond("Which reservation?")             # -> {"content": ...} or {"tool_calls": [...]}
    turn = session.tool_results(["...result..."])            # after the user's own tool calls

Kinds:
    local     a Hugging Face model in this process (a path, a hub id in the local cache, or
              ``bundled:...``), greedy by default: the same user for every run; ``model: policy``
              is a frozen copy of the weights the current stage started from (its evaluation
              after the stage too), so the customer is as capable as the agent was. Runs in
              ``dtype`` (bfloat16 by default, as the policy samples; float32 for exact numbers)
    endpoint  an OpenAI-compatible chat-completions server (a local vLLM or llama.cpp server) by URL
    scripted  no model: for tests and oracles. Opens with ``first`` (a format string with {id} and
              {reason_for_call}; default: the task's reason for the call), then performs the task's
              expected user-side actions one per agent message (``actions``, tau2 tasks), then says
              ``stop``; or replies from a fixed list ``replies``

A session keeps the conversation from the user's side: the agent's messages are its "user" turns
and its own messages are "assistant" turns (as tau2's user simulator flips roles).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from stagewise.envs.tools import parse_tool_calls
from stagewise.errors import ConfigError, TrainingError
from stagewise.models import DTYPES
from stagewise.registry import lookup
from stagewise.seeds import user_reply_seeds


class ChatSession:
    """A session over a chat backend: ``complete(messages, tools) -> {"content"} | {"tool_calls"}``.
    backend: the simulator, when it can also answer many sessions in one call (``complete_many``)."""

    def __init__(self, complete, system: str, tools: list[dict], backend=None):
        self.complete, self.tools, self.backend = complete, tools, backend
        self.history: list[dict] = [{"role": "system", "content": system}]

    def first_message(self, greeting: str) -> str:
        self.history.append({"role": "user", "content": greeting})
        turn = self._next()
        return turn.get("content") or ""

    def assume_first(self, greeting: str, first: str) -> None:
        """Start from an opening another session produced (episodes of one task share their prompt)."""
        self.history += [{"role": "user", "content": greeting}, {"role": "assistant", "content": first}]

    def respond(self, agent_text: str) -> dict:
        self.hear_agent(agent_text)
        return self._next()

    def tool_results(self, results: list[str]) -> dict:
        self.hear_tool_results(results)
        return self._next()

    def hear_agent(self, text: str) -> None:
        """Add the agent's message (the user's next reply answers it)."""
        self.history.append({"role": "user", "content": text})

    def hear_tool_results(self, results: list[str]) -> None:
        """Add the results of the user's own tool calls."""
        self.history += [{"role": "tool", "content": r} for r in results]

    def _next(self) -> dict:
        return self.record(self.complete(self.history, self.tools))

    def record(self, turn: dict) -> dict:
        if turn.get("tool_calls"):
            self.history.append({"role": "assistant", "content": json.dumps(turn["tool_calls"])})
        else:
            self.history.append({"role": "assistant", "content": turn.get("content") or ""})
        return turn


def respond_all(sessions: list, texts: list[str]) -> list[dict]:
    """``session.respond(text)`` for several sessions; those of a simulator that answers in batches
    (a local model) are answered in one call."""
    return _answer_all(sessions, texts, ChatSession.hear_agent, lambda s, text: s.respond(text))


def tool_results_all(sessions: list, results: list[list[str]]) -> list[dict]:
    """``session.tool_results(results)`` for several sessions, batched as ``respond_all``."""
    return _answer_all(sessions, results, ChatSession.hear_tool_results, lambda s, res: s.tool_results(res))


def _answer_all(sessions: list, args: list, hear, answer_one) -> list[dict]:
    """hear(session, arg) adds the message to a batched session; answer_one(session, arg) answers any other."""
    out: list = [None] * len(sessions)
    batches: dict[int, tuple[object, list[int]]] = {}
    for k, (s, arg) in enumerate(zip(sessions, args)):
        backend = getattr(s, "backend", None)
        if hasattr(backend, "complete_many"):
            hear(s, arg)
            batches.setdefault(id(backend), (backend, []))[1].append(k)
        else:
            out[k] = answer_one(s, arg)
    for backend, ks in batches.values():
        turns = backend.complete_many([(sessions[k].history, sessions[k].tools) for k in ks])
        for k, turn in zip(ks, turns):
            out[k] = sessions[k].record(turn)
    return out


class ScriptedUser:
    def __init__(self, first: str | None = None, replies: list[str] | None = None, stop: str = "###STOP###",
                 actions: bool = True):
        self.first, self.replies, self.stop, self.actions = first, replies, stop, actions

    def session(self, system: str, tools: list[dict], task=None) -> ScriptedSession:
        return ScriptedSession(self, task)


class ScriptedSession:
    def __init__(self, spec: ScriptedUser, task):
        self.spec, self.task, self.turn = spec, task, 0
        criteria = getattr(task, "evaluation_criteria", None)
        self.pending = [a for a in (criteria.actions or []) if a.requestor == "user"] \
            if spec.actions and criteria is not None else []

    def first_message(self, greeting: str) -> str:
        """The reason for the call, or ``first`` filled in: ``{id}``, ``{reason_for_call}`` and
        ``{known_info}`` (tau2: who the customer is, their user id or name and zip code: what a
        customer tells an agent who asks, and what the agent's first lookups need)."""
        instructions = getattr(getattr(self.task, "user_scenario", None), "instructions", None)
        reason = getattr(instructions, "reason_for_call", None) or str(instructions or "Hello.")
        if self.spec.first is None:
            return reason
        known = (getattr(instructions, "known_info", None) or "").strip()
        return self.spec.first.format(id=getattr(self.task, "id", ""), reason_for_call=reason.strip(),
                                      known_info=known).strip()

    def assume_first(self, greeting: str, first: str) -> None:
        pass

    def respond(self, agent_text: str) -> dict:
        if self.pending:  # what the agent should have asked for next: done on the user's device
            action = self.pending.pop(0)
            return {"tool_calls": [{"name": action.name, "arguments": dict(action.arguments)}]}
        if self.spec.replies is not None and self.turn < len(self.spec.replies):
            self.turn += 1
            return {"content": self.spec.replies[self.turn - 1]}
        return {"content": self.spec.stop}

    def tool_results(self, results: list[str]) -> dict:
        return {"content": "Done."}


POLICY = "policy"
_policy_weights: list[str] = []  # the current stage's starting weights (set by the curriculum)


def set_policy_weights(path: str) -> None:
    """Where ``model: policy`` users load from from now on: the weights the current stage started from.
    The previous stage's copy is dropped (a whole model per GPU, kept for nothing)."""
    if _policy_weights and _policy_weights[0] != path:
        for key in [k for k in _user_models if k[0] == _policy_weights[0]]:
            del _user_models[key]
    _policy_weights[:] = [path]


class LocalModelUser:
    """A causal LM in this process; sessions generate with our sampler (greedy unless temperature > 0),
    the replies of several conversations in one batch (``complete_many``)."""

    def __init__(self, model: str = "bundled:smollm2-135m-instruct", max_new_tokens: int = 96,
                 temperature: float = 0.0, seed: int = 0, dtype: str = "bfloat16"):
        if dtype not in DTYPES:
            raise ConfigError(f"user simulator dtype: {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        self.name, self.max_new_tokens, self.temperature, self.seed = model, max_new_tokens, temperature, seed
        self.dtype = dtype
        self.calls = 0

    def session(self, system: str, tools: list[dict], task=None) -> ChatSession:
        return ChatSession(self.complete, system, tools, backend=self)

    def complete(self, messages: list[dict], tools: list[dict]) -> dict:
        return self.complete_many([(messages, tools)])[0]

    def complete_many(self, requests: list[tuple[list[dict], list[dict]]]) -> list[dict]:
        """One reply per (messages, tools): all sampled in one batch (left-padded; each row its own seed)."""
        import torch

        from stagewise.generation.padding import left_pad
        from stagewise.generation.sampling import sample

        if self.name == POLICY:
            if not _policy_weights:
                raise ConfigError("user simulator model 'policy' is the stage's starting policy and exists only "
                                  "inside a run; give a model path or bundled:... here")
            name = _policy_weights[0]
        else:
            name = self.name
        model, tok, store = _load_user_model(name, str(_device()), self.dtype)
        prompts = [self._prompt_ids(model, tok, messages, tools) for messages, tools in requests]
        seeds = user_reply_seeds(self.seed, self.calls, len(prompts))
        self.calls += len(prompts)
        ids, mask = left_pad(prompts, tok.pad_token_id, model.device)
        with torch.no_grad():
            out, cmask, _ = sample(model, ids, mask, max_new_tokens=self.max_new_tokens,
                                   eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                                   greedy=self.temperature <= 0, temperature=max(self.temperature, 1e-5),
                                   seeds=None if self.temperature <= 0 else seeds, prefix_store=store)
        turns = []
        for k, (_, tools) in enumerate(requests):
            text = tok.decode(out[k, : int(cmask[k].sum())].tolist(), skip_special_tokens=True).strip()
            calls, _ = parse_tool_calls(text) if tools else ([], None)
            turns.append({"tool_calls": calls} if calls else {"content": text})
        return turns

    def _prompt_ids(self, model, tok, messages: list[dict], tools: list[dict]) -> list[int]:
        from stagewise.generation.chat_template import ChatRenderer

        renderer = ChatRenderer(tok)
        shown = [m if m["role"] != "tool" else {"role": "user", "content": f"[tool result] {m['content']}"}
                 for m in renderer.with_tool_prompt(messages, tools)]
        ids = renderer.opening_ids(shown, tools)
        ctx = getattr(model.config, "max_position_embeddings", None) or 10**9
        while len(ids) + self.max_new_tokens > ctx and len(shown) > 2:
            del shown[1]  # the user's own context is full: its instructions stay, its oldest turns go
            ids = renderer.opening_ids(shown, tools)
        return ids


def _device():
    """This process's device when a run is under way (each rank's user on its own GPU), else the CPU."""
    import torch
    from accelerate.state import PartialState

    return PartialState().device if PartialState._shared_state else torch.device("cpu")


_user_models: dict[tuple, tuple] = {}  # (name, device, dtype) -> (model, tokenizer, prefix store)


def _load_user_model(name: str, device: str, dtype: str = "bfloat16"):
    """Once per process and model: the user model, frozen, in eval mode, with a store of its long
    prompts' caches (its weights never change, so each conversation's next reply prefills only what
    is new)."""
    key = (name, device, dtype)
    if key not in _user_models:
        _user_models[key] = _build_user_model(name, device, dtype)
    return _user_models[key]


def _build_user_model(name: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from stagewise.generation.prefix_store import PrefixStore
    from stagewise.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(path), PrefixStore(2**29)


class EndpointUser:
    """An OpenAI-compatible server: POST {url}/chat/completions (tools passed natively)."""

    def __init__(self, url: str, model: str = "default", temperature: float = 0.0, max_tokens: int = 256,
                 api_key: str | None = None, timeout_s: float = 120.0, retries: int = 3):
        self.url = url.rstrip("/")
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.api_key, self.timeout_s, self.retries = api_key, timeout_s, retries

    def session(self, system: str, tools: list[dict], task=None) -> ChatSession:
        return ChatSession(self.complete, system, tools)

    def complete(self, messages: list[dict], tools: list[dict]) -> dict:
        # tool turns are shown as text: the user's own calls were recorded as JSON in its history
        msgs = [m if m["role"] != "tool" else {"role": "user", "content": f"[tool result] {m['content']}"}
                for m in messages]
        body = {"model": self.model, "messages": msgs, "temperature": self.temperature, "max_tokens": self.max_tokens}
        if tools:
            body["tools"] = tools
        req = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        last = None
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    msg = json.loads(r.read())["choices"][0]["message"]
                calls = [{"name": c["function"]["name"], "arguments": _args(c["function"].get("arguments"))}
                         for c in msg.get("tool_calls") or []]
                return {"tool_calls": calls} if calls else {"content": msg.get("content") or ""}
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as e:
                last = e
                time.sleep(min(2**attempt, 10))
        raise TrainingError(f"user simulator endpoint {self.url}: no answer after {self.retries} tries ({last})")


def _args(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def build_user_simulator(spec: dict | None, where: str):
    """``{"kind": ..., **options}`` -> a simulator; bad kinds and options are one line naming ``where``."""
    spec = dict(spec or {"kind": "local"})
    kind = spec.pop("kind", "local")
    try:
        cls = lookup("user_simulator", kind)
    except ConfigError as e:
        raise ConfigError(f"{where}.kind: {e}") from None
    try:
        return cls(**spec)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None

"""Chat templates: the one place that turns conversations into the text (and tokens) a model sees.

    text = render(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    text, spans = assistant_spans(tok, conversation)        # what SFT learns: each assistant turn
    renderer = ChatRenderer(tok)                            # episodes: openings and appended turns as ids
    stop_ids = eos_ids(tok)
    end = turn_end_id(tok)                                  # the token an assistant turn ends with

A tokenizer without a chat template renders every message's content on its own line. Rendering
must be prefix-preserving (rendering more turns only appends text) wherever turns are cut out of a
rendering: SFT's assistant masks and the episode loop's appended turns both check it and stop with
a clear error where it does not hold, rather than train on misaligned masks.
"""

from __future__ import annotations

import json

from stagewise.errors import ConfigError, DataError


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """The conversation as the model's chat template writes it (``tools``: schemas the template renders)."""
    if getattr(tokenizer, "chat_template", None):
        kw = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kw)
    return "".join(m["content"] + "\n" for m in messages)  # no template: plain lines


def eos_ids(tokenizer) -> list[int]:
    """Every token id that ends a turn for this tokenizer (EOS and the usual end-of-turn markers)."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def turn_end_id(tokenizer) -> int:
    """The token the chat template ends an assistant turn with: what a policy stops at (SmolLM2's
    and Qwen's ``<|im_end|>``); the EOS token for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None):
        probe = "Zq9xv"
        text = render(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": probe}],
                      add_generation_prompt=False)
        stops = set(eos_ids(tokenizer))
        for i in tokenizer(text[text.rfind(probe) + len(probe):], add_special_tokens=False)["input_ids"]:
            if i in stops:
                return i
    return tokenizer.eos_token_id


def assistant_spans(tokenizer, conv: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that are learnt: each assistant turn's
    content and the end-of-turn token right after it (not a turn with ``weight: 0``: context)."""
    text = render(tokenizer, conv, add_generation_prompt=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for k, m in enumerate(conv):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = render(tokenizer, conv[:k], add_generation_prompt=True) if k else ""
        upto = render(tokenizer, conv[:k + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(upto)):
            raise DataError("the chat template is not prefix-preserving (a turn renders differently once later "
                            "turns follow), so assistant tokens cannot be located; use single-turn records or "
                            "a template without that behaviour")
        start = upto.find(m["content"], len(before))
        if start < 0:
            raise DataError("the chat template changes the assistant text it renders; cannot locate it")
        end = start + len(m["content"])
        if eos:
            j = upto.find(eos, end)
            if j >= 0 and not upto[end:j].strip():
                end = j + len(eos)
        spans.append((start, end))
    return text, spans


class ChatRenderer:
    """Renders an episode's conversation and cuts out appended turns as token ids."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._tools_native: bool | None = None

    def _render(self, messages, schemas, add_generation_prompt: bool) -> str:
        tools = schemas if schemas and self.tools_native(schemas) else None
        return render(self.tok, messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def tools_native(self, schemas) -> bool:
        """Whether the chat template renders ``tools=`` itself (Qwen, Llama 3.1, ...); SmolLM2's ignores it."""
        if self._tools_native is None:
            if not getattr(self.tok, "chat_template", None):
                self._tools_native = False
            else:
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
        """The conversation so far, up to and including the generation prompt, as token ids."""
        return self.tok(self._render(messages, schemas, True), add_special_tokens=False)["input_ids"]

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

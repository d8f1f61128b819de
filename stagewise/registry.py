"""Name -> function registries. Losses, advantages, rewards and domains are chosen once, by name.

    @register("advantage", "grpo")
    def grpo_advantages(rewards, group_size): ...

    fn = lookup("advantage", cfg.grpo.advantage)
"""

from __future__ import annotations

from typing import Callable

from stagewise.errors import ConfigError

_REGISTRIES: dict[str, dict[str, Callable]] = {}


def register(kind: str, name: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _REGISTRIES.setdefault(kind, {})[name] = fn
        return fn

    return deco


def lookup(kind: str, name: str) -> Callable:
    table = _REGISTRIES.get(kind, {})
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r} (known: {', '.join(sorted(table)) or 'none'})")
    return table[name]


def names(kind: str) -> list[str]:
    return sorted(_REGISTRIES.get(kind, {}))

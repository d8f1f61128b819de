"""Domains: task families with verifiable rewards and disjoint train / held-out splits.

Importing the package registers the built-in domain builders (``builtin``, ``jsonl``, ``chat``); a plugin
registers its own with ``@register("domain", name)`` or is named as ``"module:function"``.
"""

from stagewise.domains.base import Domain, build_domain, split_items  # noqa: F401
from stagewise.domains import builtin, calculator, chat, jsonl, tau2  # noqa: F401,E402  (register the built-in builders)

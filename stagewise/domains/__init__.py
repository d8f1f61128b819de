"""Domains: task families with verifiable rewards and disjoint train / held-out splits (``base.py``:
``Domain``, ``build_domain``). The built-in builders are registered by ``stagewise.builtins``; a
plugin registers its own with ``@register("domain", name)`` or is named as ``"module:function"``."""

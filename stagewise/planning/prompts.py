"""The longest prompt a run's RL stages start from, measured with the model's own tokenizer and
chat template (tool schemas included), so the plan's sequence lengths are the run's.

    longest, environments, note = measure_prompts(cfg, domains)   # 5_187, {"airline", ...}, ""
"""

from __future__ import annotations

from stagewise.config import RunConfig

SAMPLE = 16  # examples per domain: prompts of one domain differ by their task text only


def environment_names(domains) -> frozenset[str]:
    return frozenset(d.name for d in domains if d.environment is not None)


def measure_prompts(cfg: RunConfig, domains) -> tuple[int | None, str]:
    """(tokens of the longest prompt among the first examples of the domains that are sampled from:
    the RL stages' and the environment domains (every one when there are none), or None when the
    tokenizer cannot be had here; a note saying what was measured or why not)."""
    from stagewise.errors import StagewiseError
    from stagewise.generation.chat_template import ChatRenderer
    from stagewise.models import load_tokenizer, resolve_model_path
    from stagewise.rl.episodes import start_episodes

    try:
        tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
    except (StagewiseError, OSError, ValueError) as e:
        return None, f"no tokenizer here ({str(e).splitlines()[0][:120]})"
    renderer = ChatRenderer(tokenizer)
    sampled = {d for st in cfg.stages if st.kind in ("grpo", "rft") for d in st.domains}
    sampled |= environment_names(domains)
    longest, where = 0, ""
    for dom in [d for d in domains if d.name in sampled] or domains:
        for task in (dom.train or dom.eval)[:SAMPLE]:
            n = len(start_episodes(renderer, [(dom, task)], 1)[0].prompt)
            if n > longest:
                longest, where = n, dom.name
    return longest, f"longest prompt measured: {longest} tokens ({where}, first {SAMPLE} tasks of each domain)"

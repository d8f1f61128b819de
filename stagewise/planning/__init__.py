"""Memory planning: model shapes without weights (shapes), byte formulas (memory), a run's plan per stage
and phase and the recommendation (plan), the longest prompt (prompts), text tables (tables)."""

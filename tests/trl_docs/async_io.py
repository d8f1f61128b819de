# ruff: noqa: I001  (the example as TRL prints it: one blank line after the import)
# Example 5: Asynchronous reward functions, copied verbatim from
# https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function

import asyncio

async def async_reward_func(prompts, completions, **kwargs):
    # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
    await asyncio.sleep(0.01)
    # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
    return [1.0 if completion else 0.0 for completion in completions]

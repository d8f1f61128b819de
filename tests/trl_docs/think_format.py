# ruff: noqa: I001  (the example as TRL prints it: one blank line after the import)
# Example 2: Reward completions with a specific format (conversational), copied verbatim from
# https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function

import re

def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]

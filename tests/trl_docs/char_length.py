# Example 1.1: Reward longer completions (based on the number of characters), copied verbatim from
# https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function


def reward_func(completions, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of character count)."""
    return [float(len(completion)) for completion in completions]

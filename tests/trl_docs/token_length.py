# Example 1: Reward longer completions, copied verbatim from
# https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function


def reward_func(completion_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completion_ids]

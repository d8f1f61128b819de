"""Reward functions copied verbatim from TRL's documentation, one module per example (several are
called ``reward_func``): GRPOTrainer, "Using a custom reward function",
https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function
(docs/source/grpo_trainer.md of huggingface/trl at c1f6f24e1bfa62b86095d3adaab00c0dd6bf1b51).
Do not edit the function bodies: the tests check that TRL's functions plug in unchanged."""

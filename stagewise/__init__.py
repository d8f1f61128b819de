"""stagewise: continual GRPO post-training of language models, one loop from CPU to many GPUs."""

__version__ = "0.1.0"

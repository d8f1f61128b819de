"""A test plugin (loaded through `plugins: [tests.plugins]`): a dense reward a tiny random model
can learn from — the fraction of completion characters that are the digit 7."""

from stagewise.registry import register


@register("reward", "sevens")
def sevens(text: str, example: dict) -> float:
    return text.count("7") / max(len(text), 1)

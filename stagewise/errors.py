"""Errors the CLI reports as one line (``error: ...``), without a traceback.

Exit status: 2 for a problem with the user's input (config, files, environment), 1 for a run that
had to stop (numerical faults, a lost peer process).
"""


class StagewiseError(Exception):
    """Base class: a problem with the user's input (config, files, environment), not a bug."""

    exit_code = 2


class ConfigError(StagewiseError):
    """The configuration is invalid; the message names the field and the problem."""


class ModelLoadError(StagewiseError):
    """A model or tokenizer could not be found or loaded."""


class DataError(StagewiseError):
    """A data file is malformed; the message names file:line."""


class TrainingError(StagewiseError):
    """Training cannot go on (e.g. repeated non-finite losses); the message names stage and step."""

    exit_code = 1


class RewardError(StagewiseError):
    """A reward function raised, or returned something other than one float or None per completion;
    the message names the function and its domain (the user's code, not stagewise's)."""

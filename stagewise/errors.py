"""Errors a user can fix. The CLI prints them as one line and exits non-zero (no traceback)."""


class StagewiseError(Exception):
    """Base class: a problem with the user's input (config, files, environment), not a bug."""


class ConfigError(StagewiseError):
    """The configuration is invalid; the message names the field and the problem."""


class ModelLoadError(StagewiseError):
    """A model or tokenizer could not be found or loaded."""


class DataError(StagewiseError):
    """A data file is malformed; the message names file:line."""

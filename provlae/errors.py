"""User-facing errors: each carries one line that names what is wrong.

The CLIs print ``error: <message>`` and exit with status 2 for these; anything else is a bug and
keeps its traceback.
"""


class ProvlaeError(Exception):
    """Base class for errors caused by the user's input (config, files, servers)."""


class ConfigError(ProvlaeError, ValueError):
    """A trial or sweep configuration is invalid (unknown key, bad value, missing file)."""


class DataError(ProvlaeError):
    """A dataset file is missing, unreadable, or not in the expected format."""


class TrainingDiverged(ProvlaeError, ArithmeticError):
    """The loss became NaN or Inf."""


class CheckpointError(ConfigError):
    """A checkpoint file is damaged (truncated, not a checkpoint) or holds more than plain state."""

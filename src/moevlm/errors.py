"""User-facing errors.

Anything a user can cause (bad data, bad flag, bad config, missing checkpoint) raises a
subclass of ``MoevlmError``; the CLI prints its message on one line and exits non-zero.
Bugs stay plain exceptions/asserts so they keep their tracebacks.
"""


class MoevlmError(Exception):
    """A mistake in the user's input; the message is shown as is, on one line."""


class ConfigError(MoevlmError, ValueError):
    """An invalid configuration value or unknown configuration key."""


class DataError(MoevlmError):
    """A data file or row that cannot be used: names the file, the row and the problem."""

    def __init__(self, path, row, problem):
        where = f"{path}: row {row}" if row is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.row, self.problem = path, row, problem


class CheckpointError(MoevlmError):
    """A checkpoint folder that is missing, incomplete or does not fit the model."""


class DamagedCheckpointError(CheckpointError):
    """A file of the checkpoint is missing or differs from its checksum: the only problems
    ``--resume`` falls back past. A file that is whole but cannot be read or used is not one."""


class TrainingError(MoevlmError):
    """A run that cannot go on, e.g. a loss that stays NaN; its last good checkpoint is kept."""


class ExportError(MoevlmError):
    """A model that no transformers class computes exactly: names each blocker on one line."""

"""One small exception hierarchy: every error the library raises on purpose is a
:class:`BayesTransferError`, so callers (and the CLI) can catch ours apart from bugs."""

from __future__ import annotations

__all__ = [
    "BayesTransferError",
    "PriorFormatError",
    "PriorMismatchError",
    "DataError",
    "ConfigError",
    "TrainingDivergedError",
    "OutputExistsError",
    "OutputWriteError",
    "CheckpointError",
]


class BayesTransferError(Exception):
    """Base class of all errors raised by sklearn-bayes-transfer."""


class PriorFormatError(BayesTransferError, ValueError):
    """A prior (or model) file is not in the expected format, or holds invalid values."""


class PriorMismatchError(BayesTransferError, ValueError):
    """A prior does not fit the parameters of the module it is applied to."""


class DataError(BayesTransferError, ValueError):
    """Input data (arrays, image folders, masks) cannot be used as given."""


class ConfigError(BayesTransferError, ValueError):
    """A hyperparameter or argument has an invalid value."""


class TrainingDivergedError(BayesTransferError, RuntimeError):
    """Training produced a non-finite loss or non-finite weights."""


class OutputExistsError(BayesTransferError, FileExistsError):
    """An output file exists and overwriting it was not asked for."""


class OutputWriteError(BayesTransferError, OSError):
    """An output file cannot be written where it was asked for (not a regular file, disk full, ...)."""


class CheckpointError(BayesTransferError, ValueError):
    """A training checkpoint cannot be resumed: unreadable, foreign, or from other settings."""

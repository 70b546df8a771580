"""sklearn-bayes-transfer: Bayesian transfer learning with informative priors.

Fit a posterior over a backbone's weights on a source task, save it as a prior file, and
fine-tune with ``task loss + prior negative log-density`` on a downstream task, as
scikit-learn estimators (Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022).

The public names below are imported on first use (PEP 562), so ``import sklearn_bayes_transfer``
and the command line start without loading torch until they need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .exceptions import (
    BayesTransferError,
    CheckpointError,
    ConfigError,
    DataError,
    OutputExistsError,
    OutputWriteError,
    PriorFormatError,
    PriorMismatchError,
    TrainingDivergedError,
)

#: Public name -> the module that defines it.
_LAZY = {
    "Prior": "prior",
    "PriorStructure": "prior",
    "Backend": "_kernel",
    "PriorPenalty": "penalty",
    "PriorFitter": "fitter",
    "FitCheckpoint": "checkpoint",
    "PriorRegularizedClassifier": "classifier",
    "PriorRegularizedSegmenter": "segmenter",
    "Inference": "sampling",
    "ModelFileError": "modelfile",
    "load_model": "modelfile",
    "save_model": "modelfile",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ._kernel import Backend
    from .checkpoint import FitCheckpoint
    from .classifier import PriorRegularizedClassifier
    from .fitter import PriorFitter
    from .modelfile import ModelFileError, load_model, save_model
    from .penalty import PriorPenalty
    from .prior import Prior, PriorStructure
    from .sampling import Inference
    from .segmenter import PriorRegularizedSegmenter

__all__ = [
    "__version__",
    "BayesTransferError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "OutputExistsError",
    "OutputWriteError",
    "PriorFormatError",
    "PriorMismatchError",
    "TrainingDivergedError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

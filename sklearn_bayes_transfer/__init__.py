"""sklearn-bayes-transfer: Bayesian transfer learning with informative priors.

Fit a posterior over a backbone's weights on a source task, save it as a prior file, and
fine-tune with ``task loss + prior negative log-density`` on a downstream task, as
scikit-learn estimators (Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022).
"""

from ._version import __version__
from .exceptions import (
    BayesTransferError,
    ConfigError,
    DataError,
    OutputExistsError,
    PriorFormatError,
    PriorMismatchError,
    TrainingDivergedError,
)
from .prior import Prior, PriorStructure
from ._kernel import Backend
from .penalty import PriorPenalty
from .fitter import PriorFitter
from .classifier import PriorRegularizedClassifier
from .segmenter import PriorRegularizedSegmenter
from .sampling import Inference
from .modelfile import ModelFileError, load_model, save_model

__all__ = [
    "__version__",
    "BayesTransferError",
    "ConfigError",
    "DataError",
    "OutputExistsError",
    "PriorFormatError",
    "PriorMismatchError",
    "TrainingDivergedError",
    "Prior",
    "PriorStructure",
    "PriorPenalty",
    "Backend",
    "PriorFitter",
    "PriorRegularizedClassifier",
    "PriorRegularizedSegmenter",
    "Inference",
    "ModelFileError",
    "load_model",
    "save_model",
]

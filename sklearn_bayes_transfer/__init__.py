"""sklearn-bayes-transfer: Bayesian transfer learning with informative priors.

Fit a posterior over a backbone's weights on a source task, save it as a prior file, and
fine-tune with ``task loss + prior negative log-density`` on a downstream task, as
scikit-learn estimators (Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022).
"""

__version__ = "0.1.0"

from .exceptions import (  # noqa: E402
    BayesTransferError,
    ConfigError,
    DataError,
    OutputExistsError,
    PriorFormatError,
    PriorMismatchError,
    TrainingDivergedError,
)
from .prior import Prior, PriorStructure  # noqa: E402
from ._kernel import Backend  # noqa: E402
from .penalty import PriorPenalty  # noqa: E402
from .fitter import PriorFitter  # noqa: E402
from .classifier import PriorRegularizedClassifier  # noqa: E402
from .segmenter import PriorRegularizedSegmenter  # noqa: E402
from .bayes import Inference  # noqa: E402
from .modelfile import ModelFileError, load_model, save_model  # noqa: E402

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

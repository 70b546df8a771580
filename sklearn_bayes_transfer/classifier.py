"""``PriorRegularizedClassifier``: fine-tuning with a learned prior, as a scikit-learn classifier."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d
from skorch import NeuralNetClassifier
from skorch.callbacks import EpochScoring
from skorch.dataset import ValidSplit
from torch import nn

from ._validation import as_numpy
from .augment import Augment, augment_batch
from .backbones import feature_dim_of
from .exceptions import ConfigError, DataError
from .recipe import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MIN_STEPS,
    DEFAULT_WARMUP,
    TrainLoader,
)
from .regularized import PriorRegularizedMixin

__all__ = ["PriorRegularizedClassifier", "index_accuracy"]


def index_accuracy(net: Any, X: Any, y: Any) -> float:
    """Accuracy during fit, where skorch hands the targets over as class indices, not labels.

    It reads the network's own outputs rather than ``predict_proba``: with Bayesian inference
    that averages over posterior samples, which exist only once fit has finished.
    """
    predicted = net.forward(X).argmax(dim=1).cpu().numpy()
    return float(np.mean(predicted == as_numpy(y).reshape(-1)))


class PriorRegularizedClassifier(PriorRegularizedMixin, NeuralNetClassifier):
    """Image classifier fine-tuned with ``cross-entropy + prior negative log-density``.

    With only ``prior`` given, the backbone is rebuilt from the prior's metadata, initialised at
    the prior mean (with the prior's BatchNorm statistics), and a new linear head is sized from
    ``y``. The loss per batch is

        task_loss + 0.5 * r^T (prior_scale * Sigma + prior_eps * I)^{-1} r / N
                  + 0.5 * head_weight_decay * |w_head|^2 / N

    with ``r`` the backbone weights minus the prior mean and ``N`` the number of training
    examples. ``task_loss``, ``prior_nll`` and ``head_nll`` are logged in ``history``.

    Parameters
    ----------
    prior : Prior, str or path, default=None
        The prior (or a prior file). ``None`` needs ``module`` and means plain fine-tuning.
    module : nn.Module class or instance, default=None
        Your own network; ``None`` builds ``BackboneWithHead(prior's backbone, Linear head)``.
        The prior binds to its parameters by name (a ``backbone.`` or ``module.`` prefix is
        tolerated).
    max_epochs : int or None, default=None
        Epochs to train. ``None``: the fewest whole epochs that make at least ``min_steps``
        optimizer steps (so the budget follows the data size; see
        :mod:`~sklearn_bayes_transfer.recipe` and ``training_plan_``).
    min_steps : int, default=500
        The step budget of ``max_epochs=None``.
    lr : float, default=0.05
        Peak learning rate. The default optimizer is :class:`torch.optim.SGD` with momentum 0.9
        (0 with ``inference="sgld"``) unless ``optimizer__momentum`` is given.
    lr_schedule : {"cosine", "constant"}, default="cosine"
        Linear warm-up then cosine decay over the fit (before any sampling phase), or ``lr``
        throughout (see :class:`~sklearn_bayes_transfer.recipe.LRSchedule`).
    warmup : float, default=0.1
        Fraction of the scheduled steps spent warming up.
    batch_size : int, default=32
        Images per batch. A last batch of fewer than ``batch_size / 4`` images is dropped
        (:class:`~sklearn_bayes_transfer.recipe.TrainLoader`; training batches are shuffled).
    augment : {"light", "light-flip", "none"} or callable, default="light"
        Augmentation of training batches: small random shifts, zooms and rotations (no flips),
        the same plus left-right flips, or none (see :class:`~sklearn_bayes_transfer.augment.Augment`).
        A callable is applied to each preprocessed training image ``(C, H, W)`` (e.g. a
        torchvision v2 transform).
    batchnorm : {"recompute", "running"}, default="recompute"
        BatchNorm statistics used by ``predict``: recomputed over the training images for the
        final weights, or PyTorch's running averages (see
        :class:`~sklearn_bayes_transfer.recipe.BatchNormUpdate`).
    prior_scale : float, "auto" or "evidence", default="auto"
        ``lambda > 0``: scales the prior covariance. ``1`` is the posterior as learned, which
        pins the backbone and costs accuracy; ``"auto"`` is ``lambda_0 * 10**3``, with
        ``lambda_0`` the prior's :meth:`~sklearn_bayes_transfer.Prior.reference_scale`, the
        scale measured not to cost accuracy on the transfer panel. ``"evidence"`` starts there
        and re-estimates the scale a few times during the fit by maximising the Laplace
        approximation of the marginal likelihood (:mod:`~sklearn_bayes_transfer.evidence`). Or
        search it on a log grid (:func:`~sklearn_bayes_transfer.tuning.default_param_grid`).
    prior_scale_bounds : (float, float), optional
        Range of ``prior_scale="evidence"`` and :meth:`evidence_curve` (default:
        ``lambda_0 * 10**-3`` to ``lambda_0 * 10**9``).
    prior_eps : float, default=0.0
        Jitter added to the prior covariance's diagonal.
    prior_structure : {"lowrank", "diag", "isotropic", "none"}, default="lowrank"
        Which part of the covariance to use; ``"none"`` is standard fine-tuning (same code path).
    head_weight_decay : float, default=1.0
        Precision of the zero-mean Gaussian prior on the parameters the prior does not cover
        (the new head).
    prior_update : {"auto", "proximal", "gradient"}, default="auto"
        How the stiff prior term enters the update (see
        :class:`~sklearn_bayes_transfer.regularized.PriorUpdate`).
    factor_dtype : {None, "float32", "bfloat16", "float16"}, default=None
        Storage dtype of the penalty's low-rank matrix (``None``: the prior's).
    preprocess : "auto", None, Preprocess or dict, default="auto"
        Input preprocessing. ``"auto"`` applies the prior's recorded preprocessing (resize,
        grey/RGB, normalisation), or one fitted on the training data if the prior has none.
    inference : {"map", "swag", "sgld", "laplace"}, default="map"
        ``"map"``: predict with the fitted weights. ``"swag"``: collect a SWAG posterior over the
        whole network during the last part of fine-tuning and average ``predict_proba`` over
        ``n_samples`` draws from it. ``"sgld"``: run stochastic-gradient Langevin dynamics on the
        same loss over the last part, with a cyclical step size, and average over ``n_samples``
        iterates. ``"laplace"``: after MAP fine-tuning, average the linearised network over
        ``n_samples`` draws from the Laplace posterior (learned prior plus diagonal Fisher); it
        is measured to be far too wide, so prefer SWAG for predictive uncertainty
        (docs/evidence.md). See :mod:`sklearn_bayes_transfer.bayes`.
    n_samples : int, default=20
        Posterior samples averaged by ``predict_proba`` (SWAG or Laplace draws, SGLD iterates).
    sample_start : float, default=0.5
        Fraction of ``max_epochs`` trained before SWAG collection or SGLD sampling starts.
    sample_every : int, default=1
        Epochs between SWAG snapshots or SGLD samples.
    sgld_temperature : float, default=1.0
        SGLD temperature ``T >= 0``: 1 samples the posterior, < 1 a cold posterior, 0 adds no noise.
    sgld_cycles : int, default=4
        Cosine step size cycles over the SGLD phase; samples come from the low half of each.
    sample_lr : float, optional
        Learning rate of SWAG collection, and the top of SGLD's cycles (default: ``lr``).
    inference_device : str, default="cpu"
        Where the samples (``samples_``, float32 ``(n_samples, n_parameters)``) are kept.
    random_state : int, optional
        Seeds the SGLD noise and the SWAG draws (``None``: drawn from torch's global generator,
        so ``torch.manual_seed`` makes a fit reproducible).
    criterion, optimizer, train_split, callbacks, device, ...
        As in :class:`skorch.NeuralNetClassifier`. ``train_split`` defaults to ``None``: ``fit``
        trains on all the data it gets, as scikit-learn estimators do. For early stopping, pass
        a split and ``callbacks=[skorch.callbacks.EarlyStopping(load_best=True)]``.

    Attributes
    ----------
    classes_ : ndarray
        The class labels, in the order of ``predict_proba``'s columns.
    prior_ : Prior or None
        The prior in use.
    preprocess_ : Preprocess or None
        The preprocessing applied to inputs.
    n_train_ : int
        Number of training examples of the last fit (the ``N`` of the loss).
    prior_scale_ : float or None
        The prior scale in use (``"auto"`` resolved, ``"evidence"`` as last chosen); ``None``
        without a prior term.
    evidence_trace_ : list of dict
        With ``prior_scale="evidence"``: each update's ``step``, ``prior_scale`` and
        ``log_evidence``.
    prior_update_ : {"proximal", "gradient"}
        How the prior enters the updates of this optimizer (``prior_update="auto"`` resolved).
    training_plan_ : TrainingPlan
        Epochs, steps per epoch and sampling phase of the last fit
        (:class:`~sklearn_bayes_transfer.recipe.TrainingPlan`).
    module_ : nn.Module
        The fitted network.
    samples_ : torch.Tensor
        With ``inference`` ``"swag"``, ``"sgld"`` or ``"laplace"``: the posterior samples, float32 of shape
        ``(n_samples, n_parameters)`` over ``module_.parameters()``, on ``inference_device``.
    sample_buffers_ : torch.Tensor
        The BatchNorm running statistics recomputed for each sample on (up to 2,048 of) the
        training inputs, ``(n_samples, n_statistics)``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_bayes_transfer import Prior, PriorRegularizedClassifier
    >>> from sklearn_bayes_transfer.backbones import get_backbone
    >>> prior = Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01)
    >>> X = np.random.default_rng(0).random((20, 8, 8)).astype("float32")
    >>> y = np.array(["cat", "dog"] * 10)
    >>> clf = PriorRegularizedClassifier(prior, min_steps=10, verbose=0).fit(X, y)
    >>> clf.predict(X[:3]).shape, clf.training_plan_.steps
    ((3,), 10)
    """

    def __init__(
        self,
        prior=None,
        module=None,
        *args: Any,
        criterion=nn.CrossEntropyLoss,
        train_split=None,
        classes=None,
        max_epochs: int | None = None,
        lr: float = DEFAULT_LR,
        batch_size: int = DEFAULT_BATCH_SIZE,
        iterator_train=TrainLoader,
        min_steps: int = DEFAULT_MIN_STEPS,
        lr_schedule: str = "cosine",
        warmup: float = DEFAULT_WARMUP,
        augment: Any = "light",
        batchnorm: str = "recompute",
        prior_scale: float | str = "auto",
        prior_scale_bounds: tuple[float, float] | None = None,
        prior_eps: float = 0.0,
        prior_structure: str = "lowrank",
        head_weight_decay: float = 1.0,
        prior_update: str = "auto",
        factor_dtype: str | None = None,
        preprocess: Any = "auto",
        inference: str = "map",
        n_samples: int = 20,
        sample_start: float = 0.5,
        sample_every: int = 1,
        sgld_temperature: float = 1.0,
        sgld_cycles: int = 4,
        sample_lr: float | None = None,
        inference_device: str = "cpu",
        random_state: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, *args, criterion=criterion, train_split=train_split, classes=classes,
                         max_epochs=max_epochs, lr=lr, batch_size=batch_size, iterator_train=iterator_train, **kwargs)
        self.prior = prior
        self.min_steps = min_steps
        self.lr_schedule = lr_schedule
        self.warmup = warmup
        self.augment = augment
        self.batchnorm = batchnorm
        self.prior_scale = prior_scale
        self.prior_scale_bounds = prior_scale_bounds
        self.prior_eps = prior_eps
        self.prior_structure = prior_structure
        self.head_weight_decay = head_weight_decay
        self.prior_update = prior_update
        self.factor_dtype = factor_dtype
        self.preprocess = preprocess
        self.inference = inference
        self.n_samples = n_samples
        self.sample_start = sample_start
        self.sample_every = sample_every
        self.sgld_temperature = sgld_temperature
        self.sgld_cycles = sgld_cycles
        self.sample_lr = sample_lr
        self.inference_device = inference_device
        self.random_state = random_state

    # -- labels ------------------------------------------------------------------------------------

    def _encode(self, y: Any, *, n: int) -> torch.Tensor:
        y = as_numpy(y)
        if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
            raise DataError(f"y must be 1-D class labels, got shape {y.shape}")
        y = y.reshape(-1)
        if len(y) != n:
            raise DataError(f"X has {n} examples but y has {len(y)} labels")
        index = {label: i for i, label in enumerate(self.classes_.tolist())}
        try:
            return torch.as_tensor([index[label] for label in y.tolist()], dtype=torch.int64)
        except KeyError as exc:
            raise DataError(f"label {exc.args[0]!r} was not seen in fit (classes: {self.classes_.tolist()})") from None

    def _fit_labels(self, X: Any, y: Any) -> np.ndarray:
        """Learn ``classes_`` from ``y`` (or from a Dataset's own labels)."""
        if isinstance(X, torch.utils.data.Dataset) and y is None:
            y = _dataset_labels(X)
        if y is None:
            raise DataError(f"{type(self).__name__} requires y to be passed, but the target y is None; pass "
                            "class labels, or a Dataset that yields (image, label) pairs")
        labels = as_numpy(y)
        # (N, 1) is accepted with sklearn's DataConversionWarning; "continuous" targets are refused.
        labels = column_or_1d(labels, warn=True) if labels.ndim == 2 and labels.shape[1] == 1 else labels.reshape(-1)
        try:
            check_classification_targets(labels)
        except ValueError as exc:
            raise DataError(f"y: {exc}") from None
        classes = np.asarray(self.classes) if self.classes is not None else np.unique(labels)
        if len(classes) < 2:
            raise DataError(f"y has only one class ({classes.tolist()}); a classifier needs at least two")
        self.classes_fitted_ = classes
        self.classes_inferred_ = classes
        return labels

    # -- sklearn / skorch entry points ------------------------------------------------------------
    def fit(self, X, y=None, **fit_params):
        """Fine-tune on images ``X`` (arrays (N,H,W) / (N,C,H,W), or a Dataset) and labels ``y``."""
        return super().fit(X, y, **fit_params)

    def _learn_targets(self, X: Any, y: Any) -> np.ndarray:
        return self._fit_labels(X, y)

    def _prepare_Xy(self, X: Any, y: Any) -> tuple[Any, torch.Tensor]:
        """Preprocessed inputs and class indices; a Dataset's own labels are encoded per item."""
        is_dataset = isinstance(X, torch.utils.data.Dataset)
        if is_dataset and y is None:
            y = _dataset_labels(X)
        Xt = self._prepare_X(X)
        yt = self._encode(y, n=len(Xt))
        if is_dataset:
            Xt = _EncodedTargets(Xt, yt)
        return Xt, yt

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        self._check_fitted()
        return super().predict_proba(self._prepare_X(self._validate_X(X, reset=False)))

    def _check_split(self, y: Any) -> None:
        # A stratified split needs enough examples of every class on both sides.
        split = self.train_split
        if not isinstance(split, ValidSplit) or not split.stratified or y is None:
            return
        labels, counts = np.unique(as_numpy(y).reshape(len(y), -1)[:, 0], return_counts=True)
        cv = split.cv
        needed = 2 if isinstance(cv, float) else int(cv)
        if counts.min() < needed:
            worst = labels[counts.argmin()]
            if hasattr(self, "classes_") and np.issubdtype(np.asarray(worst).dtype, np.integer):
                worst = self.classes_[int(worst)]
            raise DataError(
                f"a stratified validation split needs at least {needed} examples of every class, but class "
                f"{worst!r} has {int(counts.min())}; train on all data (train_split=None, or no "
                "--valid-fraction), add examples, or use a non-stratified split")

    @property
    def _default_callbacks(self):
        # skorch's valid_acc would compare predicted labels with the encoded targets.
        return [(name, EpochScoring(index_accuracy, name="valid_acc", lower_is_better=False) if name == "valid_acc"
                 else callback) for name, callback in super()._default_callbacks]


    def _build_head(self, backbone: nn.Module) -> nn.Module:
        return nn.Linear(feature_dim_of(backbone, self._example_input()), len(self.classes_))

    def head_spec(self) -> dict[str, Any]:
        """The fitted linear head as plain values, for a model file."""
        head = self.module_.head
        if type(head) is not nn.Linear:
            raise ConfigError(f"this estimator has a {type(head).__name__} head, but its model file describes a "
                              "linear head; pickle this estimator instead, or give the class head_spec / head_from_spec")
        return {"kind": "linear", "in_features": head.in_features, "out_features": head.out_features,
                "bias": head.bias is not None}

    @classmethod
    def head_from_spec(cls, spec: dict[str, Any], backbone: nn.Module) -> nn.Module:
        """A new linear head from :meth:`head_spec`'s description."""
        if spec.get("kind") != "linear":
            raise ConfigError(f"head kind {spec.get('kind')!r} is not known (expected 'linear')")
        try:
            return nn.Linear(int(spec["in_features"]), int(spec["out_features"]), bias=bool(spec.get("bias", True)))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"invalid linear head spec {spec!r} ({exc})") from None

    def _augment_batch(self, augment: Any, X: Any, y: Any) -> tuple[Any, Any]:
        if not isinstance(X, torch.Tensor) or X.dim() != 4:
            raise ConfigError(f"augment={self.augment!r} transforms image batches (N, C, H, W), but this batch is "
                              f"{type(X).__name__ if not isinstance(X, torch.Tensor) else tuple(X.shape)}; pass "
                              "augment='none' for other inputs")
        if isinstance(augment, Augment) and min(X.shape[-2:]) == 1:
            # Feature rows read as one-pixel-high images (docs/deviations.md): not images to move.
            return X, y
        return augment_batch(augment, X)[0], y


class _EncodedTargets(torch.utils.data.Dataset):
    """A ``(x, label)`` dataset whose labels are replaced by precomputed class indices."""

    def __init__(self, dataset: torch.utils.data.Dataset, targets: torch.Tensor) -> None:
        self.dataset = dataset
        self.targets = targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return (item[0] if isinstance(item, (tuple, list)) else item), self.targets[index]


def _dataset_labels(dataset: torch.utils.data.Dataset) -> np.ndarray:
    """Labels of a ``(x, y)`` dataset: its ``targets`` attribute, else one pass over it."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return as_numpy(targets)
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError("a Dataset passed without y must yield (image, label) pairs")
        label = item[1]
        labels.append(label.item() if isinstance(label, torch.Tensor) else label)
    return np.asarray(labels)

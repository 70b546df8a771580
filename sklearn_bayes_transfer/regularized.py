"""The prior plumbing shared by the downstream estimators (classifier and segmenter).

:class:`PriorRegularizedMixin` goes in front of a skorch net class. It rebuilds the backbone
from the prior, binds the prior to the backbone's parameters, and adds

    prior_nll = 0.5 * r^T Sigma_tilde^{-1} r / N_train      (the backbone)
    head_nll  = 0.5 * head_weight_decay * |w_head|^2 / N_train

to the task loss in :meth:`get_loss`, so the training loss is one negative log-posterior per
example. Both terms are logged in ``history`` beside ``task_loss``.

The prior term is stiff (its curvature reaches ``1 / (N * min(d))``), so by default, with plain
SGD, it is applied as an exact proximal step after the optimizer steps instead of through the
gradient. That forward-backward splitting is stable for every ``prior_scale``; see
``docs/deviations.md``.

The training recipe (step budget, warm-up and cosine schedule, augmentation, BatchNorm
statistics, the default prior scale) is :mod:`~sklearn_bayes_transfer.recipe`'s; this mixin plans
each fit with it (:attr:`training_plan_`) and applies the augmentation in :meth:`train_step`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_array
from skorch.callbacks import Callback, EarlyStopping, PassthroughScoring
from skorch.dataset import unpack_data
from skorch.utils import to_device
from torch import nn

from ._device import resolve_device, seeded
from ._validation import (
    Integral,
    Interval,
    Options,
    Real,
    check_choice,
    check_params,
)
from .augment import Augment, check_augment
from .backbones import BackboneWithHead, backbone_from_meta
from .bayes import BayesianInferenceMixin
from .curvature import diagonal_fisher
from .data import Preprocess, TransformedDataset, prepare_images
from .distributed import (
    ShardSampler,
    average_gradients_,
    broadcast_,
    launched_processes,
    start_processes,
)
from .evidence import CURVATURE_MAX_EXAMPLES, EvidencePriorScale, resolve_scale_bounds
from .exceptions import (
    ConfigError,
    DataError,
    PriorMismatchError,
    TrainingDivergedError,
)
from .laplace import evidence_grid, log_evidence
from .penalty import PriorPenalty
from .prior import FACTOR_DTYPES, Prior, PriorStructure, named_parameters_for
from .recipe import (
    DEFAULT_MOMENTUM,
    BatchNormUpdate,
    LRSchedule,
    RecomputeBatchNorm,
    TrainingPlan,
    WarmupCosineLR,
    epochs_for_steps,
    resolve_prior_scale,
    small_last_batch,
)
from .sampling import Inference

__all__ = ["LAZY_PRIOR_STEP", "PROX_STEP_RATIO", "PriorRegularizedMixin", "PriorUpdate"]

#: Steps of the proximal prior update are rounded down to a power of this ratio, so that its K x K
#: factorisation is reused across the steps of a learning rate schedule.
PROX_STEP_RATIO = 1.1
#: With ``inference="map"`` the prior's update waits while its summed step times ``max(1/d)`` (the
#: largest relative move it makes) is at most this; it is then applied in one proximal step.
LAZY_PRIOR_STEP = 0.05


class PriorUpdate(str, Enum):
    """How the prior term enters the parameter update.

    - ``"auto"``: ``"proximal"`` when the optimizer is plain :class:`torch.optim.SGD`,
      ``"gradient"`` otherwise (adaptive optimizers bound their own step sizes);
    - ``"proximal"``: the optimizer steps on the task loss (and head term); after every step the
      prior term is applied as an exact proximal step with step size ``lr / N`` (see
      :meth:`~sklearn_bayes_transfer.penalty.PriorPenalty.prox_`; a prior loose for the step is
      applied every few steps with their summed step, docs/deviations.md #8). Stable for every
      ``prior_scale``, with or without momentum, since momentum only carries the task gradient.
    - ``"gradient"``: the whole prior term through the gradient, as the paper's code does. With
      SGD it diverges once ``lr / (N min(d)) > 2``.
    """

    AUTO = "auto"
    PROXIMAL = "proximal"
    GRADIENT = "gradient"


class _FiniteWeightsGuard(Callback):
    """Stop at the end of an epoch whose update left non-finite weights."""

    def on_epoch_end(self, net, **kwargs):
        for name, param in net.module_.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise TrainingDivergedError(
                    f"parameter {name!r} became NaN/Inf in epoch {len(net.history)}; {net._divergence_advice()}")


class PriorRegularizedMixin(BayesianInferenceMixin):
    """Prior-regularised fine-tuning for a skorch net (put it before the net class).

    Subclasses set the hyperparameters ``prior``, ``prior_scale``, ``prior_eps``,
    ``prior_structure``, ``head_weight_decay``, ``prior_update``, ``factor_dtype``,
    ``preprocess`` and the recipe's ``min_steps``, ``lr_schedule``, ``warmup``, ``augment`` and
    ``batchnorm`` in ``__init__`` and implement :meth:`_build_head` and :meth:`_augment_batch`
    (and, for other kinds of targets than class labels, the target handling). Bayesian inference (``inference``,
    ``n_samples``, ... : SWAG or SGLD samples and model averaging in ``predict_proba``) comes from
    :class:`~sklearn_bayes_transfer.bayes.BayesianInferenceMixin`, whose hyperparameters they set too.
    """

    #: Constraints of the hyperparameters this mixin adds (and of skorch's it relies on), checked by
    #: :meth:`fit` as scikit-learn checks ``_parameter_constraints``; subclasses add theirs.
    _parameter_constraints: dict[str, list[Any]] = {
        "prior_scale": [Interval(Real, 0, None, closed="neither"), Options({"auto", "evidence"})],
        "prior_scale_bounds": [None, tuple, list],
        "prior_eps": [Interval(Real, 0, None, closed="left")],
        "prior_structure": [Options(PriorStructure)],
        "head_weight_decay": [Interval(Real, 0, None, closed="left")],
        "prior_update": [Options(PriorUpdate)],
        "factor_dtype": [None, Options({"float32", "bfloat16", "float16"}), torch.dtype],
        "max_epochs": [None, Interval(Integral, 1, None)],
        "min_steps": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None)],  # 0 is allowed: a fit that only builds the network
        "batch_size": [Interval(Integral, 1, None), Interval(Integral, -1, -1)],
        "lr_schedule": [Options(LRSchedule)],
        "warmup": [Interval(Real, 0, 1, closed="left")],
        "augment": [Options(Augment), "callable"],
        "batchnorm": [Options(BatchNormUpdate)],
        "random_state": [None, Interval(Integral, 0, None)],
        "device": [None, str, torch.device],
    }

    @classmethod
    def _all_parameter_constraints(cls) -> dict[str, list[Any]]:
        merged: dict[str, list[Any]] = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("_parameter_constraints", {}))
        return merged

    #: Whether ``preprocess="auto"`` resizes inputs to the prior's recorded image size (a
    #: classifier's pooled features expect the source geometry; a segmenter reads any size).
    _resize_to_prior = True

    # -- the prior ------------------------------------------------------------------------------
    def _resolve_prior(self) -> Prior | None:
        prior = self.prior
        if prior is None or isinstance(prior, Prior):
            return prior
        if isinstance(prior, (str, Path)):
            return Prior.load(prior)
        raise ConfigError(f"prior must be a Prior, a path to a prior file or None, got {type(prior).__name__}")

    def _structure(self) -> PriorStructure:
        structure = check_choice(PriorStructure, self.prior_structure, "prior_structure")
        if self.prior is None:
            # Without a prior there is nothing to regularise towards: plain fine-tuning.
            return PriorStructure.NONE
        return structure

    def _check_prior_hyperparameters(self, *, fitting: bool = True) -> None:
        """Validate the hyperparameters; ``fitting=False`` (a rebuilt fitted model) skips what only training needs."""
        constraints = self._all_parameter_constraints()
        check_params({name: getattr(self, name) for name in constraints}, constraints)
        if isinstance(self.device, str):
            resolve_device(self.device)
        self._check_inference_hyperparameters()
        if isinstance(self.prior_scale, str) and self.prior_scale == "evidence":
            if fitting and self._structure() is PriorStructure.NONE:
                raise ConfigError("prior_scale='evidence' chooses the scale of a prior term, but there is none "
                                  "(prior_structure='none' or no prior); give a prior and a prior_structure, or a "
                                  "numeric prior_scale")
            resolve_scale_bounds(self.prior_scale_bounds, None)
        if check_choice(Inference, self.inference, "inference") is Inference.LAPLACE and not self.head_weight_decay:
            raise ConfigError("inference='laplace' needs a proper Gaussian prior on the head, head_weight_decay > 0 "
                              "(with 0 the head's posterior has infinite variance where the data give no curvature)")
        if self.prior is None and self.module is None:
            raise ConfigError(f"{type(self).__name__} needs prior=... (a Prior or a prior file, from which the "
                              "backbone is rebuilt) or module=... (your own network)")

    # -- fitted state ---------------------------------------------------------------------------
    @property
    def classes_(self) -> np.ndarray:
        """The class labels (ids for a segmenter), in the order of ``predict_proba``'s columns."""
        try:
            return self.classes_fitted_
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute 'classes_' before fit") from None

    def __sklearn_is_fitted__(self) -> bool:
        return bool(getattr(self, "initialized_", False)) and hasattr(self, "classes_fitted_")

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet; call 'fit' first")

    # -- preprocessing --------------------------------------------------------------------------
    def _fit_preprocess(self, X: Any) -> Preprocess | None:
        """``preprocess_`` for this fit: as given, from the prior's metadata, or fitted on X."""
        choice = self.preprocess
        if choice is None or isinstance(choice, Preprocess):
            return choice
        if isinstance(choice, dict):
            return Preprocess.from_meta(choice)
        if choice != "auto":
            raise ConfigError(f"preprocess={choice!r} is not valid; expected 'auto', None, a Preprocess or a dict "
                              "like {'image_size': [H, W], 'channels': C, 'mean': [...], 'std': [...]}")
        meta = self.prior_.meta.get("preprocess") if self.prior_ is not None else None
        if meta:
            recorded = Preprocess.from_meta(meta, error=DataError)
            return recorded if self._resize_to_prior else dataclasses.replace(recorded, image_size=None)
        if _is_array_like(X):
            return Preprocess.fit(_reshape_rows(X, None))
        return None

    def _validate_X(self, X: Any, *, reset: bool) -> Any:
        """Array-likes (lists, pandas, object arrays) as numeric numpy arrays; tensors and Datasets as given.

        scikit-learn's ``check_array`` refuses sparse, complex, empty and NaN/inf input with its
        usual messages (``ValueError`` becomes :class:`DataError`). ``reset=True`` records
        ``n_features_in_`` (elements per example); otherwise 2-D rows must have that many columns.
        """
        if isinstance(X, torch.utils.data.Dataset):
            if reset:
                self.__dict__.pop("n_features_in_", None)
            return X
        if not isinstance(X, torch.Tensor):
            try:
                X = check_array(X, accept_sparse=False, dtype="numeric", allow_nd=True, ensure_all_finite=True)
            except ValueError as exc:
                raise DataError(f"X: {exc}") from None
        n_features = int(np.prod(X.shape[1:])) if X.ndim >= 2 else None
        if reset:
            self.n_features_in_ = n_features
        elif X.ndim == 2 and getattr(self, "n_features_in_", None) not in (None, n_features):
            raise DataError(f"X has {n_features} features, but {type(self).__name__} is expecting "
                            f"{self.n_features_in_} features as input (rows of a 2-D X are flattened images)")
        return X

    def _prepare_X(self, X: Any) -> Any:
        """Images as a float32 tensor (arrays) or a lazily preprocessed dataset (datasets)."""
        if isinstance(X, torch.utils.data.Dataset):
            return TransformedDataset(X, self.preprocess_)
        return prepare_images(_reshape_rows(X, self.preprocess_), self.preprocess_)

    # -- skorch hooks -----------------------------------------------------------------------------
    def fit(self, X, y=None, **fit_params):
        """Fine-tune on images ``X`` and targets ``y`` (see the estimator's docstring).

        Learns the targets' encoding and the preprocessing, then runs skorch's ``fit``. With
        ``random_state`` set, the whole fit (head initialisation, shuffling, dropout, sampling) is
        reproducible and torch's global RNG is left untouched.
        """
        self._join_processes()
        X, y = self._fit_inputs(X, y)
        fresh = not self.warm_start or not getattr(self, "initialized_", False)
        X = self._validate_X(X, reset=fresh)
        if fresh:
            y = self._learn_targets(X, y)
            self._check_prior_hyperparameters()
            self.prior_ = self._resolve_prior()
            self.preprocess_ = self._fit_preprocess(X)
        Xt, yt = self._prepare_Xy(X, y)
        first = Xt[0][0] if isinstance(Xt, torch.utils.data.Dataset) else Xt[0]
        self.input_shape_ = tuple(first.shape)
        # skorch's fit calls partial_fit, which must not prepare the data a second time.
        self._in_fit_ = True
        try:
            with seeded(getattr(self, "random_state", None), resolve_device(self.device)):
                return super().fit(Xt, yt, **fit_params)
        finally:
            del self._in_fit_

    # -- data parallelism (launched with torchrun / accelerate launch: docs/resume.md) --------------
    def _join_processes(self) -> None:
        """Launched with several processes: join their group, train on this process's device."""
        processes = launched_processes()
        if processes > 1 and isinstance(self.inference, str) and self.inference == "sgld":
            raise ConfigError(f"inference='sgld' cannot train on {processes} processes: its noise would differ from "
                              "process to process; run it in one process, or use inference='swag' or 'map'")
        _, self._processes_, device = start_processes(resolve_device(self.device))
        if self._processes_ > 1:
            self.device = device  # this process's accelerator (cuda:LOCAL_RANK), as skorch resolves "auto"

    def _data_parallel(self) -> bool:
        return getattr(self, "_processes_", 1) > 1

    def train_step_single(self, batch, **fit_params):
        """skorch's step; on several processes the gradients are then averaged over them (as DDP does)."""
        step = super().train_step_single(batch, **fit_params)
        if self._data_parallel():
            average_gradients_(list(self.module_.parameters()))
        return step

    def get_iterator(self, dataset, training=False):
        """skorch's iterator; training batches come out augmented (so the step and every callback see the
        batch the network trained on), and on several processes each is shared out between them."""
        if not training:
            return super().get_iterator(dataset, training=training)
        loader = self._shard_iterator(dataset) if self._data_parallel() else \
            super().get_iterator(dataset, training=training)
        augment = check_augment(self.augment)
        if augment is Augment.NONE:
            return loader
        return _AugmentedBatches(loader, functools.partial(self._augment_batch, augment))

    def _shard_iterator(self, dataset: Any) -> Any:
        """This process's share of every training batch (:class:`ShardSampler`)."""
        kwargs = self.get_params_for("iterator_train")
        batch_size = int(kwargs.pop("batch_size", self.batch_size))
        processes = self._processes_
        if batch_size % processes:
            raise ConfigError(f"batch_size={batch_size} cannot be split over {processes} processes; use a multiple "
                              f"of {processes}")
        share = batch_size // processes
        sampler = ShardSampler(dataset, num_replicas=processes, rank=torch.distributed.get_rank(),
                               shuffle=bool(kwargs.pop("shuffle", True)),
                               seed=int(getattr(self, "random_state", None) or 0))
        if kwargs.get("drop_last") is None:  # TrainLoader's rule, for this process's share of the data
            kwargs["drop_last"] = small_last_batch(len(sampler), share)
        return self.iterator_train(dataset, batch_size=share, sampler=sampler, shuffle=False, **kwargs)

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        """Continue training on more data (the first call fits), with a new learning rate schedule."""
        if not getattr(self, "_in_fit_", False):
            if not getattr(self, "initialized_", False):
                return self.fit(X, y, **fit_params)
            X, y = self._fit_inputs(X, y)
            X = self._validate_X(X, reset=False)
            X, y = self._prepare_Xy(X, y)
        # Planned before skorch notifies on_train_begin: the callbacks read the plan there.
        self.training_plan_ = self._plan_training(X, y, fit_params)
        self._prior_value_cache_ = self._pending_prior_steps_ = None
        self._interrupted_ = False
        self._resumed_epochs_ = 0
        if self._data_parallel():
            broadcast_(list(self.module_.state_dict().values()))  # one starting point, as DDP's
        result = super().partial_fit(X, y, classes=classes, **fit_params)
        if self._interrupted_:
            # skorch ends training quietly on Ctrl-C and returns the half-trained net as if fitted.
            raise KeyboardInterrupt(f"training interrupted in epoch {len(self.history)}; the estimator is only "
                                    "partly trained")
        return result

    def _plan_training(self, X: Any, y: Any, fit_params: dict[str, Any]) -> TrainingPlan:
        """Epochs of this fit (``max_epochs``, or enough for ``min_steps`` steps) and its sampling phase."""
        split_params = {k: v for k, v in fit_params.items() if not k.startswith("_")}
        train, _ = self.get_split_datasets(X, y, **split_params)
        steps = len(self.get_iterator(train, training=True))
        epochs = int(self.max_epochs) if self.max_epochs is not None else epochs_for_steps(steps, self.min_steps)
        sampling = self._check_inference_hyperparameters(epochs)
        return TrainingPlan(epochs=epochs, steps_per_epoch=steps, n_train=len(train), sampling=sampling)

    def fit_loop(self, X, y=None, epochs=None, **fit_params):
        """skorch's training loop, for ``epochs`` or else the epochs of :attr:`training_plan_`."""
        if epochs is None:
            # A fit resumed from a checkpoint (FitCheckpoint) trains the epochs that remain.
            epochs = self.training_plan_.epochs - getattr(self, "_resumed_epochs_", 0)
        try:
            return super().fit_loop(X, y, epochs=epochs, **fit_params)
        except KeyboardInterrupt:
            # skorch's EarlyStopping ends training by raising KeyboardInterrupt too: that is a finished fit.
            self._interrupted_ = not self._stopped_early()
            raise

    def _stopped_early(self) -> bool:
        return any(isinstance(cb, EarlyStopping) and getattr(cb, "misses_", 0) >= cb.patience
                   for _, cb in getattr(self, "callbacks_", []))

    def _fit_inputs(self, X: Any, y: Any) -> tuple[Any, Any]:
        """Hook: checks and unpacking of ``(X, y)`` before validation (identity by default)."""
        return X, y

    def initialize(self):
        """skorch's initialisation, with ``device="auto"`` resolved first (to ``"cuda"`` when a GPU is
        visible, else ``"cpu"``): skorch places tensors with ``device`` itself, and rewrites it the same
        way when it loads a net on a machine without CUDA."""
        if isinstance(self.device, str) and self.device == "auto":
            self.device = resolve_device("auto")
        return super().initialize()

    def initialize_module(self):
        """Build the default module (prior's backbone + new head) or the user's, then bind the prior."""
        if not getattr(self, "_in_fit_", False):
            # fit has checked the hyperparameters and loaded the prior already.
            self._check_prior_hyperparameters(fitting=False)
            self.prior_ = self._resolve_prior()
        if self.module is None:
            backbone = backbone_from_meta(self.prior_.meta)
            _load_prior_state(backbone, self.prior_)
            self.module_ = self.assemble_network(backbone, self._build_head(backbone))
        else:
            super().initialize_module()
        self._bind_prior()
        return self

    def _bind_prior(self) -> None:
        structure = self._structure()
        covered: list[nn.Parameter] = []
        self.penalty_ = None
        self.prior_scale_ = None
        if structure is not PriorStructure.NONE:
            covered = [p for _, p in named_parameters_for(self.prior_, self.module_)]
            self.prior_scale_ = resolve_prior_scale(self.prior_scale, self.prior_)
            self.penalty_ = PriorPenalty(self.prior_, scale=self.prior_scale_, eps=float(self.prior_eps),
                                         structure=structure, factor_dtype=_factor_dtype(self.factor_dtype))
        ids = {id(p) for p in covered}
        self.prior_params_ = covered
        if self.module is None or structure is PriorStructure.NONE and self.prior is not None:
            # The default module: everything outside the backbone is the new head.
            head = [p for n, p in self.module_.named_parameters() if not n.startswith("backbone.")]
        else:
            head = [p for p in self.module_.parameters() if id(p) not in ids]
        self.head_params_ = [p for p in head if id(p) not in ids]

    def initialize_optimizer(self, *args, **kwargs):
        """skorch's optimizer, then ``prior_update_``: how the prior enters this optimizer's updates."""
        super().initialize_optimizer(*args, **kwargs)
        rule = PriorUpdate(self.prior_update)
        if rule is PriorUpdate.AUTO:
            rule = PriorUpdate.PROXIMAL if type(self.optimizer_) is torch.optim.SGD else PriorUpdate.GRADIENT
        self.prior_update_ = rule.value
        return self

    def _update_rule(self) -> PriorUpdate:
        return PriorUpdate(self.prior_update_)

    def get_split_datasets(self, X, y=None, **fit_params):
        self._check_split(y)
        train, valid = super().get_split_datasets(X, y, **fit_params)
        self.n_train_ = len(train)
        return train, valid

    def _check_split(self, y: Any) -> None:
        """Hook: refuse a validation split the targets cannot support (nothing to check by default)."""

    def predict(self, X) -> np.ndarray:
        """Predicted labels (values of ``classes_``): one per image, or a mask ``(N, H, W)`` per image for a
        segmenter, at the inputs' size."""
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ exists
        return self.classes_[proba.argmax(axis=1)]

    def _task_loss(self, y_pred, y_true, X=None, training=False):
        """The criterion's loss (skorch's ``get_loss``); estimators adapt it to their targets."""
        return super().get_loss(y_pred, y_true, X=X, training=training)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        task = self._task_loss(y_pred, y_true, X=X, training=training)
        if not training:
            return task
        n = max(int(getattr(self, "n_train_", 1)), 1)
        prior_value = task.new_zeros(())
        loss = task
        if self.penalty_ is not None:
            # With the proximal step the prior acts in train_step; its value is added for the log (and
            # train_loss) without a gradient.
            prior_value = task.new_tensor(self._current_prior_value()) \
                if self._update_rule() is PriorUpdate.PROXIMAL else self.penalty_(self.prior_params_)
            loss = loss + prior_value / n
        head_value = task.new_zeros(())
        if self.head_weight_decay and self.head_params_:
            head_value = 0.5 * float(self.head_weight_decay) * sum(p.pow(2).sum() for p in self.head_params_)
            loss = loss + head_value / n
        task_v, prior_v, head_v = (float(t.detach()) for t in (task, prior_value, head_value))
        if not math.isfinite(float(loss.detach())):
            raise TrainingDivergedError(
                f"the training loss became {float(loss.detach())} in epoch {len(self.history)} (task loss "
                f"{task_v:.4g}, prior term {prior_v / n:.4g}); {self._divergence_advice()}; training stopped before "
                "taking that step")
        self.history.record_batch("task_loss", task_v)
        self.history.record_batch("prior_nll", prior_v / n)
        self.history.record_batch("head_nll", head_v / n)
        return loss

    def _divergence_advice(self) -> str:
        rule = self._update_rule()
        advice = "lower lr"
        if self.penalty_ is not None and rule is PriorUpdate.GRADIENT:
            advice += (", use optimizer=torch.optim.SGD with prior_update='proximal' (stable for every prior_scale), "
                       "raise prior_scale or set prior_eps > 0")
        return advice

    def get_params_for_optimizer(self, prefix, named_parameters):
        """skorch's optimizer arguments; plain SGD gets momentum 0.9 unless told otherwise (0 for SGLD)."""
        args, kwargs = super().get_params_for_optimizer(prefix, named_parameters)
        if prefix == "optimizer" and self.optimizer is torch.optim.SGD and "momentum" not in kwargs:
            sgld = check_choice(Inference, self.inference, "inference") is Inference.SGLD
            kwargs["momentum"] = 0.0 if sgld else DEFAULT_MOMENTUM
        return args, kwargs

    def train_step(self, batch, **fit_params):
        step = super().train_step(batch, **fit_params)
        if self.penalty_ is not None and self._update_rule() is PriorUpdate.PROXIMAL:
            self._proximal_step()
        return step

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        """skorch's epoch; a training epoch ends with the prior's deferred steps applied."""
        super().run_single_epoch(iterator, training, prefix, step_fn, **fit_params)
        if training and iterator is not None:
            self._flush_prior_steps()
            if self._data_parallel():
                # Every process's BatchNorm statistics saw its own share: keep the main one's (as DDP).
                broadcast_(list(self.module_.buffers()))

    @torch.no_grad()
    def _proximal_step(self) -> None:
        """The prior's update after an optimizer step of rate ``lr``: step ``lr / N`` (see :class:`PriorUpdate`).

        The steps are summed into a pending step, applied as an exact proximal step whose size is
        rounded down to a power of :data:`PROX_STEP_RATIO` (the rest stays pending), so that its
        K x K factorisation is reused across a learning rate schedule. With ``inference="map"``
        the pending step is deferred while ``step * max(1/d) <= LAZY_PRIOR_STEP`` (a prior that
        is loose for the step moves the weights by at most that fraction per update), and the end
        of every training epoch applies what is pending. SGLD, whose noise is shaped for each
        step's proximal map, takes every step exactly.
        """
        steps = self._current_prior_steps()
        inference = check_choice(Inference, self.inference, "inference")
        if inference is Inference.SGLD:
            self._apply_prior_steps(steps, exact=True)
            return
        pending = self._pending_prior_steps_ or [0.0] * len(steps)
        pending = [a + b for a, b in zip(pending, steps)]
        deferrable = inference in (Inference.MAP, Inference.LAPLACE)  # no samples taken during training
        if deferrable and max(pending, default=0.0) * self.penalty_.max_precision <= LAZY_PRIOR_STEP:
            self._pending_prior_steps_ = pending
            return
        taken = [_round_down(s, PROX_STEP_RATIO) for s in pending]
        self._pending_prior_steps_ = [a - b for a, b in zip(pending, taken)]
        self._apply_prior_steps(taken, exact=True)

    def _current_prior_steps(self) -> list[float]:
        n = max(int(getattr(self, "n_train_", 1)), 1)
        lr_of = {}
        for group in self.optimizer_.param_groups:
            for p in group["params"]:
                lr_of[id(p)] = float(group["lr"])
        return [lr_of.get(id(p), 0.0) / n for p in self.prior_params_]

    @torch.no_grad()
    def _flush_prior_steps(self) -> None:
        """Apply the pending prior step: explicitly where that is accurate, else exactly."""
        pending = getattr(self, "_pending_prior_steps_", None)
        self._pending_prior_steps_ = None
        if self.penalty_ is None or not pending or not any(pending):
            return
        self._apply_prior_steps(pending, exact=max(pending) * self.penalty_.max_precision > LAZY_PRIOR_STEP)

    def _apply_prior_steps(self, steps: list[float], *, exact: bool) -> None:
        update = self.penalty_.prox_ if exact else self.penalty_.explicit_step_
        value = update(self.prior_params_, steps)
        self._prior_value_cache_ = (self._param_versions(), value)

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.prior_params_)

    def _current_prior_value(self) -> float:
        """The prior term for the log: its value after the latest prior update of this fit.

        That is the value at the current weights, except with ``inference="map"`` while the update
        is deferred (then it is the value at the latest update, at most a few steps old); a fit's
        first step computes it.
        """
        cached = getattr(self, "_prior_value_cache_", None)
        if cached is None or (cached[0] != self._param_versions()
                              and self.inference not in (Inference.MAP, Inference.LAPLACE)):
            with torch.no_grad():
                value = float(self.penalty_(self.prior_params_))
            self._prior_value_cache_ = (self._param_versions(), value)
        return self._prior_value_cache_[1]

    # -- the evidence of the prior scale ----------------------------------------------------------
    #: How an example's log-likelihood combines its output positions (``"mean"``: the segmenter's
    #: per-pixel average), for the curvature.
    _likelihood_positions = "sum"

    def _likelihood_logits(self, output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The logits of the likelihood from the module's output (the segmenter resizes them)."""
        return output

    def _set_prior_scale(self, scale: float) -> None:
        """Use ``scale`` from now on: a new penalty (pending prior steps must be applied first)."""
        if self._data_parallel():
            value = torch.tensor(float(scale), dtype=torch.float64, device=self.device)
            broadcast_([value])  # the evidence is estimated on every process; the main one's counts
            scale = float(value)
        self.prior_scale_ = float(scale)
        self.penalty_ = PriorPenalty(self.prior_, scale=self.prior_scale_, eps=float(self.prior_eps),
                                     structure=self._structure(), factor_dtype=_factor_dtype(self.factor_dtype))
        self._prior_value_cache_ = self._pending_prior_steps_ = None

    def _prior_residual(self) -> list[torch.Tensor]:
        """``w - mean`` per prior parameter, float64 on the CPU."""
        means = self.prior_.split(self.prior_.mean).values()
        return [p.detach().to("cpu", torch.float64) - m.to(torch.float64) for p, m in zip(self.prior_params_, means)]

    @torch.no_grad()
    def _curvature(self, dataset: Any, params: list[nn.Parameter], *,
                   max_examples: int = CURVATURE_MAX_EXAMPLES) -> tuple[list[torch.Tensor], float]:
        """Diagonal Fisher of the summed data term over ``params``, and ``log p(D | w)``.

        Both from up to ``max_examples`` examples of ``dataset`` (a random subset, then scaled to
        all of it), with the module in evaluation mode (see :mod:`~sklearn_bayes_transfer.curvature`).
        """
        n = len(dataset)
        if n > max_examples:
            dataset = torch.utils.data.Subset(dataset, torch.randperm(n)[:max_examples].tolist())
        inputs, log_lik = [], 0.0
        was_training = self.module_.training
        self.module_.eval()
        try:
            for Xi, yi in self.get_iterator(dataset, training=False):
                x = to_device(Xi, self.device)
                loss = self.get_loss(self.module_(x), to_device(yi, self.device), X=x, training=False)
                log_lik -= float(loss) * len(x)
                inputs.append(x)
        finally:
            self.module_.train(was_training)
        with torch.enable_grad():
            h = diagonal_fisher(self.module_, params, inputs, positions=self._likelihood_positions,
                                logits=self._likelihood_logits, chunk_size=max(1, min(16, int(self.batch_size))))
        factor = n / len(dataset)
        return [t.mul_(factor) for t in h], log_lik * factor

    def evidence_curve(self, X: Any, y: Any, scales: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The Laplace log evidence of prior scales, at the fitted weights.

        ``log p(y | X, lambda) ~ log p(y | X, w) - 0.5 r^T Sigma_tilde(lambda)^{-1} r
        - 0.5 log det(I + Sigma_tilde(lambda) H)`` with the diagonal Fisher ``H`` over the backbone
        on ``(X, y)`` (see docs/evidence.md). The weights stay those fitted at ``prior_scale_``;
        for scales far from it the curve is a first look, not a refit.

        Parameters
        ----------
        X, y : array-like
            Training images and targets, as for :meth:`fit`.
        scales : array-like of float, optional
            Scales to evaluate (default: 4 per decade over ``prior_scale_bounds``).

        Returns
        -------
        scales, log_evidence : numpy.ndarray

        Examples
        --------
        >>> scales, values = clf.evidence_curve(X, y)              # doctest: +SKIP
        >>> plt.semilogx(scales, values)                           # doctest: +SKIP
        """
        self._check_fitted()
        if self.penalty_ is None:
            raise ConfigError("evidence_curve needs a prior term; this estimator was fitted without one "
                              "(prior_structure='none' or no prior)")
        grid = evidence_grid(resolve_scale_bounds(self.prior_scale_bounds, self.prior_)) if scales is None \
            else np.asarray(scales, dtype=np.float64).reshape(-1)
        X, y = self._fit_inputs(X, y)
        Xt, yt = self._prepare_Xy(self._validate_X(X, reset=False), y)
        h, log_lik = self._curvature(self.get_dataset(Xt, yt), self.prior_params_)
        values = log_evidence(self.prior_, self._prior_residual(), h, grid, eps=float(self.prior_eps),
                              structure=self._structure(), data_term=log_lik)
        return grid, values

    @property
    def _default_callbacks(self):
        # No validation here (set_params re-initialises callbacks): fit checks the values first.
        recipe = []
        if isinstance(self.lr_schedule, str) and self.lr_schedule == LRSchedule.COSINE:
            recipe.append(("lr_schedule", WarmupCosineLR(self.warmup)))
        if isinstance(self.batchnorm, str) and self.batchnorm == BatchNormUpdate.RECOMPUTE:
            recipe.append(("batchnorm", RecomputeBatchNorm()))
        return [
            *super()._default_callbacks,
            ("task_loss", PassthroughScoring(name="task_loss", on_train=True)),
            ("prior_nll", PassthroughScoring(name="prior_nll", on_train=True)),
            ("finite_weights", _FiniteWeightsGuard()),
            ("evidence", EvidencePriorScale()),
            *recipe,
        ]

    # -- to implement --------------------------------------------------------------------------
    def _build_head(self, backbone: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _augment_batch(self, augment: Any, X: Any, y: Any) -> tuple[Any, Any]:  # pragma: no cover - abstract
        """One training batch ``(X, y)`` augmented with ``augment`` (a checked :class:`Augment` or callable)."""
        raise NotImplementedError

    def _learn_targets(self, X: Any, y: Any) -> Any:  # pragma: no cover - abstract
        """Learn ``classes_`` from the targets; return them in the form ``_prepare_Xy`` takes."""
        raise NotImplementedError

    def _prepare_Xy(self, X: Any, y: Any) -> tuple[Any, Any]:  # pragma: no cover - abstract
        """Preprocessed inputs and encoded targets, ready for skorch."""
        raise NotImplementedError

    @classmethod
    def assemble_network(cls, backbone: nn.Module, head: nn.Module) -> nn.Module:
        """The default network from the rebuilt backbone and the new head.

        It keeps the backbone as its ``backbone`` child (the prior binds under ``backbone.`` and
        everything else counts as head). Segmentation wraps them differently. A classmethod, so
        that a model file can be turned back into the network (:mod:`~sklearn_bayes_transfer.modelfile`).
        """
        return BackboneWithHead(backbone, head)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Images (N, H, W) are 3-D arrays; 2-D rows are read as one-pixel-high images.
        tags.input_tags.three_d_array = True
        return tags

    def _example_input(self) -> torch.Tensor:
        """A one-image batch in the preprocessed geometry, to measure a backbone's output."""
        pre = getattr(self, "preprocess_", None)
        shape = getattr(self, "input_shape_", None)
        if shape is None:
            raise ConfigError("the input shape is unknown before fit")
        if pre is not None and pre.image_size is not None:
            shape = (pre.channels, *pre.image_size)
        return torch.zeros(1, *shape)


# -- helpers --------------------------------------------------------------------------------------
class _AugmentedBatches:
    """A training iterator whose batches are augmented as they come out of ``loader``."""

    def __init__(self, loader: Any, augment: Any) -> None:
        self.loader = loader
        self.augment = augment

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield self.augment(*unpack_data(batch))


def _round_down(step: float, ratio: float) -> float:
    """``step`` rounded down to a power of ``ratio`` (0 stays 0; a ratio of 1 leaves it as it is).

    Examples
    --------
    >>> _round_down(1.0, 1.1), round(_round_down(0.05, 1.1), 5)
    (1.0, 0.04736)
    """
    if step <= 0 or ratio <= 1:
        return max(step, 0.0)
    power = math.floor(math.log(step) / math.log(ratio) + 1e-9)
    return float(ratio ** power)


def _factor_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in FACTOR_DTYPES:
        raise ConfigError(f"factor_dtype={value!r} is not valid; expected None, 'float32', 'bfloat16' or 'float16'")
    return FACTOR_DTYPES[value]


def _load_prior_state(backbone: nn.Module, prior: Prior) -> None:
    """Initialise a rebuilt backbone at the prior mean, with the prior's buffers."""
    params = named_parameters_for(prior, backbone)
    with torch.no_grad():
        for (_, p), value in zip(params, prior.split(prior.mean).values()):
            p.copy_(value)
        own = dict(backbone.named_buffers())
        for name, value in prior.buffers.items():
            if name not in own:
                raise PriorMismatchError(f"prior buffer {name!r} has no counterpart in the rebuilt backbone")
            if own[name].shape != value.shape:
                raise PriorMismatchError(f"prior buffer {name!r} has shape {tuple(value.shape)}, "
                                         f"the backbone's has {tuple(own[name].shape)}")
            own[name].copy_(value)


def _is_array_like(X: Any) -> bool:
    return isinstance(X, (np.ndarray, torch.Tensor, list, tuple))


def _reshape_rows(X: Any, preprocess: Preprocess | None) -> Any:
    """2-D input ``(N, F)``: images flattened to rows.

    Reshaped to the prior's ``(C, H, W)`` when ``F`` matches it, else read as one-pixel-high
    grey images ``(N, 1, 1, F)`` (so feature vectors and sklearn's own checks run).
    """
    if not isinstance(X, (np.ndarray, torch.Tensor)) or X.ndim != 2:
        return X
    n, f = X.shape
    if preprocess is not None and preprocess.image_size is not None:
        c, (h, w) = preprocess.channels, preprocess.image_size
        if c * h * w == f:
            return X.reshape(n, c, h, w)
    return X.reshape(n, 1, 1, f)

"""The default fine-tuning recipe, shared by the estimators and every command.

What a fit does when the user sets nothing but the prior (see ``docs/recipe.md`` for the
measurements behind each choice):

- **A step budget, not an epoch count.** With ``max_epochs=None`` a fit runs the fewest whole
  epochs that make at least ``min_steps`` (500) optimizer steps: 100 images in batches of 32 get
  167 epochs, 50,000 images one. Counting epochs gave few-shot fits about 60 steps, far from
  converged.
- **SGD with momentum 0.9 at lr 0.05, linear warm-up over the first 10% of the steps, then cosine
  decay to zero** (:class:`WarmupCosineLR`; Loshchilov & Hutter 2017, Goyal et al. 2017). The
  proximal prior step follows the scheduled learning rate.
- **Light augmentation** (:mod:`~sklearn_bayes_transfer.augment`): small shifts, zooms and
  rotations, no flips.
- **BatchNorm statistics recomputed at the end of fit** over the (unaugmented) training images
  (:class:`RecomputeBatchNorm`), so that ``predict`` (eval mode) normalises with statistics of
  the final weights; training batches are shuffled and a last batch of fewer than a quarter of
  ``batch_size`` images is dropped (:class:`TrainLoader`): a batch of 4 gives BatchNorm
  statistics far from the others'.
- **Prior scale ``"auto"``** = ``lambda_0 * 10**3`` (:data:`AUTO_SCALE_DECADES`), with
  ``lambda_0 = mean(mean**2) / mean(variance)`` the prior's reference scale: the smallest scale at
  which the learned prior never cost accuracy on the transfer panel. Scale 1 (the posterior as
  learned) pins the backbone and lost up to 20 points.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from skorch.callbacks import Callback, EarlyStopping
from torch.utils.data import DataLoader

from .batchnorm import batchnorm_inputs, recompute_batchnorm
from .exceptions import ConfigError
from .prior import Prior
from .sampling import SamplingPlan

__all__ = [
    "AUTO_SCALE_DECADES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_MIN_STEPS",
    "DEFAULT_MOMENTUM",
    "DEFAULT_WARMUP",
    "BatchNormUpdate",
    "LRSchedule",
    "RecomputeBatchNorm",
    "TrainLoader",
    "TrainingPlan",
    "WarmupCosineLR",
    "epochs_for_steps",
    "resolve_prior_scale",
    "small_last_batch",
    "usable_reference_scale",
    "warmup_cosine_factor",
]

DEFAULT_LR = 0.05
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 32
DEFAULT_MIN_STEPS = 500
DEFAULT_WARMUP = 0.1
#: ``prior_scale="auto"`` is ``lambda_0 * 10**AUTO_SCALE_DECADES``.
AUTO_SCALE_DECADES = 3


class LRSchedule(str, Enum):
    """The learning rate over a fit.

    - ``"cosine"``: linear warm-up from ``lr / W`` to ``lr`` over the first ``W`` steps (``W`` =
      ``warmup`` times the steps), then cosine decay towards 0 (:func:`warmup_cosine_factor`);
    - ``"constant"``: ``lr`` throughout (use it with your own skorch ``LRScheduler`` callback).
    """

    COSINE = "cosine"
    CONSTANT = "constant"


class BatchNormUpdate(str, Enum):
    """What BatchNorm running statistics ``predict`` uses after fit.

    - ``"recompute"``: statistics recomputed over the training images (unaugmented, up to
      2,048 of them) for the final weights, as SWA does; predictions in eval mode then agree
      with the network that was trained;
    - ``"running"``: PyTorch's running averages of the training batches, as a plain loop leaves
      them (they lag behind the weights and mix in small batches).
    """

    RECOMPUTE = "recompute"
    RUNNING = "running"


@dataclass(frozen=True)
class TrainingPlan:
    """How long one fit trains, decided when it starts.

    Attributes
    ----------
    epochs : int
        Epochs of this fit.
    steps_per_epoch : int
        Optimizer steps per epoch (training batches).
    n_train : int
        Training examples (the ``N`` of the loss).
    sampling : SamplingPlan
        When Bayesian inference samples (for ``inference="map"``, never).
    """

    epochs: int
    steps_per_epoch: int
    n_train: int
    sampling: SamplingPlan

    @property
    def steps(self) -> int:
        """Optimizer steps of the whole fit."""
        return self.epochs * self.steps_per_epoch

    @property
    def schedule_epochs(self) -> int:
        """Epochs over which the learning rate schedule runs: those before Bayesian sampling
        starts (all of them for MAP); sampling sets its own learning rate."""
        return self.sampling.start

    @property
    def schedule_steps(self) -> int:
        """Optimizer steps of :attr:`schedule_epochs`."""
        return self.schedule_epochs * self.steps_per_epoch


def epochs_for_steps(steps_per_epoch: int, min_steps: int) -> int:
    """The fewest whole epochs that make at least ``min_steps`` optimizer steps.

    Examples
    --------
    >>> epochs_for_steps(3, 500), epochs_for_steps(1563, 500)
    (167, 1)
    """
    return max(1, math.ceil(int(min_steps) / max(int(steps_per_epoch), 1)))


def warmup_cosine_factor(step: int, total: int, warmup: float = DEFAULT_WARMUP) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``.

    Linear warm-up ``(step + 1) / W`` for the first ``W = round(warmup * total)`` steps, then
    ``0.5 * (1 + cos(pi * t))`` with ``t`` going from 0 to ``(total - W - 1) / (total - W)``:
    the last step still moves (by a small factor), and steps past ``total`` keep the last value.

    Examples
    --------
    >>> [round(warmup_cosine_factor(k, 10, warmup=0.2), 3) for k in range(10)]
    [0.5, 1.0, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038]
    """
    total = max(int(total), 1)
    warm = int(round(float(warmup) * total))
    step = min(int(step), total - 1)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


class WarmupCosineLR(Callback):
    """Warm-up and cosine decay of every parameter group's learning rate, step by step.

    The schedule spans the net's ``training_plan_.schedule_epochs`` of the current fit (set by
    the estimators when training starts). The base rates are the optimizer's at the start of the
    fit; they are put back when the schedule is over (Bayesian sampling then starts from them) and
    when the fit ends, so ``partial_fit`` starts a new schedule.

    Parameters
    ----------
    warmup : float, default=0.1
        Fraction of the scheduled steps spent warming up, in [0, 1).
    """

    def __init__(self, warmup: float = DEFAULT_WARMUP) -> None:
        self.warmup = warmup

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        plan = net.training_plan_
        self.base_lrs_ = [float(group["lr"]) for group in net.optimizer_.param_groups]
        self.total_ = plan.schedule_steps
        self.step_ = 0

    def on_batch_begin(self, net: Any, training: bool = False, **kwargs: Any) -> None:
        if training and self.step_ < self.total_:
            self._set(net, warmup_cosine_factor(self.step_, self.total_, self.warmup))

    def on_batch_end(self, net: Any, training: bool = False, **kwargs: Any) -> None:
        if not training:
            return
        self.step_ += 1
        if self.step_ == self.total_:
            # Before the next epoch begins: a sampling phase sets its own rate from there.
            self._set(net, 1.0)

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        if hasattr(self, "base_lrs_"):
            self._set(net, 1.0)

    def _set(self, net: Any, factor: float) -> None:
        for group, base in zip(net.optimizer_.param_groups, self.base_lrs_):
            group["lr"] = base * factor


class RecomputeBatchNorm(Callback):
    """At the end of fit, recompute BatchNorm statistics over the unaugmented training split.

    Uses :func:`~sklearn_bayes_transfer.batchnorm.recompute_batchnorm` on (up to 2,048 of) the
    training examples, never the validation split. A fit interrupted before its first epoch keeps
    its statistics.
    """

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        self.dataset_ = None
        self.data_ = (X, y)

    def on_epoch_begin(self, net: Any, dataset_train: Any = None, **kwargs: Any) -> None:
        self.dataset_ = dataset_train

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        dataset, self.dataset_ = getattr(self, "dataset_", None), None  # no reference kept after fit
        (X, y), self.data_ = getattr(self, "data_", (None, None)), None
        if getattr(net, "_interrupted_", False):
            return
        if dataset is None and getattr(net, "_resumed_epochs_", 0) and X is not None:
            dataset = net.get_split_datasets(X, y)[0]  # a finished fine-tune resumed: no epoch ran
        if dataset is None:
            return
        best = _best_weights_to_restore(net)
        if best is not None:
            net.module_.load_state_dict(best.best_model_weights_)  # the statistics are those of the kept weights
        inputs = batchnorm_inputs(dataset, int(net.batch_size), torch.Generator().manual_seed(0))
        recompute_batchnorm(net, inputs)
        if best is not None:
            # EarlyStopping loads its weights after this callback: give it the recomputed statistics.
            best.best_model_weights_ = copy.deepcopy(net.module_.state_dict())


def _best_weights_to_restore(net: Any) -> Any:
    """The EarlyStopping callback that will load its best weights at the end of this fit, if any."""
    for _, callback in getattr(net, "callbacks_", []):
        if isinstance(callback, EarlyStopping) and callback.load_best \
                and getattr(callback, "best_model_weights_", None) is not None \
                and callback.best_epoch_ != net.history[-1, "epoch"]:
            return callback
    return None


class TrainLoader(DataLoader):
    """The estimators' training ``DataLoader``: shuffles, and drops a last batch of fewer than a
    quarter of ``batch_size`` examples, unless told otherwise (``iterator_train__shuffle``,
    ``iterator_train__drop_last``).

    Unshuffled batches of data sorted by class (an image folder, read class by class) hold one
    class each, and BatchNorm's batch statistics then differ from class to class.

    Examples
    --------
    >>> import torch
    >>> data = torch.utils.data.TensorDataset(torch.zeros(100, 1))
    >>> len(TrainLoader(data, batch_size=32)), len(TrainLoader(data, batch_size=30))
    (3, 4)
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool = True, drop_last: bool | None = None,
                 **kwargs: Any) -> None:
        if drop_last is None:
            drop_last = small_last_batch(len(dataset), batch_size or 1)
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **kwargs)


def small_last_batch(n: int, batch_size: int) -> bool:
    """Whether ``n`` examples in batches of ``batch_size`` leave a last batch of under a quarter of one
    (``TrainLoader`` drops it: its BatchNorm statistics would be noise)."""
    return n > batch_size and 0 < n % batch_size < batch_size / 4


def usable_reference_scale(prior: Prior | None) -> float | None:
    """The prior's ``lambda_0`` (1.0 without a prior), or ``None`` when it is not a finite positive number."""
    ref = prior.reference_scale() if prior is not None else 1.0
    return float(ref) if math.isfinite(ref) and ref > 0 else None


def resolve_prior_scale(value: Any, prior: Prior | None, argument: str = "prior_scale") -> float:
    """The numeric scale for ``prior_scale``: a finite number > 0, ``"auto"`` or ``"evidence"``.

    ``"auto"`` is ``prior.reference_scale() * 10**AUTO_SCALE_DECADES`` (1.0 without a prior or
    for a prior whose variances are all zero); ``"evidence"`` starts there and is re-estimated
    during the fit (:mod:`~sklearn_bayes_transfer.evidence`).

    Examples
    --------
    >>> import torch
    >>> prior = Prior.from_module(torch.nn.Linear(2, 1, bias=False), variance=0.25)
    >>> resolve_prior_scale(2.0, prior), resolve_prior_scale("auto", prior) == prior.reference_scale() * 1e3
    (2.0, True)
    """
    if isinstance(value, str):
        if value not in ("auto", "evidence"):
            raise ConfigError(f"{argument}={value!r} is not valid; expected a number > 0, 'auto' "
                              f"(lambda_0 * 10**{AUTO_SCALE_DECADES}) or 'evidence'")
        ref = usable_reference_scale(prior)
        return 1.0 if ref is None else float(ref * 10.0 ** AUTO_SCALE_DECADES)
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value)) and float(value) > 0
    if not ok:
        raise ConfigError(f"{argument}={value!r} is not valid; expected a finite number > 0, 'auto' or 'evidence'")
    return float(value)

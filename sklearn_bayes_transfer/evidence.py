"""``prior_scale="evidence"``: the prior scale re-estimated from the training data during one fit.

A few times during training (``EVIDENCE_UPDATES``, evenly over the steps before any sampling
phase) the :class:`EvidencePriorScale` callback applies what is pending of the prior's update,
estimates the diagonal Fisher ``h`` of the data term over the backbone at the current weights
(:func:`~sklearn_bayes_transfer.curvature.diagonal_fisher`, on up to
``CURVATURE_MAX_EXAMPLES`` training examples, scaled to all ``N``), and sets the scale to the
maximiser of the Laplace log evidence over ``prior_scale_bounds``
(:func:`~sklearn_bayes_transfer.laplace.maximize_log_evidence`): a 1-D search over ``log lambda``,
each evaluation a pass over the factor, no refits. This is the online marginal-likelihood
scheme of Immer et al. (ICML 2021) for the one hyperparameter of a learned low-rank prior. The
chosen scales are logged in ``history`` (``prior_scale`` each epoch, ``log_evidence`` at updates)
and kept in ``evidence_trace_``. The maths, its assumptions and where it misleads are in
docs/evidence.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from skorch.callbacks import Callback

from .exceptions import ConfigError
from .laplace import maximize_log_evidence
from .prior import Prior
from .recipe import usable_reference_scale

__all__ = [
    "CURVATURE_MAX_EXAMPLES",
    "EVIDENCE_UPDATES",
    "SCALE_BOUNDS_DECADES",
    "EvidencePriorScale",
    "EvidenceWarning",
    "resolve_scale_bounds",
]

#: Times the scale is re-estimated during a fit.
EVIDENCE_UPDATES = 4
#: Training examples the curvature is estimated on (the sum is scaled to all of them).
CURVATURE_MAX_EXAMPLES = 1024
#: Default ``prior_scale_bounds``: ``lambda_0 * 10**low`` to ``lambda_0 * 10**high``.
SCALE_BOUNDS_DECADES = (-3, 9)


class EvidenceWarning(UserWarning):
    """An evidence update was skipped (non-finite curvature or evidence); the scale stays as it was."""


def resolve_scale_bounds(value: Any, prior: Prior | None) -> tuple[float, float]:
    """``prior_scale_bounds`` as two floats ``0 < low < high`` (``None``: around the prior's ``lambda_0``).

    Examples
    --------
    >>> resolve_scale_bounds((1e-2, 1e6), None)
    (0.01, 1000000.0)
    """
    if value is None:
        ref = usable_reference_scale(prior) or 1.0
        low, high = SCALE_BOUNDS_DECADES
        return ref * 10.0 ** low, ref * 10.0 ** high
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"prior_scale_bounds={value!r} is not valid; expected (low, high) with 0 < low < high") \
            from None
    if not (0 < low < high and math.isfinite(high)):
        raise ConfigError(f"prior_scale_bounds={value!r} is not valid; expected (low, high) with 0 < low < high")
    return low, high


def update_steps(total_steps: int, updates: int = EVIDENCE_UPDATES) -> list[int]:
    """The optimizer steps after which the scale is re-estimated: evenly inside ``total_steps``.

    Examples
    --------
    >>> update_steps(500), update_steps(3)
    ([100, 200, 300, 400], [1, 2])
    """
    return sorted({max(1, round(total_steps * k / (updates + 1))) for k in range(1, updates + 1)} - {total_steps}) \
        if total_steps > 1 else []


class EvidencePriorScale(Callback):
    """Re-estimates ``prior_scale_`` from the Laplace evidence during a fit (``prior_scale="evidence"``).

    The estimators add it as the default callback ``"evidence"``; it does nothing unless the
    net's ``prior_scale`` is ``"evidence"`` and there is a prior term. It calls the net's
    ``_flush_prior_steps``, ``_curvature``, ``_prior_residual`` and ``_set_prior_scale``.
    """

    def initialize(self) -> "EvidencePriorScale":
        self.active_ = False
        self.trace_: list[dict[str, float]] = []
        return self

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        self.initialize()
        if not (isinstance(net.prior_scale, str) and net.prior_scale == "evidence") or net.penalty_ is None:
            return
        plan = net.training_plan_
        self.at_ = update_steps(plan.schedule_steps)  # the scale is fixed while sampling
        self.bounds_ = resolve_scale_bounds(net.prior_scale_bounds, net.prior_)
        self.step_ = 0
        self.dataset_ = None
        self.active_ = True

    def on_epoch_begin(self, net: Any, dataset_train: Any = None, **kwargs: Any) -> None:
        self.dataset_ = dataset_train

    def on_batch_end(self, net: Any, training: bool = False, **kwargs: Any) -> None:
        if not (self.active_ and training):
            return
        self.step_ += 1
        if self.step_ in self.at_ and self.dataset_ is not None:
            self._update(net)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        if self.active_:
            net.history.record("prior_scale", float(net.prior_scale_))

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        if self.active_:
            net.evidence_trace_ = list(self.trace_)

    def _update(self, net: Any) -> None:
        net._flush_prior_steps()
        h, data_term = net._curvature(self.dataset_, net.prior_params_)
        current = float(net.prior_scale_)
        if not (math.isfinite(data_term) and all(bool(t.isfinite().all()) for t in h)):
            self._skip(f"the curvature of the data term is not finite at step {self.step_}", current)
            return
        scale, value = maximize_log_evidence(
            net.prior_, net._prior_residual(), h, self.bounds_, eps=float(net.prior_eps),
            structure=net._structure(), data_term=data_term)
        if not (math.isfinite(scale) and math.isfinite(value)):
            self._skip(f"the log evidence is not finite at step {self.step_}", current)
            return
        net._set_prior_scale(scale)
        self.trace_.append({"step": self.step_, "prior_scale": scale, "log_evidence": value})
        net.history.record("log_evidence", value)

    def _skip(self, why: str, current: float) -> None:
        warnings.warn(f"prior_scale='evidence': {why}; this update is skipped and prior_scale_ stays {current:.4g}",
                      EvidenceWarning, stacklevel=2)


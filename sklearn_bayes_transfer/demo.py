"""The embedded default job: transfer between halves of scikit-learn's digits.

A prior is fitted with SWAG on digits 0-4 (the source task); the downstream task is digits 5-9
with a few labels per class. Standard fine-tuning (the same network initialised at the source
weights, no prior) is compared with fine-tuning under the learned prior, and with logistic
regression on the pixels, on held-out images. No download is needed, and it takes about a minute
on two CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from .classifier import PriorRegularizedClassifier
from .datasets import load_digits_images
from .fitter import PriorFitter
from .prior import Prior
from .recipe import DEFAULT_MIN_STEPS
from .tuning import FINETUNE_DEFAULT, default_param_grid, prefer_default

__all__ = ["fit_digits_prior", "digits_transfer_demo"]


def fit_digits_prior(*, random_state: int = 0, max_epochs: int = 20, width: int = 16, rank: int = 10,
                     verbose: int = 0) -> Prior:
    """Fit a SWAG prior for a small CNN on digits 0-4 (snapshots every 5 steps of the second half)."""
    X, y = load_digits_images()
    source = y < 5
    fitter = PriorFitter(backbone="small_cnn", backbone_kwargs={"width": width}, max_epochs=max_epochs,
                         swag_start=max_epochs // 2, lr=0.05, swag_lr=0.02, rank=rank, batch_size=64,
                         collect_unit="step", collect_every=5,
                         random_state=random_state, verbose=verbose)
    return fitter.fit(X[source], y[source]).prior_


def _few_shot_split(y: np.ndarray, labels_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(y == c), labels_per_class, replace=False)
                            for c in np.unique(y)])
    test = np.setdiff1d(np.arange(len(y)), train)
    return train, test


def digits_transfer_demo(
    *,
    labels_per_class: int = 10,
    seeds: Sequence[int] = (0,),
    max_epochs: int | None = None,
    min_steps: int = DEFAULT_MIN_STEPS,
    prior: Prior | None = None,
    tune_cv: int = 3,
    verbose: int = 0,
) -> list[dict[str, Any]]:
    """Standard fine-tuning vs the learned prior on digits 5-9, few labels per class, beside a
    one-line baseline.

    For each seed, ``labels_per_class`` training images per class are drawn and the rest of
    digits 5-9 is the test set. Every fine-tuning variant uses the estimators' default recipe
    (:mod:`~sklearn_bayes_transfer.recipe`) and starts from the source weights:

    - ``standard fine-tuning``: no prior (``prior_structure="none"``);
    - ``learned prior (default scale)``: ``prior_scale="auto"``, the estimator's default;
    - ``learned prior (tuned by CV)``: ``prior_scale`` and standard fine-tuning searched together
      by ``tune_cv``-fold cross-validation on the training images only (the default grid of
      :func:`~sklearn_bayes_transfer.tuning.default_param_grid`, the default candidate kept unless
      another is clearly better: :func:`~sklearn_bayes_transfer.tuning.prefer_default`);
    - ``logistic regression on pixels``: scikit-learn's defaults on the raw 8 x 8 pixels.

    Returns one row per (seed, variant) with the test accuracy.
    """
    X, y = load_digits_images()
    target = y >= 5
    X, y = X[target], y[target]
    if prior is None:
        prior = fit_digits_prior(verbose=verbose)
    rows = []
    for seed in seeds:
        train, test = _few_shot_split(y, labels_per_class, seed)

        def make(**params: Any) -> PriorRegularizedClassifier:
            return PriorRegularizedClassifier(prior, max_epochs=max_epochs, min_steps=min_steps, verbose=0,
                                              random_state=seed, **params)

        variants = {
            "standard fine-tuning": make(prior_structure="none"),
            "learned prior (default scale)": make(),
            "learned prior (tuned by CV)": GridSearchCV(
                make(), default_param_grid(prior), cv=StratifiedKFold(tune_cv, shuffle=True, random_state=seed),
                refit=prefer_default(FINETUNE_DEFAULT, prior)),
            "logistic regression on pixels": LogisticRegression(max_iter=2000),
        }
        for name, estimator in variants.items():
            start = time.perf_counter()
            inputs = X if not isinstance(estimator, LogisticRegression) else X.reshape(len(X), -1)
            estimator.fit(inputs[train], y[train])
            row = {"seed": seed, "variant": name, "accuracy": float(estimator.score(inputs[test], y[test])),
                   "seconds": time.perf_counter() - start}
            if isinstance(estimator, GridSearchCV):
                best = estimator.best_params_
                row["chosen"] = "standard fine-tuning" if best.get("prior_structure") == "none" \
                    else f"scale {best['prior_scale']:.3g}"
            rows.append(row)
    return rows

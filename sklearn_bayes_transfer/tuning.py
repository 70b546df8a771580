"""Searching the prior scale: grids scaled to the prior, a selection rule that resists noise, and a
readable result table.

Useful prior scales span many orders of magnitude and depend on the prior (``docs/design.md``): the
default grid is ``lambda_0 * 10**k`` around the prior's reference scale
``lambda_0 = mean(mean**2) / mean(variance)``, and it always contains standard fine-tuning
(``prior_structure="none"``), so a search can fall back to it when the prior does not help.

With few labels, cross-validation scores are noisy (three folds of 25 images test 8 images each),
and the best mean of ten candidates is often a lucky one: on the transfer panel, picking it lost up
to 10 points against the default. :func:`prefer_default` is a ``GridSearchCV`` ``refit`` rule that
keeps the default candidate unless another beats it by more than one standard error of their
fold-by-fold difference (the "one standard error" rule of Hastie, Tibshirani & Friedman, applied to
paired folds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .exceptions import ConfigError
from .prior import Prior, PriorStructure
from .recipe import resolve_prior_scale, usable_reference_scale

__all__ = ["DEFAULT_DECADES", "FINETUNE_DEFAULT", "default_param_grid", "prefer_default", "results_table",
           "select_index"]

#: Powers of ten around the reference scale in the default grid.
DEFAULT_DECADES: tuple[int, ...] = (-2, -1, 0, 1, 2, 3, 4)


def default_param_grid(
    prior: Prior,
    *,
    scales: Sequence[float] | None = None,
    decades: Iterable[int] = DEFAULT_DECADES,
    structures: Sequence[str] = ("lowrank",),
    include_none: bool = True,
) -> list[dict[str, list[Any]]]:
    """A ``GridSearchCV`` parameter grid over ``prior_scale`` scaled to ``prior``.

    Parameters
    ----------
    prior : Prior
        The prior whose reference scale anchors the grid.
    scales : sequence of float, optional
        Explicit scales; by default ``prior.reference_scale() * 10**k`` for ``k`` in ``decades``.
    decades : iterable of int
        Powers of ten around the reference scale.
    structures : sequence of str, default=("lowrank",)
        Prior structures to search with every scale.
    include_none : bool, default=True
        Add standard fine-tuning (``prior_structure="none"``) as a candidate.

    Examples
    --------
    >>> import torch
    >>> prior = Prior.from_module(torch.nn.Linear(2, 1), variance=0.01)
    >>> grid = default_param_grid(prior, decades=[0, 1])
    >>> grid[1]
    {'prior_structure': ['none']}
    """
    if scales is None:
        ref = usable_reference_scale(prior) or 1.0
        scales = [float(ref * 10.0 ** k) for k in decades]
    scales = [float(s) for s in scales]
    bad = [s for s in scales if not np.isfinite(s) or s <= 0]
    if bad or not scales:
        raise ConfigError(f"prior scales must be finite numbers > 0, got {bad or 'an empty list'}")
    for s in structures:
        if PriorStructure(s) is PriorStructure.NONE:
            raise ConfigError("put standard fine-tuning in the grid with include_none=True, not in structures")
    grid: list[dict[str, list[Any]]] = [
        {"prior_structure": [str(PriorStructure(s).value) for s in structures], "prior_scale": scales}]
    if include_none:
        grid.append({"prior_structure": [PriorStructure.NONE.value]})
    return grid


def results_table(cv_results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate: its parameters, mean and standard deviation of the test score, rank.

    Rows are sorted by rank (best first).
    """
    rows = []
    for i, params in enumerate(cv_results["params"]):
        rows.append({
            "params": dict(params),
            "mean": float(cv_results["mean_test_score"][i]),
            "std": float(cv_results["std_test_score"][i]),
            "rank": int(cv_results["rank_test_score"][i]),
            "fit_time": float(cv_results["mean_fit_time"][i]),
        })
    return sorted(rows, key=lambda r: (r["rank"], -r["mean"]))


def _fold_scores(cv_results: dict[str, Any], index: int) -> np.ndarray:
    keys = sorted((k for k in cv_results if k.startswith("split") and k.endswith("_test_score")),
                  key=lambda k: int(k[len("split"):-len("_test_score")]))
    return np.asarray([cv_results[k][index] for k in keys], dtype=float)


def _default_index(cv_results: dict[str, Any], default: dict[str, Any], prior: Prior | None) -> int | None:
    """Index of the candidate whose parameters are ``default`` (``"auto"`` scales compared as numbers)."""
    wanted = dict(default)
    if wanted.get("prior_scale") == "auto":
        wanted["prior_scale"] = resolve_prior_scale("auto", prior)
    for i, params in enumerate(cv_results["params"]):
        if set(params) != set(wanted):
            continue
        same = all(np.isclose(params[k], v, rtol=1e-9) if isinstance(v, float) else params[k] == v
                   for k, v in wanted.items())
        if same:
            return i
    return None


def select_index(cv_results: dict[str, Any], default: dict[str, Any], prior: Prior | None = None) -> int:
    """The candidate to keep: the best mean score, unless the ``default`` candidate is within one
    standard error of the fold-by-fold difference from it (then the default).

    ``default`` is a candidate's parameters, e.g. ``{"prior_structure": "lowrank", "prior_scale":
    "auto"}`` (``"auto"`` is resolved with ``prior``). Without such a candidate in the grid, the best
    mean wins.

    Examples
    --------
    >>> cv = {"params": [{"a": 1}, {"a": 2}], "mean_test_score": np.array([0.80, 0.82]),
    ...       "split0_test_score": np.array([0.7, 0.9]), "split1_test_score": np.array([0.9, 0.74])}
    >>> select_index(cv, {"a": 1}), select_index(cv, {"a": 3})
    (0, 1)
    """
    means = np.asarray(cv_results["mean_test_score"], dtype=float)
    best = int(np.nanargmax(means))
    home = _default_index(cv_results, default, prior)
    if home is None or home == best:
        return best
    difference = _fold_scores(cv_results, best) - _fold_scores(cv_results, home)
    if len(difference) < 2:
        return best
    standard_error = float(np.std(difference, ddof=1) / np.sqrt(len(difference)))
    return best if float(np.mean(difference)) > standard_error else home


#: The candidate that ``finetune`` fits by default (what searches keep unless another is clearly better).
FINETUNE_DEFAULT: dict[str, Any] = {"prior_structure": PriorStructure.LOWRANK.value, "prior_scale": "auto"}


def prefer_default(default: dict[str, Any], prior: Prior | None = None) -> Callable[[dict[str, Any]], int]:
    """A ``GridSearchCV(refit=...)`` rule: :func:`select_index` with this ``default`` candidate.

    Examples
    --------
    >>> import torch
    >>> from sklearn.model_selection import GridSearchCV
    >>> prior = Prior.from_module(torch.nn.Linear(2, 1), variance=0.01)
    >>> rule = prefer_default({"prior_structure": "lowrank", "prior_scale": "auto"}, prior)
    >>> search = GridSearchCV(object(), default_param_grid(prior), refit=rule)   # doctest: +SKIP
    """
    def refit(cv_results: dict[str, Any]) -> int:
        return select_index(cv_results, default, prior)

    return refit

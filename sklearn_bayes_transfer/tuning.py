"""Searching the prior scale: grids scaled to the prior, and a readable result table.

Useful prior scales span many orders of magnitude and depend on the prior (``docs/design.md``): the
default grid is ``lambda_0 * 10**k`` around the prior's reference scale
``lambda_0 = mean(mean**2) / mean(variance)``, and it always contains standard fine-tuning
(``prior_structure="none"``), so a search can fall back to it when the prior does not help.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .exceptions import ConfigError
from .prior import Prior, PriorStructure

__all__ = ["default_param_grid", "results_table", "DEFAULT_DECADES"]

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
        ref = prior.reference_scale()
        if not np.isfinite(ref) or ref <= 0:
            ref = 1.0
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

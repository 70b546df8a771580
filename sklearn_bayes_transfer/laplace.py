"""Laplace approximation with the learned prior: the log evidence of a prior scale, and the posterior.

With the prior ``N(m, Sigma_tilde)``, ``Sigma_tilde = diag(d) + U U^T`` (``d = lambda * variance +
eps``, ``U = sqrt(lambda) F^T``, docs/design.md) and a diagonal positive semi-definite curvature
``H = diag(h)`` of the data term ``L(w) = sum_n -log p(y_n | x_n, w)`` at a mode ``w*``, the Laplace
approximation of the log marginal likelihood is

    log p(D | lambda) ~ -L(w*) - 0.5 r^T Sigma_tilde^{-1} r - 0.5 log det(I + Sigma_tilde H),   r = w* - m.

Both terms reduce to sums over the D weights and K x K matrices (streamed over the factor once):

    r^T Sigma_tilde^{-1} r = r . (r / d) - lambda b^T A^{-1} b,   b = F (r / d),   A = I + lambda F diag(1/d) F^T
    log det(I + Sigma_tilde H) = sum log(1 + d h) + log det M,   M = I_K + lambda F diag(h / (1 + d h)) F^T

(Woodbury, and the matrix determinant lemma after factoring out ``I + diag(d) H``). The Laplace
posterior ``N(w*, (Sigma_tilde^{-1} + H)^{-1})`` has the covariance

    diag(1 / (1/d + h)) + G M^{-1} G^T,   G = diag(1 / (1 + d h)) U,

with the same ``M``: a sample is ``w* + z1 / sqrt(1/d + h) + G R^{-T} z2`` for ``M = R R^T``.
``M >= I`` for every ``h >= 0``, so nothing here cancels. For a linear model with a Gaussian
likelihood and diagonal ``H`` all of this is exact (the tests check it against the closed form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .exceptions import ConfigError
from .prior import Prior, PriorStructure

__all__ = ["evidence_grid", "laplace_samples", "log_evidence", "maximize_log_evidence"]

# Elements of the factor times scales held in one float64 chunk of the evidence pass (~32 MB).
_CHUNK_ELEMENTS = 1 << 22


def evidence_grid(bounds: tuple[float, float], per_decade: int = 4) -> np.ndarray:
    """Log-spaced scales over ``bounds``, ``per_decade`` per decade (both ends included).

    Examples
    --------
    >>> evidence_grid((1.0, 100.0), per_decade=2).round(2).tolist()
    [1.0, 3.16, 10.0, 31.62, 100.0]
    """
    low, high = (float(v) for v in bounds)
    if not (0 < low < high and math.isfinite(high)):
        raise ConfigError(f"prior_scale_bounds must be two finite numbers 0 < low < high, got {bounds!r}")
    n = max(2, int(math.ceil(per_decade * math.log10(high / low))) + 1)
    return np.logspace(math.log10(low), math.log10(high), n)


def _flat64(values: torch.Tensor | Sequence[torch.Tensor], n: int, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        flat = values.detach().reshape(-1)
    else:
        flat = torch.cat([v.detach().reshape(-1).cpu() for v in values]) if len(values) else torch.zeros(0)
    if flat.numel() != n:
        raise ConfigError(f"{name} has {flat.numel()} values, the prior covers {n} weights")
    return flat.to("cpu", torch.float64)


def _evidence_sums(prior: Prior, r: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, eps: float):
    """Per scale: ``r.(r/d)``, ``sum log(1 + d h)``, ``b``, ``F diag(1/d) F^T``, ``F diag(h/(1+dh)) F^T``."""
    g, k, n = len(scales), prior.rank, prior.n_params
    diag_r = torch.zeros(g, dtype=torch.float64)
    diag_h = torch.zeros(g, dtype=torch.float64)
    b = torch.zeros(g, k, dtype=torch.float64)
    a = torch.zeros(g, k, k, dtype=torch.float64)
    m = torch.zeros(g, k, k, dtype=torch.float64)
    step = max(1024, _CHUNK_ELEMENTS // (g * max(k, 1)))
    for start in range(0, n, step):
        stop = min(start + step, n)
        v = prior.variance[start:stop].to(torch.float64)
        rr, hh = r[start:stop], h[start:stop]
        d = scales[:, None] * v[None] + eps
        inv_d = 1.0 / d
        dh = d * hh[None]
        diag_r += (rr.square()[None] * inv_d).sum(1)
        diag_h += torch.log1p(dh).sum(1)
        if k:
            f = prior.factor[:, start:stop].to(torch.float64)
            b += (inv_d * rr[None]) @ f.T
            a += (f[None] * inv_d[:, None, :]) @ f.T
            m += (f[None] * (hh[None] / (1.0 + dh))[:, None, :]) @ f.T
    return diag_r, diag_h, b, a, m


def log_evidence(
    prior: Prior,
    r: torch.Tensor | Sequence[torch.Tensor],
    h: torch.Tensor | Sequence[torch.Tensor],
    scales: Sequence[float] | np.ndarray,
    *,
    eps: float = 0.0,
    structure: PriorStructure | str = PriorStructure.LOWRANK,
    data_term: float = 0.0,
) -> np.ndarray:
    """Laplace log evidence ``-L(w*) - 0.5 r^T Sigma_tilde^{-1} r - 0.5 log det(I + Sigma_tilde H)`` per scale.

    Parameters
    ----------
    prior : Prior
        The learned prior (reduced to ``structure`` here).
    r : tensor or sequence of tensors
        ``w* - mean`` over the prior's weights (flat, or one tensor per parameter).
    h : tensor or sequence of tensors
        Diagonal curvature (``>= 0``) of the data term at ``w*``, laid out like ``r``.
    scales : sequence of float
        Prior scales ``lambda > 0`` to evaluate.
    eps : float, default=0.0
        Jitter on the prior's diagonal.
    structure : {"lowrank", "diag", "isotropic"}, default="lowrank"
    data_term : float, default=0.0
        ``log p(D | w*) = -L(w*)``, added to every value (it does not depend on the scale).

    Returns
    -------
    numpy.ndarray of float64, one value per scale.

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer import Prior
    >>> prior = Prior.from_module(torch.nn.Linear(2, 1), variance=1.0)
    >>> r, h = torch.full((3,), 0.5), torch.full((3,), 4.0)
    >>> values = log_evidence(prior, r, h, [0.1, 1.0, 10.0])
    >>> int(values.argmax())   # scale 1 explains r = 0.5 best
    1
    """
    prior = prior.reduce(structure)
    n = prior.n_params
    r64, h64 = _flat64(r, n, "r"), _flat64(h, n, "h")
    scales64 = torch.as_tensor(np.asarray(scales, dtype=np.float64).reshape(-1))
    if not bool(torch.isfinite(scales64).all()) or bool((scales64 <= 0).any()):
        raise ConfigError(f"prior scales must be finite numbers > 0, got {np.asarray(scales).tolist()}")
    if not bool(torch.isfinite(h64).all()) or bool((h64 < 0).any()):
        raise ConfigError("the curvature h must be finite and >= 0")
    diag_r, diag_h, b, a, m = _evidence_sums(prior, r64, h64, scales64, float(eps))
    maha, logdet = diag_r.clone(), diag_h.clone()
    if prior.rank:
        eye = torch.eye(prior.rank, dtype=torch.float64)
        lam = scales64[:, None, None]
        chol_a = torch.linalg.cholesky(eye + lam * a)
        solved = torch.cholesky_solve(b.unsqueeze(-1), chol_a).squeeze(-1)
        maha -= scales64 * (b * solved).sum(1)
        chol_m = torch.linalg.cholesky(eye + lam * m)
        logdet += 2.0 * torch.log(torch.diagonal(chol_m, dim1=-2, dim2=-1)).sum(1)
    return (float(data_term) - 0.5 * maha - 0.5 * logdet).numpy()


def maximize_log_evidence(
    prior: Prior,
    r: torch.Tensor | Sequence[torch.Tensor],
    h: torch.Tensor | Sequence[torch.Tensor],
    bounds: tuple[float, float],
    *,
    eps: float = 0.0,
    structure: PriorStructure | str = PriorStructure.LOWRANK,
    data_term: float = 0.0,
    per_decade: int = 4,
) -> tuple[float, float]:
    """The scale in ``bounds`` of largest :func:`log_evidence`, and that value.

    A grid of ``per_decade`` points per decade of ``log lambda``, then a grid twenty times finer
    around its best point (each grid one pass over the factor); no refits.

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer import Prior
    >>> prior = Prior.from_module(torch.nn.Linear(2, 1), variance=1.0)
    >>> scale, _ = maximize_log_evidence(prior, torch.full((3,), 0.5), torch.full((3,), 4.0), (1e-3, 1e3))
    >>> round(scale, 1)   # where r^2 = lambda^2 / (lambda + 1/h), for this diagonal prior
    0.4
    """
    coarse = evidence_grid(bounds, per_decade)
    n = len(coarse)
    common = dict(eps=eps, structure=structure, data_term=data_term)
    values = log_evidence(prior, r, h, coarse, **common)
    best = int(np.nanargmax(values)) if np.isfinite(values).any() else 0
    fine = np.logspace(math.log10(coarse[max(best - 1, 0)]), math.log10(coarse[min(best + 1, n - 1)]), 41)
    fine_values = log_evidence(prior, r, h, fine, **common)
    i = int(np.nanargmax(fine_values)) if np.isfinite(fine_values).any() else 0
    return float(fine[i]), float(fine_values[i])


def laplace_samples(
    prior: Prior,
    w_star: torch.Tensor | Sequence[torch.Tensor],
    h: torch.Tensor | Sequence[torch.Tensor],
    scale: float,
    n_samples: int,
    *,
    eps: float = 0.0,
    structure: PriorStructure | str = PriorStructure.LOWRANK,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n_samples`` draws from ``N(w*, (Sigma_tilde^{-1} + diag(h))^{-1})``, float32 of shape (S, D).

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer import Prior
    >>> prior = Prior.from_module(torch.nn.Linear(2, 1), variance=1.0)
    >>> laplace_samples(prior, torch.zeros(3), torch.full((3,), 3.0), 1.0, 5).shape
    torch.Size([5, 3])
    """
    prior = prior.reduce(structure)
    n, k = prior.n_params, prior.rank
    w_flat, h_flat = _flat64(w_star, n, "w_star"), _flat64(h, n, "h")
    if not bool(torch.isfinite(h_flat).all()) or bool((h_flat < 0).any()):
        raise ConfigError("the curvature h must be finite and >= 0")
    scale = float(scale)
    step = max(1024, _CHUNK_ELEMENTS // max(k, n_samples, 1))

    def chunk(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = scale * prior.variance[start:stop].to(torch.float64) + float(eps)
        return d, d * h_flat[start:stop]

    coef = None
    if k:
        m = torch.eye(k, dtype=torch.float64)
        for start in range(0, n, step):
            stop = min(start + step, n)
            d, dh = chunk(start, stop)
            f = prior.factor[:, start:stop].to(torch.float64)
            m += scale * (f * (h_flat[start:stop] / (1.0 + dh))) @ f.T
        chol = torch.linalg.cholesky(m)
        z_low = torch.randn(n_samples, k, generator=generator, dtype=torch.float64)
        coef = math.sqrt(scale) * torch.linalg.solve_triangular(chol.T, z_low.T, upper=True).T  # rows: R^{-T} z2
    out = torch.empty(n_samples, n, dtype=torch.float32)
    for start in range(0, n, step):
        stop = min(start + step, n)
        d, dh = chunk(start, stop)
        z = torch.randn(n_samples, stop - start, generator=generator, dtype=torch.float64)
        block = w_flat[start:stop] + z / torch.sqrt(1.0 / d + h_flat[start:stop])
        if coef is not None:
            block += (coef @ prior.factor[:, start:stop].to(torch.float64)) / (1.0 + dh)
        out[:, start:stop] = block.to(torch.float32)
    return out

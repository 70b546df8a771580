"""The Laplace evidence and posterior against closed forms of a linear-Gaussian model (float64).

For ``y = X w + noise``, noise ``N(0, sigma^2 I)``, and the prior ``N(m, Sigma_tilde)``, the Laplace
approximation is exact: the evidence is ``N(y; X m, sigma^2 I + X Sigma_tilde X^T)`` and the
posterior ``N(w*, (Sigma_tilde^{-1} + H)^{-1})`` with ``H = X^T X / sigma^2``. Columns of ``X``
are orthogonal here, so ``H`` is diagonal as the library assumes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_random_prior
from torch.distributions import MultivariateNormal

from sklearn_bayes_transfer import ConfigError, Prior
from sklearn_bayes_transfer.laplace import laplace_samples, log_evidence, maximize_log_evidence

SHAPES = ((3, 4),)  # D = 12
SIGMA = 0.3


def dense_cov(prior: Prior, structure: str, scale: float, eps: float) -> torch.Tensor:
    reduced = prior.reduce(structure)
    f = reduced.factor.to(torch.float64)
    return torch.diag(scale * reduced.variance.to(torch.float64) + eps) + scale * f.T @ f


class LinearGaussian:
    """Data ``y = X w_true + noise`` with ``X^T X`` diagonal."""

    def __init__(self, prior: Prior, n: int = 40, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, prior.n_params, generator=g, dtype=torch.float64))
        self.x = q * torch.linspace(0.5, 6.0, prior.n_params, dtype=torch.float64)
        w_true = prior.mean.double() + 0.3 * torch.randn(prior.n_params, generator=g, dtype=torch.float64)
        self.y = self.x @ w_true + SIGMA * torch.randn(n, generator=g, dtype=torch.float64)
        self.h = (self.x.square().sum(0)) / SIGMA**2  # the diagonal of X^T X / sigma^2 (all of it)
        self.prior = prior

    def mode(self, cov: torch.Tensor) -> torch.Tensor:
        m = self.prior.mean.double()
        precision = torch.linalg.inv(cov) + torch.diag(self.h)
        return m + torch.linalg.solve(precision, self.x.T @ (self.y - self.x @ m) / SIGMA**2)

    def log_lik(self, w: torch.Tensor) -> float:
        resid = self.y - self.x @ w
        return float(-0.5 * resid.square().sum() / SIGMA**2 - len(self.y) * math.log(SIGMA * math.sqrt(2 * math.pi)))

    def exact_evidence(self, cov: torch.Tensor) -> float:
        marginal = SIGMA**2 * torch.eye(len(self.y), dtype=torch.float64) + self.x @ cov @ self.x.T
        return float(MultivariateNormal(self.x @ self.prior.mean.double(), marginal).log_prob(self.y))


@pytest.mark.parametrize("structure", ["lowrank", "diag", "isotropic"])
@pytest.mark.parametrize(("scale", "eps"), [(0.1, 0.0), (1.0, 0.0), (30.0, 1e-3), (1e4, 0.0)])
def test_log_evidence_is_exact_for_a_linear_gaussian_model(structure, scale, eps):
    prior = make_random_prior(SHAPES, rank=3, seed=1, factor_scale=2.0)
    model = LinearGaussian(prior)
    cov = dense_cov(prior, structure, scale, eps)
    w_star = model.mode(cov)
    value = log_evidence(prior, w_star - prior.mean.double(), model.h, [scale], eps=eps, structure=structure,
                         data_term=model.log_lik(w_star))
    assert value[0] == pytest.approx(model.exact_evidence(cov), rel=1e-9, abs=1e-8)


def test_determinant_and_mahalanobis_identities_against_dense_algebra():
    prior = make_random_prior(SHAPES, rank=4, seed=2, factor_scale=3.0, variance_range=(1e-6, 1e-1))
    g = torch.Generator().manual_seed(3)
    r = torch.randn(prior.n_params, generator=g, dtype=torch.float64) * 0.1
    h = torch.rand(prior.n_params, generator=g, dtype=torch.float64) * 50
    h[::3] = 0.0  # weights the data says nothing about
    scales = [1e-3, 0.5, 7.0, 1e5]
    values = log_evidence(prior, r, h, scales)
    for scale, value in zip(scales, values):
        cov = dense_cov(prior, "lowrank", scale, 0.0)
        maha = r @ torch.linalg.solve(cov, r)
        logdet = torch.logdet(torch.eye(prior.n_params, dtype=torch.float64) + cov @ torch.diag(h))
        assert value == pytest.approx(float(-0.5 * maha - 0.5 * logdet), rel=1e-8)


def test_alternating_updates_find_the_maximiser_of_the_exact_evidence():
    # Re-estimating lambda at the current mode and re-fitting the mode converges to a stationary
    # point of the true evidence (MacKay's fixed point): the gradient of the Laplace evidence in w
    # vanishes at the mode, and H does not depend on w here.
    prior = make_random_prior(SHAPES, rank=3, seed=4, factor_scale=2.0)
    model = LinearGaussian(prior, seed=5)
    grid = np.logspace(-3, 4, 701)
    exact = [model.exact_evidence(dense_cov(prior, "lowrank", s, 0.0)) for s in grid]
    best = grid[int(np.argmax(exact))]
    assert 1e-3 < best < 1e4  # an interior maximum
    scale = 1.0
    for _ in range(50):
        w_star = model.mode(dense_cov(prior, "lowrank", scale, 0.0))
        scale, _ = maximize_log_evidence(prior, w_star - prior.mean.double(), model.h, (1e-4, 1e5))
    assert math.log10(scale) == pytest.approx(math.log10(best), abs=0.03)


def test_laplace_samples_have_the_posterior_moments():
    prior = make_random_prior(SHAPES, rank=3, seed=6, factor_scale=2.0)
    g = torch.Generator().manual_seed(7)
    h = torch.rand(prior.n_params, generator=g, dtype=torch.float64) * 20
    h[:4] = 0.0
    w_star = torch.randn(prior.n_params, generator=g, dtype=torch.float64)
    scale = 3.0
    samples = laplace_samples(prior, w_star, h, scale, 40000, generator=torch.Generator().manual_seed(8)).double()
    expected = torch.linalg.inv(torch.linalg.inv(dense_cov(prior, "lowrank", scale, 0.0)) + torch.diag(h))
    centred = samples - w_star
    empirical = centred.T @ centred / len(samples)
    sd = expected.diagonal().sqrt()
    # Standard error of a covariance entry ~ sd_i sd_j / sqrt(S): 5 of them, relative to the scale.
    torch.testing.assert_close(empirical / torch.outer(sd, sd), expected / torch.outer(sd, sd), rtol=0, atol=0.03)
    torch.testing.assert_close(samples.mean(0), w_star, rtol=0, atol=float(5 * sd.max() / 200))


def test_bad_inputs_are_named():
    prior = make_random_prior(SHAPES, rank=2, seed=9)
    r, h = torch.zeros(prior.n_params), torch.ones(prior.n_params)
    with pytest.raises(ConfigError, match="scales"):
        log_evidence(prior, r, h, [1.0, -2.0])
    with pytest.raises(ConfigError, match="curvature"):
        log_evidence(prior, r, -h, [1.0])
    with pytest.raises(ConfigError, match="r has 5 values"):
        log_evidence(prior, torch.zeros(5), h, [1.0])
    with pytest.raises(ConfigError, match="prior_scale_bounds"):
        maximize_log_evidence(prior, r, h, (10.0, 1.0))
    with pytest.raises(ConfigError, match="curvature"):
        laplace_samples(prior, r, h * float("nan"), 1.0, 2)

"""Stochastic-gradient Langevin dynamics on the prior-regularised loss: the noise of one step.

Langevin noise, derived. The training loss is one negative log-posterior per example,
``L(w) = U(w) / N`` (``U`` the negative log-posterior of the ``N`` training examples, estimated on
the batch). Langevin dynamics for ``p_T(w) ~ exp(-U(w) / T)`` take the step
``w <- w - eps * grad U + sqrt(2 eps T) xi``. An SGD step of learning rate ``lr`` on ``L`` moves by
``lr * grad L = (lr / N) grad U``, so ``eps = lr / N``, and the noise added after each optimizer
step has standard deviation ``sqrt(2 lr T / N)``. This is exactly what happens with
``prior_update="gradient"``.

With the proximal prior update (plain SGD, the default) the optimizer steps on the task loss and
head term only, and the Gaussian prior ``N(m, Sigma)`` (``Sigma`` = the scaled prior covariance
in use, ``P = Sigma^{-1}``) is then applied exactly as ``w <- m + A (w - m)``,
``A = (I + S P)^{-1}``, ``S = diag(eps)``. For the weights it covers, the noise ``zeta`` is added
between the two, with covariance ``T (2 S + S P S)``: then ``A (T Sigma + T (2 S + S P S)) A^T =
T Sigma``, so the chain leaves the tempered prior ``N(m, T Sigma)`` exactly invariant for every
step size, however stiff the prior (explicit Euler-Maruyama diverges there, as MAP's gradient
step does; plain ``2 eps T`` noise before the prox would collapse stiff weights onto the mean).
For ``eps P -> 0`` it is plain SGLD noise. It is drawn as
``zeta = sqrt(2 T S) xi + sqrt(T) S P s`` with ``s ~ N(0, Sigma)`` (``Cov(P s) = P``), where
``P s`` is the gradient of the prior's own penalty at ``m + s``: one pass over the factor to draw
``s`` and the penalty's two. The task loss and head term move through the gradient step (a
Lie-Trotter splitting), and ``temperature = 0`` leaves exactly the MAP update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .penalty import PriorPenalty

__all__ = ["PriorPrecisionSampler", "langevin_noise_"]


class PriorPrecisionSampler:
    """Draws ``P s`` with ``s ~ N(0, Sigma)``, i.e. a sample of ``N(0, P)``, for a penalty's prior.

    ``Sigma = diag(d) + scale * F^T F`` is the covariance the penalty uses (``d = scale *
    variance + eps``, its reduced prior's factor ``F``) and ``P = Sigma^{-1}``: ``s`` costs one
    pass over the factor and ``P s`` is the gradient of the penalty at ``mean + s`` (its own two
    passes). ``sqrt(d)``, the mean and the factor are prepared once, on ``device``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer import Prior, PriorPenalty
    >>> prior = Prior.from_module(torch.nn.Linear(3, 2), variance=0.5)
    >>> sampler = PriorPrecisionSampler(PriorPenalty(prior), "cpu")
    >>> [tuple(t.shape) for t in sampler.sample(torch.Generator().manual_seed(0))]
    [(2, 3), (2,)]
    """

    def __init__(self, penalty: PriorPenalty, device: str | torch.device) -> None:
        prior = penalty.prior
        device = torch.device(device)
        self.penalty = penalty
        self.sqrt_d = (penalty.scale * prior.variance.to(device, torch.float64) + penalty.eps).sqrt_().float()
        self.mean = prior.mean.to(device, torch.float32)
        self.factor = (prior.factor.to(device, torch.float32) * math.sqrt(penalty.scale)) if prior.rank else None

    def sample(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``P s`` split into the prior's parameter shapes (float32, on the sampler's device)."""
        s = torch.randn(self.mean.shape, generator=generator, device=self.mean.device).mul_(self.sqrt_d)
        if self.factor is not None:
            s.add_(torch.randn(len(self.factor), generator=generator, device=s.device) @ self.factor)
        points = [v.detach().requires_grad_(True) for v in self.penalty.prior.split(s.add_(self.mean)).values()]
        with torch.enable_grad():
            return list(torch.autograd.grad(self.penalty(points), points))


@torch.no_grad()
def langevin_noise_(
    params: Sequence[torch.Tensor],
    steps: Sequence[float],
    temperature: float,
    generator: torch.Generator | None = None,
    prox: tuple[PriorPenalty | PriorPrecisionSampler, Sequence[torch.Tensor]] | None = None,
) -> None:
    """Add one step's Langevin noise to ``params``, in place (see the module docstring).

    Parameters
    ----------
    params : sequence of tensors
        Weights just moved by a gradient step.
    steps : sequence of float
        ``eps = lr / N`` per tensor: the step size on the negative log-posterior ``U``.
    temperature : float
        ``T >= 0``; ``0`` adds nothing.
    generator : torch.Generator, optional
        Source of the noise, on the tensors' device.
    prox : (PriorPenalty or PriorPrecisionSampler, sequence of tensors), optional
        A penalty (or a sampler prepared for it) and the tensors it covers (some of ``params``)
        when ``penalty.prox_`` with the same ``steps`` follows: those get noise
        ``sqrt(2 T eps) xi + sqrt(T) eps P s`` (covariance ``T (2 S + S P S)``), which the prox
        turns into an exact Langevin step for the prior; the others get ``sqrt(2 T eps) xi``.

    Examples
    --------
    >>> import torch
    >>> w = torch.zeros(100_000)
    >>> langevin_noise_([w], [0.01], temperature=1.0, generator=torch.Generator().manual_seed(0))
    >>> round(float(w.std()), 2)   # sqrt(2 * 0.01)
    0.14
    """
    if temperature == 0:
        return
    shaped: dict[int, torch.Tensor] = {}
    if prox is not None:
        sampler, covered = prox
        if not isinstance(sampler, PriorPrecisionSampler):
            sampler = PriorPrecisionSampler(sampler, covered[0].device)
        shaped = {id(p): v.to(p.dtype) for p, v in zip(covered, sampler.sample(generator))}
    for p, eps in zip(params, steps):
        if eps == 0:
            continue
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        noise.mul_(math.sqrt(2.0 * eps * temperature))
        if id(p) in shaped:
            noise.add_(shaped[id(p)], alpha=eps * math.sqrt(temperature))
        p.add_(noise)

"""The diagonal Fisher (generalised Gauss-Newton) curvature of a categorical likelihood.

For a network with logits ``f(x; w)`` and a categorical likelihood, the generalised Gauss-Newton
matrix of the summed negative log-likelihood ``sum_n l_n(w)`` equals its Fisher information,

    H = sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n = sum_n E_{y ~ p(y | x_n, w)} [g_n(y) g_n(y)^T],

with ``g_n(y)`` the gradient of ``-log p(y | x_n, w)``. Unlike the Hessian it is positive
semi-definite at every ``w``, and unlike the "empirical Fisher" (squared gradients at the observed
labels, which Kunstner et al., NeurIPS 2019, show can point anywhere) it is a curvature. Its
diagonal is estimated here from per-example gradients with labels drawn from the model itself
(``"mc"``: unbiased, one backward pass per example and draw) or summed over every class
(``"exact"``: one backward pass per example and class). Per-example gradients come from
:func:`torch.func.vmap` over :func:`torch.func.grad` of :func:`torch.func.functional_call`,
which needs nothing beyond torch and handles any module whose forward pass is functional, with
BatchNorm in evaluation mode (its running statistics; batch statistics would couple the
examples). curvlinops and laplace-torch's backends compute the same diagonal, but through
BackPACK or ASDL and their supported-layer lists; a ResNet with our heads needs neither.

For dense outputs (segmentation logits ``(N, C, H, W)``) every output position is one categorical
observation. A likelihood averaged over its ``P`` positions (the segmenter's per-image mean) has
``1/P`` times the curvature of their sum; ``positions="mean"`` accounts for that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from enum import Enum

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .exceptions import ConfigError

__all__ = ["FisherEstimate", "diagonal_fisher"]


class FisherEstimate(str, Enum):
    """How :func:`diagonal_fisher` takes the expectation over labels.

    - ``"mc"``: one label drawn from the model's predictive per example (and per output position);
      unbiased, the cost of one gradient per example;
    - ``"exact"``: the sum over all classes weighted by their probabilities; ``C`` gradients per
      example, for ``(N, C)`` outputs only.
    """

    MC = "mc"
    EXACT = "exact"


def diagonal_fisher(
    module: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Iterable[torch.Tensor],
    *,
    estimate: FisherEstimate | str = FisherEstimate.MC,
    positions: str = "sum",
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 16,
) -> list[torch.Tensor]:
    """Diagonal of the Fisher of ``sum_n -log p(y_n | x_n, w)`` with respect to ``params``.

    Parameters
    ----------
    module : torch.nn.Module
        Returns logits ``(N, C)`` or ``(N, C, *positions)``; it runs in evaluation mode here and
        gets its mode back afterwards.
    params : sequence of torch.nn.Parameter
        Parameters of ``module`` to differentiate (the others are held fixed).
    batches : iterable of torch.Tensor
        Input batches, already on the module's device.
    estimate : {"mc", "exact"}, default="mc"
        See :class:`FisherEstimate`.
    positions : {"sum", "mean"}, default="sum"
        Whether an example's log-likelihood sums or averages over its output positions.
    logits : callable, optional
        ``logits(output, inputs)``: the logits of the likelihood from the module's output batch
        and its inputs (e.g. resized to the targets' size); default: the output itself.
    generator : torch.Generator, optional
        Source of the drawn labels (on the module's device).
    chunk_size : int, default=16
        Examples whose gradients are held at once (memory: ``chunk_size`` times the parameters).

    Returns
    -------
    list of torch.Tensor
        One tensor per parameter, its shape and dtype, summed over the examples.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(3, 2)
    >>> h = diagonal_fisher(layer, [layer.weight], [torch.randn(5, 3)], estimate="exact")
    >>> h[0].shape, bool((h[0] >= 0).all())
    (torch.Size([2, 3]), True)
    """
    try:
        estimate = FisherEstimate(estimate)
    except ValueError:
        raise ConfigError(f"estimate={estimate!r} is not valid; expected 'mc' or 'exact'") from None
    if positions not in ("sum", "mean"):
        raise ConfigError(f"positions={positions!r} is not valid; expected 'sum' or 'mean'")
    to_logits = logits or (lambda out, inputs: out)
    wanted = {id(p) for p in params}
    names = {id(p): n for n, p in module.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ConfigError(f"params[{missing[0]}] is not a parameter of the module")
    trainable = {names[id(p)]: p.detach() for p in params}
    fixed = {n: p.detach() for n, p in module.named_parameters() if id(p) not in wanted}
    fixed.update(dict(module.named_buffers()))

    def neg_log_lik(weights: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        batch = x.unsqueeze(0)
        out = to_logits(functional_call(module, ({**fixed, **weights},), (batch,)), batch)
        return nn.functional.cross_entropy(out, label.unsqueeze(0), reduction="sum")

    per_example = vmap(grad(neg_log_lik), in_dims=(None, 0, 0), chunk_size=chunk_size)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in trainable.items()}
    positions_per_example = 1
    was_training = module.training
    module.eval()
    try:
        for x in batches:
            with torch.no_grad():
                out = to_logits(module(x), x).float()
            if estimate is FisherEstimate.EXACT:
                if out.dim() != 2:
                    raise ConfigError(f"estimate='exact' needs (N, C) logits, got shape {tuple(out.shape)}; use 'mc'")
                weights = out.softmax(dim=1)
                for c in range(out.shape[1]):
                    labels = torch.full((len(x),), c, dtype=torch.long, device=x.device)
                    _accumulate(total, per_example(trainable, x, labels), weights[:, c])
            else:
                probs = out.movedim(1, -1).softmax(dim=-1)
                flat = probs.reshape(-1, probs.shape[-1])
                labels = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
                _accumulate(total, per_example(trainable, x, labels), None)
            positions_per_example = out[0, 0].numel() if out.dim() > 2 else 1
    finally:
        module.train(was_training)
    if positions == "mean":
        # l_n = (1/P) sum_j -log p_j has (1/P) times the curvature of the sum estimated above.
        for value in total.values():
            value.div_(positions_per_example)
    return [total[names[id(p)]].to(p.dtype) for p in params]


def _accumulate(total: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], weights: torch.Tensor | None) -> None:
    for name, g in grads.items():
        squared = g.float().pow(2)
        if weights is not None:
            squared = squared * weights.view(-1, *([1] * (squared.dim() - 1)))
        total[name] += squared.sum(0)

"""BatchNorm running statistics: find them, recompute them for given weights, pick the inputs.

Recomputing the statistics for the weights a network will predict with (as
:func:`torch.optim.swa_utils.update_bn` does for SWA) serves three places: the end of every
fine-tuning fit (:class:`~sklearn_bayes_transfer.recipe.RecomputeBatchNorm`), every posterior
sample of Bayesian inference (:mod:`~sklearn_bayes_transfer.bayes`), and the SWAG mean of a prior.
"""

from __future__ import annotations

from typing import Any

import torch
from skorch.dataset import get_len, unpack_data
from skorch.utils import multi_indexing
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BN_MAX_EXAMPLES", "batchnorm_buffers", "batchnorm_inputs", "recompute_batchnorm"]

#: At most this many training inputs are used to recompute BatchNorm statistics.
BN_MAX_EXAMPLES = 2048


def _batchnorms(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


def batchnorm_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The running means and variances of ``module``'s BatchNorm layers, as ``(name, buffer)``.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    >>> [name for name, _ in batchnorm_buffers(net)]
    ['1.running_mean', '1.running_var']
    """
    out = []
    for name, m in _batchnorms(module):
        prefix = f"{name}." if name else ""
        out += [(prefix + "running_mean", m.running_mean), (prefix + "running_var", m.running_var)]
    return out


@torch.no_grad()
def recompute_batchnorm(net: Any, X: Any) -> None:
    """Recompute the running statistics of a skorch net's BatchNorm layers on inputs ``X``.

    Every layer's statistics become the average over the batches of ``X`` (the net's prediction
    iterator, so any input skorch accepts works, on the net's device) of the batch statistics,
    as :func:`torch.optim.swa_utils.update_bn` computes them. Momenta and train/eval mode are
    restored afterwards.
    """
    module = net.module_
    layers = [m for _, m in _batchnorms(module)]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    was_training = module.training
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        module.train()
        for batch in net.get_iterator(net.get_dataset(X), training=False):
            net.infer(unpack_data(batch)[0])
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        module.train(was_training)


def batchnorm_inputs(X: Any, batch_size: int, generator: torch.Generator, limit: int = BN_MAX_EXAMPLES) -> Any:
    """At most ``limit`` examples of ``X`` (a seeded random subset), never a last batch of one.

    Examples
    --------
    >>> X = torch.zeros(100, 3)
    >>> len(batchnorm_inputs(X, batch_size=33, generator=torch.Generator().manual_seed(0), limit=67))
    66
    """
    n = get_len(X)
    keep = min(n, limit)
    if batch_size > 0 and keep > 1 and keep % batch_size == 1:
        keep -= 1  # BatchNorm cannot take batch statistics of a single example
    if keep == n:
        return X
    index = torch.randperm(n, generator=generator)[:keep].sort().values
    if isinstance(X, torch.utils.data.Dataset):
        return torch.utils.data.Subset(X, index.tolist())
    return multi_indexing(X, index.numpy())

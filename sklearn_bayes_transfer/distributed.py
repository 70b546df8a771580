"""Data-parallel training through Hugging Face Accelerate, for runs launched with several processes.

``torchrun --nproc-per-node N ...`` and ``accelerate launch --num_processes N ...`` set
``WORLD_SIZE``; :class:`~sklearn_bayes_transfer.fitter.PriorFitter` then trains through skorch's
``AccelerateMixin`` (DDP: every process trains on its share of each batch and the gradients are
averaged), collects SWAG from the identical weights, reduces the BatchNorm statistics over all
processes' shares of the source set, and only the main process writes files. In one process
nothing here is used and Accelerate is not imported. See ``docs/resume.md``.
"""

from __future__ import annotations

import atexit
import functools
import os
from typing import Any

import torch
from torch import nn

from .exceptions import ConfigError

__all__ = ["accelerated", "is_main_process", "launched_processes", "make_accelerator", "reduce_batchnorm_",
           "unwrap"]


def launched_processes() -> int:
    """The number of processes this run was launched with (``WORLD_SIZE``; 1 for a plain run)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(int(value), 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number of processes; launch with torchrun or "
                          "accelerate launch, or unset it") from None


def make_accelerator(device: str) -> Any:
    """An ``accelerate.Accelerator`` that splits each batch of ``batch_size`` over the processes.

    Raises
    ------
    ConfigError
        If Accelerate is not installed.
    """
    try:
        from accelerate import Accelerator, DataLoaderConfiguration
    except ImportError:
        raise ConfigError(f"this run was launched with {launched_processes()} processes, and data-parallel "
                          "training needs Accelerate: pip install 'sklearn-bayes-transfer[distributed]'") from None
    # split_batches: batch_size stays the global batch, so results do not depend on the process count.
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True), cpu=str(device) == "cpu")
    if _distributed():
        # A process group left to interpreter teardown aborts in gloo's threads ("terminate called
        # without an active exception") once the other processes are gone: close it at exit.
        atexit.register(_close_process_group)
    return accelerator


def _close_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class _PreparedCriteriaWithParameters:
    """Leave loss functions without trainable parameters out of ``accelerator.prepare``: DDP refuses
    to wrap a module with nothing to synchronise, and there is nothing to place or reduce."""

    def _initialize_accelerator(self):
        criteria = self._criteria
        self._criteria = [name for name in criteria if any(
            p.requires_grad for p in getattr(getattr(self, name + "_"), "parameters", list)())]
        try:
            return super()._initialize_accelerator()
        finally:
            self._criteria = criteria


@functools.cache
def accelerated(net_class: type) -> type:
    """``net_class`` with skorch's ``AccelerateMixin`` (one class per net class)."""
    from skorch.hf import AccelerateMixin

    return type(f"Accelerated{net_class.__name__}", (_PreparedCriteriaWithParameters, AccelerateMixin, net_class), {})


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``module`` itself)."""
    while isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return module


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def is_main_process() -> bool:
    """Whether this process writes files: rank 0 of a distributed run, or the only process."""
    return not _distributed() or torch.distributed.get_rank() == 0


@torch.no_grad()
def reduce_batchnorm_(module: nn.Module, n_examples: int) -> None:
    """Average BatchNorm running statistics over the processes, weighted by their ``n_examples``.

    Each process has recomputed them on its own share of the data; the weighted mean of the means,
    and of ``var + mean**2`` (less the pooled mean's square), are those of the union of the shares.
    """
    if not _distributed():
        return
    for layer in module.modules():
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or layer.running_mean is None:
            continue
        mean, var = layer.running_mean, layer.running_var
        stacked = torch.stack([mean * n_examples, (var + mean.square()) * n_examples,
                               torch.full_like(mean, float(n_examples))]).double()
        torch.distributed.all_reduce(stacked)
        total = stacked[2]
        pooled = stacked[0] / total
        mean.copy_(pooled)
        var.copy_(stacked[1] / total - pooled.square())

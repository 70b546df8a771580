"""Data-parallel training through Hugging Face Accelerate, for runs launched with several processes.

``torchrun --nproc-per-node N ...`` and ``accelerate launch --num_processes N ...`` set
``WORLD_SIZE``; :class:`~sklearn_bayes_transfer.fitter.PriorFitter` then trains through skorch's
``AccelerateMixin`` (DDP: every process trains on its share of each batch and the gradients are
averaged), collects SWAG from the identical weights, reduces the BatchNorm statistics over all
processes' shares of the source set, and only the main process writes files. The fine-tuning
estimators do the same without a wrapper around their module (their code reads ``module_``
directly): they join the process group through Accelerate's ``PartialState``, shard each batch
(:class:`ShardSampler`) and average the gradients after backward (:func:`average_gradients_`). In
one process nothing here is used and Accelerate is not imported. See ``docs/resume.md``.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .exceptions import ConfigError

__all__ = ["ShardSampler", "accelerated", "average_gradients_", "broadcast_", "is_main_process", "launched_processes",
           "make_accelerator", "reduce_batchnorm_", "start_processes", "unwrap"]


def launched_processes() -> int:
    """The number of processes this run was launched with (``WORLD_SIZE``; 1 for a plain run)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(int(value), 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number of processes; launch with torchrun or "
                          "accelerate launch, or unset it") from None


def _accelerate_missing() -> ConfigError:
    return ConfigError(f"this run was launched with {launched_processes()} processes, and data-parallel training "
                       "needs Accelerate: pip install 'sklearn-bayes-transfer[distributed]'")


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
        raise _accelerate_missing() from None
    # split_batches: batch_size stays the global batch, so results do not depend on the process count.
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True), cpu=str(device) == "cpu")
    _close_at_exit()
    return accelerator


def _close_at_exit() -> None:
    # A process group left to interpreter teardown aborts in gloo's threads ("terminate called
    # without an active exception") once the other processes are gone: close it at exit, once.
    global _CLOSING_REGISTERED
    if _distributed() and not _CLOSING_REGISTERED:
        atexit.register(_close_process_group)
        _CLOSING_REGISTERED = True


_CLOSING_REGISTERED = False


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


# -- the estimators' data parallelism (no wrapper: their code reads module_ directly) ---------------


def start_processes(device: str) -> tuple[int, int, str]:
    """``(rank, processes, device)`` of this process: ``(0, 1, device)`` in a plain run; launched with
    several, the process group is started through Accelerate and the device is this process's.

    Raises
    ------
    ConfigError
        If Accelerate is not installed.
    """
    if launched_processes() == 1:
        return 0, 1, device
    try:
        from accelerate import PartialState
    except ImportError:
        raise _accelerate_missing() from None
    state = PartialState(cpu=str(device) == "cpu")
    _close_at_exit()
    return state.process_index, state.num_processes, str(state.device)


# Gradients are averaged in buckets of this many elements (as DDP's buckets): bounded extra memory.
_BUCKET = 1 << 23


@torch.no_grad()
def average_gradients_(parameters: list[torch.Tensor]) -> None:
    """Replace every gradient by its mean over the processes (what DDP does after backward)."""
    world = torch.distributed.get_world_size()
    for bucket in _buckets([p.grad for p in parameters if p.grad is not None]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of tensors of one dtype and at most ``_BUCKET`` elements (or one larger tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (size + tensor.numel() > _BUCKET or tensor.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Give every process the main process's values of ``tensors`` (weights, buffers, a scale)."""
    for tensor in tensors:
        torch.distributed.broadcast(tensor, src=0)


class ShardSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` that moves to the next epoch's shuffle by itself at each pass.

    Without shuffling, process ``r`` of ``N`` takes examples ``r, r + N, r + 2N, ...``, so its
    ``k``-th batch of ``b`` and the others' together are the ``k``-th batch of ``N * b`` that one
    process would take.
    """

    def __iter__(self):
        iterator = super().__iter__()
        self.set_epoch(self.epoch + 1)
        return iterator

"""The optional compiled CPU kernel of :class:`~sklearn_bayes_transfer.optim.FOP`, and how to run it.

PyTorch's GEMMs are slow on tall matrices with a handful of columns, and it needs separate passes
for momentum and for the weight step. ``_kernels/fop.c`` does FOP's Gram products and the fused
momentum-plus-preconditioned update for parameters with at most 16 columns (3 x 3 convolutions)
in two sweeps. It is compiled when the package is installed (``setup.py``), as an extension module
per instruction-set level on x86-64 (``_fop_generic``, ``_fop_x86_64_v3``, ``_fop_x86_64_v4``);
:func:`load_kernel` imports the best one the running CPU supports, asking the CPU at run time.
Nothing is compiled or loaded from a cache while the library runs.

Built with OpenMP, the module's loops run on torch's own OpenMP threads (``libgomp.so.1`` is
already loaded by torch: the module links to that same runtime), ``torch.get_num_threads()`` of
them; without OpenMP, :func:`run_segments` splits the work over Python threads (the module
releases the GIL). Where no module was built (no C compiler at install time), FOP runs as torch
operations, with the same results to float32 rounding.

``SKLEARN_BAYES_TRANSFER_KERNEL=0`` in the environment turns the kernel off for ``backend="auto"``.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from types import ModuleType

__all__ = ["Backend", "KernelUnavailable", "available_kernels", "balanced_ranges", "kernel_disabled",
           "load_kernel", "run_segments", "run_split"]

_ENV_SWITCH = "SKLEARN_BAYES_TRANSFER_KERNEL"
#: The built modules from the most capable instruction-set level down, with the CPU level each needs.
_LEVELS = (("x86_64_v4", 4), ("x86_64_v3", 3), ("generic", 0))


class Backend(str, Enum):
    """Which implementation runs a hot path that has a compiled CPU kernel.

    - ``"auto"``: the compiled kernel where it applies (CPU, float32, contiguous tensors) and was
      built at install time, else torch operations; ``SKLEARN_BAYES_TRANSFER_KERNEL=0`` in the
      environment turns it off;
    - ``"compiled"``: the compiled kernel, and an error where it cannot be used;
    - ``"torch"``: torch operations only (any device and dtype).
    """

    AUTO = "auto"
    COMPILED = "compiled"
    TORCH = "torch"


class KernelUnavailable(RuntimeError):
    """The compiled kernel was not built for this installation or this CPU (the message says why)."""


def kernel_disabled() -> bool:
    """``True`` when ``SKLEARN_BAYES_TRANSFER_KERNEL`` is set to 0/false/off/no."""
    return os.environ.get(_ENV_SWITCH, "").strip().lower() in {"0", "false", "off", "no"}


def _import(level: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"sklearn_bayes_transfer._kernels._fop_{level}")
    except ImportError:
        return None


def available_kernels() -> dict[str, ModuleType]:
    """The built kernel modules this CPU can run, by level name (``"generic"``, ``"x86_64_v3"``, ...).

    The generic module is safe on any CPU; it reports the CPU's level, which says which of the
    others may be imported.
    """
    generic = _import("generic")
    if generic is None:
        return {}
    cpu = generic.cpu_level()
    found = {"generic": generic}
    for level, needed in _LEVELS[:-1]:
        if cpu >= needed:
            module = _import(level)
            if module is not None:
                found[level] = module
    return found


@functools.lru_cache(maxsize=None)
def _best() -> ModuleType | None:
    kernels = available_kernels()
    return next((kernels[level] for level, _ in _LEVELS if level in kernels), None)


def load_kernel() -> ModuleType:
    """The best built kernel module for this CPU; :class:`KernelUnavailable` if none was built.

    Examples
    --------
    >>> try:
    ...     kernel = load_kernel()
    ... except KernelUnavailable:
    ...     kernel = None
    >>> kernel is None or callable(kernel.gram)
    True
    """
    module = _best()
    if module is None:
        raise KernelUnavailable("the compiled FOP kernel was not built when sklearn-bayes-transfer was installed "
                                "(no C compiler then?); reinstall with gcc or clang available, or use "
                                "backend='auto' or 'torch'")
    return module


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_forked = False


def _after_fork_in_child() -> None:
    # A forked child inherits the pools but not their threads (submitting would hang), and
    # GNU OpenMP's team is not usable after fork either: the child runs the loops on one thread.
    global _pools_lock, _forked
    _pools.clear()
    _pools_lock = threading.Lock()
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def balanced_ranges(sizes: list[int], n_threads: int) -> list[tuple[int, int]]:
    """Contiguous ranges of segments, one per thread, with about equal total ``sizes`` each.

    Examples
    --------
    >>> balanced_ranges([4, 4, 4, 4], 2)
    [(0, 2), (2, 4)]
    """
    bounds, total, acc = [0], sum(sizes), 0
    for s, n in enumerate(sizes):
        acc += n
        if len(bounds) < n_threads and acc >= total * len(bounds) / n_threads and s + 1 < len(sizes):
            bounds.append(s + 1)
    bounds.append(len(sizes))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [(0, 0)]


def run_segments(kernel: ModuleType, fn, ranges: list[tuple[int, int]], *args) -> None:
    """Call the loop function ``fn(first, end, threads, *args)`` over all segments.

    ``ranges`` split the segments into contiguous pieces of similar size, one per thread: an
    OpenMP build gets the whole range and the thread count, otherwise each piece runs on its own
    Python thread.
    """
    if kernel.openmp():
        fn(ranges[0][0], ranges[-1][1], 1 if _forked else len(ranges), *args)
    else:
        run_split(lambda a, b: fn(a, b, 1, *args), ranges)


def run_split(call, ranges: list[tuple[int, int]]) -> None:
    """Run ``call(start, stop)`` for each range, in parallel when there are several.

    The first range runs on the calling thread, the others on a small persistent pool.
    """
    futures = []
    if len(ranges) > 1 and not _forked:
        with _pools_lock:
            pool = _pools.get(len(ranges) - 1)
            if pool is None:
                pool = _pools[len(ranges) - 1] = ThreadPoolExecutor(len(ranges) - 1, thread_name_prefix="bt-kernel")
        futures = [pool.submit(call, *r) for r in ranges[1:]]
    else:
        for r in ranges[1:]:
            call(*r)
    try:
        call(*ranges[0])
    finally:
        for future in futures:
            future.result()

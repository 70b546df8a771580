"""Compiled CPU kernels, built from our C sources on first use and cached.

PyTorch's CPU operations cannot fuse element-wise work into the reads of a big array, and its
GEMMs are slow on tall matrices with a handful of columns. Two hot paths therefore have C
versions in ``_kernels/``:

- ``streaming.c``: the prior penalty's two passes over the factor (:mod:`.penalty`), fusing
  ``r = w - mean``, ``r / d`` and the widening of bfloat16 into one read of each array;
- ``fop.c``: :class:`~sklearn_bayes_transfer.optim.FOP`'s Gram products and fused
  momentum-plus-preconditioned update for parameters with at most 16 columns (3 x 3 convolutions).

Each is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a shared
library under the user cache directory and called through :mod:`ctypes`. With OpenMP (``-fopenmp``)
the library shares torch's OpenMP runtime (``libgomp.so.1`` is already loaded by torch), so its
loops run on torch's own worker threads, ``torch.get_num_threads()`` of them; a worker still
spinning after a torch operation picks the work up instead of competing with an extra thread for
the cores. Without OpenMP the segments are split over Python threads (ctypes releases the GIL).
No compiler, or a failed build, leaves the torch path in charge; results agree to float32 rounding.

Environment:

- ``SKLEARN_BAYES_TRANSFER_KERNEL=0`` turns the kernel off for ``backend="auto"``;
- ``SKLEARN_BAYES_TRANSFER_CACHE`` is where the built library goes (default
  ``$XDG_CACHE_HOME/sklearn-bayes-transfer`` or ``~/.cache/sklearn-bayes-transfer``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

__all__ = ["Backend", "KernelUnavailable", "balanced_ranges", "load_kernel", "kernel_disabled", "run_segments",
           "run_split"]

_SOURCES = Path(__file__).with_name("_kernels")
_BASE_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-ffp-contract=fast",
               # Let the compiler vectorise the float reductions; no NaN/Inf assumptions (no -ffast-math).
               "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
# Tried in order: OpenMP and the CPU's own instruction set (AVX-512 where present, used at full
# width), then less; a compiler that refuses a flag moves on to the next set.
_NATIVE = ["-march=native", "-mprefer-vector-width=512"]
_FLAG_SETS = tuple(_BASE_FLAGS + extra for extra in (
    ["-fopenmp", *_NATIVE], ["-fopenmp", "-march=native"], _NATIVE, ["-march=native"], ["-fopenmp"], []))
_log = logging.getLogger(__name__)
_ENV_SWITCH = "SKLEARN_BAYES_TRANSFER_KERNEL"
_ENV_CACHE = "SKLEARN_BAYES_TRANSFER_CACHE"


class Backend(str, Enum):
    """Which implementation runs a hot path that has a compiled CPU kernel.

    - ``"auto"``: the compiled kernel where it applies (CPU, float32, contiguous tensors; see
      each user) and can be built, else torch operations; ``SKLEARN_BAYES_TRANSFER_KERNEL=0`` in
      the environment turns the kernels off;
    - ``"compiled"``: the compiled kernel, and an error where it cannot be used;
    - ``"torch"``: torch operations only (any device and dtype).
    """

    AUTO = "auto"
    COMPILED = "compiled"
    TORCH = "torch"


class KernelUnavailable(RuntimeError):
    """The compiled kernel cannot be built or loaded here (the message says why)."""


def kernel_disabled() -> bool:
    """``True`` when ``SKLEARN_BAYES_TRANSFER_KERNEL`` is set to 0/false/off/no."""
    return os.environ.get(_ENV_SWITCH, "").strip().lower() in {"0", "false", "off", "no"}


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise KernelUnavailable("no C compiler found (set $CC, or install gcc or clang)")


def _cache_dir() -> Path:
    if os.environ.get(_ENV_CACHE):
        return Path(os.environ[_ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sklearn-bayes-transfer"


def _cpu_signature() -> str:
    # -march=native code is only valid on CPUs with the same instruction sets.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, flags: list[str], source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"'{compiler}' failed to build {source.name}: "
                                    f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        os.replace(tmp, target)  # atomic: a concurrent process sees the old library or the new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"cannot run the C compiler '{compiler}': {exc}") from None


def _library_path(compiler: str, flags: list[str], source: Path) -> Path:
    headers = [h.read_text() for h in sorted(_SOURCES.glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, " ".join(flags), _compiler_version(compiler),
                                    platform.machine(), _cpu_signature()]).encode()).hexdigest()[:20]
    return _cache_dir() / f"{source.stem}-{key}{'.dll' if os.name == 'nt' else '.so'}"


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
#: argument types of each library's functions
# Every loop function starts with (first segment, end segment, threads).
_SIGNATURES: dict[str, dict[str, list]] = {
    "streaming": {
        "bt_value_f32": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _P],
        "bt_value_bf16": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _P],
        "bt_grad_f32": [_I, _I, _I, _P, _P, _P, _F, _P, _P, _I, _I],
        "bt_grad_bf16": [_I, _I, _I, _P, _P, _P, _F, _P, _P, _I, _I],
        "bt_prox_f32": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _P],
        "bt_prox_bf16": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _P],
    },
    "fop": {
        "bt_fop_gram": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P],
        "bt_fop_update": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P],
    },
}


def _declare(lib: ctypes.CDLL, name: str) -> ctypes.CDLL:
    for function, argtypes in _SIGNATURES[name].items():
        fn = getattr(lib, function)
        fn.argtypes, fn.restype = argtypes, None
    lib.bt_openmp.argtypes, lib.bt_openmp.restype = [], ctypes.c_int
    lib.openmp = bool(lib.bt_openmp())
    return lib


@functools.lru_cache(maxsize=None)
def _load(name: str = "streaming") -> ctypes.CDLL | KernelUnavailable:
    source = _SOURCES / f"{name}.c"
    try:
        compiler = _compiler()
        errors = []
        for flags in _FLAG_SETS:
            try:
                target = _library_path(compiler, flags, source)
                if not target.exists():
                    _log.info("building %s with %s (once per machine and version; cached in %s)",
                              source.name, compiler, target.parent)
                    try:
                        _build(compiler, flags, source, target)
                    except OSError as exc:  # cache directory not writable: build for this process only
                        _log.info("cannot write to %s (%s); building in a temporary directory", target.parent, exc)
                        target = Path(tempfile.mkdtemp(prefix="bt-kernel-")) / target.name
                        _build(compiler, flags, source, target)
                return _declare(ctypes.CDLL(str(target)), name)
            except (KernelUnavailable, OSError, subprocess.SubprocessError, AttributeError) as exc:
                errors.append(str(exc))
        raise KernelUnavailable("; ".join(dict.fromkeys(errors)))
    except KernelUnavailable as exc:
        return exc


def load_kernel(name: str = "streaming") -> ctypes.CDLL:
    """The loaded kernel library ``_kernels/<name>.c`` (built on the process's first call if not cached).

    Raises :class:`KernelUnavailable` saying why when it cannot be built or loaded.
    """
    lib = _load(name)
    if isinstance(lib, KernelUnavailable):
        # A fresh exception each time: re-raising the cached one would grow its traceback forever.
        raise KernelUnavailable(str(lib))
    return lib


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


def run_segments(lib: ctypes.CDLL, fn, ranges: list[tuple[int, int]], *args) -> None:
    """Call the loop function ``fn(first, end, threads, *args)`` over all segments.

    ``ranges`` split the segments into contiguous pieces of similar size, one per thread: an
    OpenMP build gets the whole range and the thread count, otherwise each piece runs on its own
    Python thread.
    """
    if lib.openmp:
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

"""The compiled streaming kernel of the penalty: built from our C source on first use, cached.

PyTorch's CPU mat-vecs cannot fuse ``r = w - mean``, ``r / d`` and the factor's widening from
bfloat16 into one read of each array, so the pure torch passes of :mod:`.penalty` read and write
D-sized temporaries that cost as much as the factor at small K. ``_kernels/streaming.c`` does each
pass in one sweep. It is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
into a shared library under the user cache directory and called through :mod:`ctypes`, which
releases the GIL, so the segments of a pass are split over ``torch.get_num_threads()`` Python
threads. No compiler, or a failed build, leaves the torch path in charge; nothing else changes.

Environment:

- ``SKLEARN_BAYES_TRANSFER_KERNEL=0`` turns the kernel off for ``backend="auto"``;
- ``SKLEARN_BAYES_TRANSFER_CACHE`` is where the built library goes (default
  ``$XDG_CACHE_HOME/sklearn-bayes-transfer`` or ``~/.cache/sklearn-bayes-transfer``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["KernelUnavailable", "load_kernel", "kernel_disabled", "run_split"]

_SOURCE = Path(__file__).with_name("_kernels") / "streaming.c"
_BASE_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC",
               # Let the compiler vectorise the float reductions; no NaN/Inf assumptions (no -ffast-math).
               "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
_ENV_SWITCH = "SKLEARN_BAYES_TRANSFER_KERNEL"
_ENV_CACHE = "SKLEARN_BAYES_TRANSFER_CACHE"


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


def _build(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"'{compiler}' failed to build {_SOURCE.name}: "
                                    f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        os.replace(tmp, target)  # atomic: a concurrent process sees the old library or the new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_path(compiler: str, flags: list[str]) -> Path:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"cannot run the C compiler '{compiler}': {exc}") from None
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(flags), version, platform.machine(),
                                    _cpu_signature()]).encode()).hexdigest()[:20]
    return _cache_dir() / f"streaming-{key}{'.dll' if os.name == 'nt' else '.so'}"


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for name in ("bt_value_f32", "bt_value_bf16"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [i, i, p, p, p, p, p, p, p, i, i, p, p], None
    for name in ("bt_grad_f32", "bt_grad_bf16"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [i, i, p, p, p, f, p, p, i, i], None
    return lib


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | KernelUnavailable:
    try:
        compiler = _compiler()
        errors = []
        # -march=native first (AVX-512 / NEON widening of bfloat16); some compilers refuse it.
        for flags in (_BASE_FLAGS + ["-march=native"], _BASE_FLAGS):
            target = _library_path(compiler, flags)
            try:
                if not target.exists():
                    try:
                        _build(compiler, flags, target)
                    except PermissionError:
                        target = Path(tempfile.mkdtemp(prefix="bt-kernel-")) / target.name
                        _build(compiler, flags, target)
                return _declare(ctypes.CDLL(str(target)))
            except (KernelUnavailable, OSError, subprocess.SubprocessError, AttributeError) as exc:
                errors.append(str(exc))
        raise KernelUnavailable("; ".join(errors))
    except KernelUnavailable as exc:
        return exc


def load_kernel() -> ctypes.CDLL:
    """The loaded kernel library (built on the first call of the process if not cached).

    Raises :class:`KernelUnavailable` saying why when it cannot be built or loaded.
    """
    lib = _load()
    if isinstance(lib, KernelUnavailable):
        raise lib
    return lib


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools_in_child() -> None:
    # A forked child inherits the pools but not their threads; submitting to them would hang.
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def run_split(call, ranges: list[tuple[int, int]]) -> None:
    """Run ``call(start, stop)`` for each range, in parallel when there are several.

    The first range runs on the calling thread, the others on a small persistent pool.
    """
    if len(ranges) > 1:
        with _pools_lock:
            pool = _pools.get(len(ranges) - 1)
            if pool is None:
                pool = _pools[len(ranges) - 1] = ThreadPoolExecutor(len(ranges) - 1, thread_name_prefix="bt-kernel")
        futures = [pool.submit(call, *r) for r in ranges[1:]]
    else:
        futures = []
    try:
        call(*ranges[0])
    finally:
        for future in futures:
            future.result()

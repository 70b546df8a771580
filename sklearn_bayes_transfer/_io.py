"""Safe file output and input: atomic writes and loads that never execute code."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .exceptions import OutputExistsError, PriorFormatError

__all__ = ["atomic_write", "atomic_torch_save", "safe_torch_load"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The rename is atomic on POSIX file systems, so an interrupted write (an exception, Ctrl-C)
    leaves either the old file or nothing, never a half-written one.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file '{path}' already exists; pass --force (overwrite=True) to replace it")
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"cannot write '{path}': directory '{path.parent}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=overwrite)


def safe_torch_load(path: str | os.PathLike, *, what: str = "file", mmap: bool = False,
                    error: type[Exception] = PriorFormatError) -> Any:
    """Load a torch file with ``weights_only=True`` and turn every failure into ``error``.

    Files that would need arbitrary classes to unpickle are refused, never executed.
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{what} '{path}' does not exist")
    if path.is_dir():
        raise error(f"{what} '{path}' is a directory, expected a file written by torch.save")
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(
            f"{what} '{path}' was refused: it holds objects other than tensors and plain containers, "
            f"and loading it would run code ({first[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what} '{path}' is not a readable torch file (truncated or corrupt?): {msg[:200]}") from None

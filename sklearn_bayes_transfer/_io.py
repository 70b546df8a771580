"""Safe file output and input: atomic writes and loads that never execute code."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
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
        with warnings.catch_warnings():
            # torch warns about a foreign pickle protocol just before refusing the file; our error says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if _needs_code(detail):
            named = re.search(r"GLOBAL (\S+?)\.?(?:\s|$)", detail)
            reason = f"it references {named.group(1)}" if named else detail[:200]
            raise error(
                f"{what} '{path}' was refused: it holds objects other than tensors and plain containers, "
                f"and loading it would run code ({reason})"
            ) from None
        extra = f"; {detail[:200]}" if _has_torch_magic(path) else ""
        raise error(f"{what} '{path}' is not a file written by torch.save ({_looks_like(path)}{extra})") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes make torch.load fail with KeyError, IndexError, ...
        msg = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        if _has_torch_magic(path):
            raise error(f"{what} '{path}' is not a readable torch file (truncated or corrupt?): {msg[:200]}") from None
        raise error(f"{what} '{path}' is not a file written by torch.save ({_looks_like(path)})") from None


# Prefixes torch.save output starts with: a zip archive (the default) or a legacy pickle (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
# The weights-only unpickler's wording for content it refuses because it names code to run.
_CODE_MARKERS = ("GLOBAL", "unrecognized function", "new object", "Can only build")


def _has_torch_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)


def _looks_like(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(_ZIP_MAGIC):
        return "a zip archive that torch cannot read"
    if head.startswith(_PICKLE_MAGIC):
        return "it is a Python pickle, not a torch.save file"
    if head.startswith(b"\x93NUMPY"):
        return "it looks like a numpy .npy file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary content"
    return "it looks like a text file"


def _unpickler_detail(message: str) -> str:
    """The weights-only unpickler's own reason, without torch's advice on bypassing the check."""
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:") and line[len("WeightsUnpickler error:"):].strip():
            return line[len("WeightsUnpickler error:"):].strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return reasons[-1] if reasons else (lines[0] if lines else "unpickling failed")


def _needs_code(detail: str) -> bool:
    return any(marker in detail for marker in _CODE_MARKERS)

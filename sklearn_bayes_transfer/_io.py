"""Safe file output and input: atomic writes and loads that never execute code."""

from __future__ import annotations

import os
import pickle
import re
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .exceptions import OutputExistsError, OutputWriteError, PriorFormatError

__all__ = ["atomic_torch_save", "atomic_write", "check_input_file", "check_output_path", "own_storages",
           "safe_torch_load"]


def check_output_path(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Where an output file will be written, checked before any work; raises naming ``path``.

    A symbolic link is written through (its target is replaced, the link stays). Refused: an
    existing file without ``overwrite``, anything but a regular file (a directory, a device such
    as ``/dev/full``, a FIFO), a missing or unwritable directory.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.exists():
        if not overwrite:
            raise OutputExistsError(f"output file '{path}' already exists; pass --force (overwrite=True) to replace it")
        if target.is_dir():
            raise IsADirectoryError(f"output '{path}' is a directory; give a file name")
        if not target.is_file():
            raise OutputWriteError(f"output '{path}' is not a regular file ({_kind(target)}); give a file path")
    parent = target.parent
    if not parent.exists():
        raise FileNotFoundError(f"cannot write '{path}': directory '{parent}' does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write '{path}': '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write '{path}': directory '{parent}' is not writable")
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)``, then move the finished file onto ``path`` atomically.

    An interrupted write (an exception, Ctrl-C, SIGKILL) leaves the old file or nothing, never a
    half-written one. The file and its directory are flushed to disk before the move. Without
    ``overwrite`` the move fails if ``path`` appeared meanwhile (a hard link, which never replaces),
    so two runs cannot overwrite each other. A new file gets the permissions the umask allows, a
    replaced one keeps its own; a symbolic link is written through. Errors name ``path``.
    """
    shown = Path(path)
    target = check_output_path(shown, overwrite=overwrite)
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            os.chmod(tmp, mode)
            _fsync(tmp)
        except OSError as exc:
            raise OutputWriteError(f"cannot write '{shown}': {exc.strerror or exc}") from None
        if overwrite:
            os.replace(tmp, target)
        else:
            _move_exclusive(tmp, target, shown)
        _fsync(target.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return shown


def _move_exclusive(tmp: str, target: Path, shown: Path) -> None:
    try:
        os.link(tmp, target)  # fails if target exists, however it got there
    except FileExistsError:
        raise OutputExistsError(f"output file '{shown}' appeared while this run was writing it; pass --force "
                                "(overwrite=True) to replace it") from None
    except OSError:  # a file system without hard links: claim the name exclusively, then replace it
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise OutputExistsError(f"output file '{shown}' appeared while this run was writing it; pass --force "
                                    "(overwrite=True) to replace it") from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the data itself was synced
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input_file(path: str | os.PathLike, what: str, error: type[Exception]) -> Path:
    """An existing regular file, or ``error`` naming ``path`` (devices and pipes could be read forever)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise error(f"{what} '{path}' is a symbolic link to '{os.readlink(path)}', which does not exist") \
                from None
        raise error(f"{what} '{path}' does not exist") from None
    except OSError as exc:  # a symlink loop (ELOOP), a permission problem on the way
        raise error(f"{what} '{path}' cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} '{path}' is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} '{path}' is not a regular file ({_kind(path)}); expected a file")
    return path


def own_storages(value: Any) -> Any:
    """``value`` with every tensor (in dicts and lists) that views part of a larger storage copied.

    Tensors read from a memory-mapped safetensors file view one storage, which ``torch.save``
    cannot write as several dtypes; whole tensors are kept as they are.
    """
    if isinstance(value, torch.Tensor):
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        return value if whole and value.storage_offset() == 0 else value.clone()
    if isinstance(value, dict):
        return {k: own_storages(v) for k, v in value.items()}
    if isinstance(value, list):
        return [own_storages(v) for v in value]
    return value


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=overwrite)


def safe_torch_load(path: str | os.PathLike, *, what: str = "file", mmap: bool = False,
                    error: type[Exception] = PriorFormatError) -> Any:
    """Load a torch file with ``weights_only=True`` and turn every failure into ``error``.

    Files that would need arbitrary classes to unpickle are refused, never executed.
    """
    path = check_input_file(path, what, error)
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            # torch warns about a foreign pickle protocol just before refusing the file; our error says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            if path.suffix == ".safetensors":
                # torch.load hands a path with this suffix to safetensors; read the bytes ourselves.
                with open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
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

"""safetensors files: written with the safetensors library, read memory-mapped without copies.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte range, plus a ``__metadata__`` map of strings) and the tensors' bytes. Reading maps
the file once (``torch.UntypedStorage.from_file``, copy-on-write) and views each tensor in place,
after checking every range against the file's size, so a truncated or forged file is refused
before anything is read from it. No pickle is involved either way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ._io import atomic_write, check_input_file
from .exceptions import ConfigError

__all__ = ["file_format_for", "is_safetensors", "read_safetensors", "write_safetensors"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# A header longer than this is not a prior's or a model's (it would describe millions of tensors).
_MAX_HEADER = 100 * 2**20


def file_format_for(path: str | os.PathLike, file_format: str | None) -> str:
    """``file_format`` checked, or by default ``"safetensors"`` for a name ending in ``.safetensors``, else ``"torch"``."""
    kind = file_format or ("safetensors" if str(path).endswith(".safetensors") else "torch")
    if kind not in ("torch", "safetensors"):
        raise ConfigError(f"file_format={file_format!r} is not valid; expected 'torch' or 'safetensors'")
    return kind


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file starts like a safetensors file (a plausible header length, then ``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= _MAX_HEADER and head[8:9] == b"{"


def write_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | os.PathLike,
                      *, overwrite: bool = True) -> Path:
    """Write ``tensors`` and string ``metadata`` atomically (see :func:`~._io.atomic_write`)."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=dict(metadata)), overwrite=overwrite)


def read_safetensors(path: str | os.PathLike, *, what: str,
                     error: type[Exception]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (views of a copy-on-write mapping of the file) and the metadata; ``error`` names the file."""
    path = check_input_file(path, what, error)
    size = path.stat().st_size

    def bad(msg: str) -> Exception:
        return error(f"{what} '{path}' is not a valid safetensors file: {msg}")

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise bad(f"its header length {n} does not fit a file of {size} bytes (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not a map of strings")
    base = 8 + n
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size > base else None
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has an invalid entry {info!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= s
        if min(shape, default=1) < 0 or not 0 <= start <= end <= size - base or end - start != numel * itemsize:
            raise bad(f"tensor {name!r} claims bytes {start}..{end} for shape {shape} of {info['dtype']}, which the "
                      f"{size - base} data bytes do not hold (truncated?)")
        offset = base + start
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif offset % itemsize == 0:
            tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)
        else:  # an unaligned range (not written by safetensors itself): copy it out
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (end - start,))
            tensors[name] = raw.clone().view(dtype).reshape(shape)
    return tensors, metadata

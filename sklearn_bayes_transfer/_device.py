"""Devices and seeds, one way for the whole package: ``"auto"`` resolved the same everywhere, and a
seeding context that covers CUDA as well as the CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .exceptions import ConfigError

__all__ = ["resolve_device", "seeded"]


def resolve_device(device: Any, argument: str = "device") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other values are checked.

    Raises :class:`ConfigError` naming ``argument`` for an unknown device, or a CUDA device asked
    for where none is visible.

    Examples
    --------
    >>> resolve_device("cpu")
    'cpu'
    >>> resolve_device("auto") in ("cpu", "cuda")
    True
    """
    expected = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"{argument}={device!r} is not valid; {expected}")
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{argument}={device!r} is not valid; {expected}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{argument}={device!r} was asked for but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return device


@contextlib.contextmanager
def seeded(random_state: int | None, device: Any = "cpu") -> Iterator[None]:
    """Seed torch's generators for a block and restore them afterwards (nothing for ``None``).

    The CPU generator and, when ``device`` is a CUDA device, that device's generator are forked,
    so the caller's random streams continue as if the block had not run.
    """
    if random_state is None:
        yield
        return
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise ConfigError(f"random_state={random_state!r} is not valid; expected None or an integer >= 0")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    cuda = [dev.index or 0] if dev.type == "cuda" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(random_state))
        yield

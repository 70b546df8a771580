"""Checks shared by the modules: choices, plain-python content, and state-dict mismatch reports.

One wording for every invalid choice; one rule for what "plain" means (what a prior or model file
may hold so that ``torch.load(weights_only=True)`` reads it); one report of what does not fit when
tensors are matched by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch

from .exceptions import ConfigError

__all__ = ["PLAIN_TYPES", "check_choice", "mismatch_report", "plain"]

#: Scalar types a prior's or model file's metadata may hold (with lists and str-keyed dicts of them).
PLAIN_TYPES = (str, int, float, bool, type(None))

E = TypeVar("E", bound=Enum)


def check_choice(enum: type[E], value: Any, argument: str) -> E:
    """``enum(value)``, or a :class:`ConfigError` naming ``argument`` and listing the allowed values.

    Examples
    --------
    >>> from sklearn_bayes_transfer.prior import PriorStructure
    >>> check_choice(PriorStructure, "diag", "prior_structure")
    <PriorStructure.DIAG: 'diag'>
    """
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ConfigError(f"{argument}={value!r} is not valid; expected one of {allowed}") from None


def plain(value: Any, where: str, *, error: type[Exception] = ConfigError, tensors: bool = False) -> Any:
    """``value`` as plain python (tuples become lists, enums their values, numpy and torch scalars
    python numbers; with ``tensors``, tensors move to the CPU), or ``error`` naming ``where``.

    Examples
    --------
    >>> plain({"a": (1, np.float32(0.5))}, "meta")
    {'a': [1, 0.5]}
    """
    if isinstance(value, PLAIN_TYPES):
        return value
    if isinstance(value, Enum):
        return plain(value.value, where, error=error, tensors=tensors)
    if tensors and isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]", error=error, tensors=tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise error(f"{where} has non-string keys; only dicts with string keys can be stored")
        return {k: plain(v, f"{where}[{k!r}]", error=error, tensors=tensors) for k, v in value.items()}
    raise error(f"{where} holds a {type(value).__name__}; only {'tensors and ' if tensors else ''}plain python "
                "(str, int, float, bool, None, lists and dicts of them) can be stored")


def mismatch_report(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], *,
                    expected_name: str, found_name: str, unexpected: bool = True, limit: int = 5) -> str | None:
    """What does not fit when tensors are matched by name, in one line; ``None`` when all fits.

    ``expected`` and ``found`` map names to shapes; names missing from ``found``, names only in
    ``found`` (with ``unexpected``) and shapes that differ are listed, the first ``limit`` of each.

    Examples
    --------
    >>> mismatch_report({"a": (2,), "b": (3,)}, {"a": (4,), "c": (1,)}, expected_name="model",
    ...                 found_name="file")
    '1 missing: b; 1 unexpected: c; 1 shape mismatch: a: model (2,) vs file (4,)'
    """
    def listed(items: list[str], separator: str = ", ") -> str:
        return separator.join(items[:limit]) + (", ..." if len(items) > limit else "")

    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected] if unexpected else []
    wrong = [f"{n}: {expected_name} {tuple(shape)} vs {found_name} {tuple(found[n])}"
             for n, shape in expected.items() if n in found and tuple(found[n]) != tuple(shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {listed(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected: {listed(extra)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch{'es' if len(wrong) > 1 else ''}: {listed(wrong, '; ')}")
    return "; ".join(parts) or None

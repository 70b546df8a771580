"""Checks shared by the modules: declarative parameter constraints, choices, plain-python content,
and state-dict mismatch reports.

One wording for every invalid choice; one rule for what "plain" means (what a prior or model file
may hold so that ``torch.load(weights_only=True)`` reads it); one report of what does not fit when
tensors are matched by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from numbers import Integral, Real
from typing import Any, TypeVar

import numpy as np
import torch

from .exceptions import ConfigError

__all__ = ["PLAIN_TYPES", "HasMethods", "Integral", "Interval", "Options", "Real", "as_numpy", "check_choice", "check_params",
           "mismatch_report", "plain", "qualified_name"]

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


def as_numpy(x: Any) -> np.ndarray:
    """An array-like or tensor (any device; bfloat16 widened, as numpy has none) as a numpy array.

    Examples
    --------
    >>> as_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype
    dtype('float32')
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as files and settings record one.

    Examples
    --------
    >>> import torch
    >>> qualified_name(torch.optim.SGD)
    'torch.optim.sgd.SGD'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


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


# -- declarative parameter constraints ------------------------------------------------------------------------
class Interval:
    """Numbers of one kind (``Integral`` or ``Real``, never ``bool``) between two bounds.

    ``closed`` says which ends belong: ``"both"``, ``"left"``, ``"right"`` or ``"neither"``; a bound
    of ``None`` is unbounded. Real numbers must also be finite.

    Examples
    --------
    >>> 0.5 in Interval(Real, 0, 1, closed="left"), 1 in Interval(Real, 0, 1, closed="left")
    (True, False)
    >>> str(Interval(Integral, 1, None)), str(Interval(Real, 0, None, closed="neither"))
    ('an integer >= 1', 'a finite number > 0')
    """

    def __init__(self, kind: type, low: float | None, high: float | None, *, closed: str = "both") -> None:
        if kind not in (Integral, Real) or closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"Interval({kind!r}, closed={closed!r}) is not a valid constraint")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        value = float(value)
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or value == self.low and self.closed in ("right", "neither")):
            return False
        if self.high is not None and (value > self.high or value == self.high and self.closed in ("left", "neither")):
            return False
        return True

    def __str__(self) -> str:
        what = "an integer" if self.kind is Integral else "a finite number"
        low_op = ">=" if self.closed in ("both", "left") else ">"
        high_op = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            return f"{what} {low_op} {self.low:g} and {high_op} {self.high:g}"
        if self.low is not None:
            return f"{what} {low_op} {self.low:g}"
        if self.high is not None:
            return f"{what} {high_op} {self.high:g}"
        return what


class Options:
    """One of a set of strings (or of a ``str`` enum's values).

    Examples
    --------
    >>> from sklearn_bayes_transfer.prior import PriorStructure
    >>> "diag" in Options(PriorStructure), str(Options({"auto"}))
    (True, "'auto'")
    """

    def __init__(self, values: Iterable[str] | type[Enum]) -> None:
        self.values = tuple(m.value for m in values) if isinstance(values, type) else tuple(sorted(values))

    def __contains__(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def __str__(self) -> str:
        return ", ".join(repr(v) for v in self.values)


class HasMethods:
    """Any object with these methods (duck typing, as scikit-learn's ``HasMethods``).

    Examples
    --------
    >>> [] in HasMethods(["append"]), str(HasMethods(["prepare"]))
    (True, 'an object with prepare()')
    """

    def __init__(self, methods: Sequence[str]) -> None:
        self.methods = tuple(methods)

    def __contains__(self, value: Any) -> bool:
        return all(callable(getattr(value, m, None)) for m in self.methods)

    def __str__(self) -> str:
        return "an object with " + ", ".join(f"{m}()" for m in self.methods)


def _satisfies(value: Any, constraint: Any) -> bool:
    if constraint is None:
        return value is None
    if constraint == "callable":
        return callable(value) and not isinstance(value, str)
    if isinstance(constraint, type):
        return isinstance(value, constraint)
    return value in constraint


def _describe(constraint: Any) -> str:
    if constraint is None:
        return "None"
    if constraint == "callable":
        return "a callable"
    if isinstance(constraint, type):
        return f"a {constraint.__name__}"
    if isinstance(constraint, Options):
        return f"one of {constraint}"
    return str(constraint)


def check_params(values: Mapping[str, Any], constraints: Mapping[str, Sequence[Any]], *,
                 names: Mapping[str, str] | None = None, hints: Mapping[str, str] | None = None) -> None:
    """Check every value of ``values`` that has constraints against them, in the style of
    scikit-learn's ``_parameter_constraints``: a value is valid when it meets any of its
    constraints (an :class:`Interval`, :class:`Options`, a type, ``"callable"``, or ``None`` for
    ``None``). The first invalid one raises :class:`ConfigError` naming it (as ``names[key]``, e.g.
    the command line's ``--option``), listing what is expected and adding ``hints[key]`` if given.

    Examples
    --------
    >>> check_params({"lr": 0.1}, {"lr": [Interval(Real, 0, None, closed="neither")]})
    >>> check_params({"lr": 0}, {"lr": [Interval(Real, 0, None, closed="neither")]}, names={"lr": "--lr"})
    Traceback (most recent call last):
    ...
    sklearn_bayes_transfer.exceptions.ConfigError: --lr 0 is not valid; expected a finite number > 0
    """
    for key, allowed in constraints.items():
        if key not in values:
            continue
        value = values[key]
        if any(_satisfies(value, constraint) for constraint in allowed):
            continue
        name = (names or {}).get(key, key)
        shown = f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"
        expected = " or ".join(_describe(c) for c in allowed)
        hint = (hints or {}).get(key)
        raise ConfigError(f"{shown} is not valid; expected {expected}" + (f" ({hint})" if hint else ""))

"""Argument checks shared by the modules: one wording for every invalid choice."""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

from .exceptions import ConfigError

__all__ = ["check_choice"]

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

"""When Bayesian inference samples during a fit: the plan of the sampling phase, checked before
training, and the cyclical step size of SGLD."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from ._validation import Integral, Interval, Options, Real, check_params
from .exceptions import ConfigError

__all__ = ["SAMPLING_CONSTRAINTS", "Inference", "SamplingPlan", "cyclical_step_size", "plan_sampling"]


class Inference(str, Enum):
    """What ``fit`` keeps and ``predict_proba`` averages over.

    - ``"map"``: the fitted weights (ordinary fine-tuning);
    - ``"swag"``: ``n_samples`` draws from a SWAG posterior collected during the last part of
      fine-tuning;
    - ``"sgld"``: ``n_samples`` iterates of cyclical stochastic-gradient Langevin dynamics;
    - ``"laplace"``: ``n_samples`` draws from the Laplace posterior at the fitted weights, with the
      learned prior and the diagonal Fisher of the data (docs/evidence.md).
    """

    MAP = "map"
    SWAG = "swag"
    SGLD = "sgld"
    LAPLACE = "laplace"


@dataclass(frozen=True)
class SamplingPlan:
    """When a fit of ``max_epochs`` epochs samples.

    Attributes
    ----------
    inference : Inference
    start : int
        Epochs (of this fit) before the sampling phase.
    n_epochs : int
        Epochs in the sampling phase.
    sample_epochs : tuple of int
        Epochs of the phase (0-based) at whose end a SWAG snapshot or an SGLD sample is taken.
    cycles : int
        SGLD step size cycles over the phase.
    """

    inference: Inference
    start: int
    n_epochs: int
    sample_epochs: tuple[int, ...]
    cycles: int = 1


#: Constraints of the sampling arguments (:func:`plan_sampling`, the estimators' hyperparameters).
SAMPLING_CONSTRAINTS: dict[str, list[Any]] = {
    "inference": [Options(Inference)],
    "max_epochs": [Interval(Integral, 1, None)],
    "n_samples": [Interval(Integral, 1, None)],
    "sample_start": [Interval(Real, 0, 1, closed="left")],
    "sample_every": [Interval(Integral, 1, None)],
    "sgld_cycles": [Interval(Integral, 1, None)],
}


def plan_sampling(
    inference: Inference | str,
    *,
    max_epochs: int,
    n_samples: int,
    sample_start: float = 0.5,
    sample_every: int = 1,
    sgld_cycles: int = 4,
) -> SamplingPlan:
    """Plan the sampling phase of a fit, or say why it cannot give what is asked.

    The phase starts after ``floor(sample_start * max_epochs)`` epochs. SWAG takes a snapshot at
    the end of every ``sample_every``-th epoch of it. SGLD cuts it into ``sgld_cycles`` cosine
    cycles and keeps ``n_samples`` of the epochs (every ``sample_every``-th) that end in the
    second, low-step-size half of a cycle, evenly spread over them, so every cycle contributes.

    Raises
    ------
    ConfigError
        If the phase is empty, SWAG would get fewer than 2 snapshots, or SGLD fewer samples than
        ``n_samples``; the message says what to change.

    Examples
    --------
    >>> plan = plan_sampling("sgld", max_epochs=16, n_samples=4, sample_start=0.5, sgld_cycles=2)
    >>> plan.start, plan.sample_epochs   # epochs 2, 3 and 6, 7 of the phase end low in a cycle
    (8, (2, 3, 6, 7))
    """
    check_params(dict(inference=inference, max_epochs=max_epochs, n_samples=n_samples, sample_start=sample_start,
                      sample_every=sample_every, sgld_cycles=sgld_cycles), SAMPLING_CONSTRAINTS)
    inference, cycles = Inference(inference), int(sgld_cycles)
    max_epochs, sample_every, sample_start = int(max_epochs), int(sample_every), float(sample_start)
    if inference in (Inference.MAP, Inference.LAPLACE):  # trained as MAP; Laplace samples after training
        return SamplingPlan(inference, max_epochs, 0, ())
    start = int(math.floor(sample_start * max_epochs))
    n_epochs = max_epochs - start
    more = ("train more epochs (max_epochs), start sampling earlier (lower sample_start), "
            "collect more often (smaller sample_every)")
    if inference is Inference.SWAG:
        epochs = tuple(j for j in range(n_epochs) if (j + 1) % sample_every == 0)
        if len(epochs) < 2:
            raise ConfigError(
                f"inference='swag' would collect {len(epochs)} SWAG snapshot(s) (max_epochs={max_epochs}, "
                f"sample_start={sample_start:g}, sample_every={sample_every}) but a covariance needs at least 2; "
                f"{more}")
        return SamplingPlan(inference, start, n_epochs, epochs)
    if n_epochs < cycles:
        raise ConfigError(f"inference='sgld' with sgld_cycles={cycles} needs a sampling phase of at least {cycles} "
                          f"epochs, but max_epochs={max_epochs} with sample_start={sample_start:g} leaves "
                          f"{n_epochs}; train more epochs, lower sample_start or use fewer cycles")
    # Where epoch j's end falls in its cycle, in (0, 1] (1 = the cycle's last step), times n_epochs.
    ends = [((j + 1) * cycles - 1) % n_epochs + 1 for j in range(n_epochs)]
    candidates = [j for j in range(n_epochs) if (j + 1) % sample_every == 0 and 2 * ends[j] > n_epochs]
    if len(candidates) < n_samples:
        raise ConfigError(
            f"inference='sgld' keeps samples at the ends of epochs in the low-step-size half of each of the "
            f"sgld_cycles={cycles} cycles, every sample_every={sample_every} epoch(s): max_epochs={max_epochs} with "
            f"sample_start={sample_start:g} gives {len(candidates)} such epoch(s), fewer than n_samples={n_samples}. "
            f"To collect more, {more}; or ask for fewer samples (n_samples)")
    chosen = np.round(np.linspace(len(candidates) - 1, 0, int(n_samples)))[::-1].astype(int)
    return SamplingPlan(inference, start, n_epochs, tuple(candidates[i] for i in chosen), cycles)


def cyclical_step_size(step: int, total_steps: int, cycles: int, max_lr: float) -> float:
    """Cosine step size restarted ``cycles`` times over ``total_steps`` (Zhang et al., 2020).

    ``max_lr / 2 * (1 + cos(pi * u))`` with ``u`` the position of ``step`` in its cycle, in [0, 1).

    Examples
    --------
    >>> [round(cyclical_step_size(k, 8, 2, 1.0), 3) for k in range(8)]
    [1.0, 0.854, 0.5, 0.146, 1.0, 0.854, 0.5, 0.146]
    """
    length = total_steps / cycles
    u = math.fmod(step, length) / length
    return 0.5 * max_lr * (1.0 + math.cos(math.pi * u))

"""Bayesian inference for the downstream estimators: SWAG and SGLD samples, model averaging.

``inference`` picks what ``fit`` keeps and what ``predict_proba`` returns:

- ``"map"``: the fitted weights, as ordinary fine-tuning;
- ``"swag"``: a SWAG posterior (Maddox et al., 2019) collected with the reused
  :class:`~sklearn_bayes_transfer.swag.SwagCallback` over the last part of fine-tuning, at a
  constant learning rate ``sample_lr``, from which ``n_samples`` weight vectors are drawn;
- ``"sgld"``: stochastic-gradient Langevin dynamics on the same prior-regularised loss, with the
  cyclical cosine step size of Zhang et al. (2020, "Cyclical Stochastic Gradient MCMC"), keeping
  ``n_samples`` iterates at the ends of epochs in the low-step-size half of each cycle.

``predict_proba`` averages the network's predicted probabilities (its own predict nonlinearity:
softmax over the classes, over dim 1 for a segmenter) over the samples: Bayesian model averaging.
Samples are kept compactly as one float32 matrix ``samples_`` of shape ``(S, D)`` over all of
``module_.named_parameters()`` (on ``inference_device``, the CPU by default), beside
``sample_buffers_`` ``(S, B)``: the BatchNorm running statistics recomputed for every sample at the
end of ``fit`` on (up to :data:`~sklearn_bayes_transfer.batchnorm.BN_MAX_EXAMPLES` of) the inputs passed to ``fit``. Recomputing them
once there, rather than at every prediction, means predictions and model files need no training
data.

Langevin noise, derived. The training loss is one negative log-posterior per example,
``L(w) = U(w) / N`` (``U`` the negative log-posterior of the ``N`` training examples, estimated on
the batch). Langevin dynamics for ``p_T(w) ~ exp(-U(w) / T)`` take the step
``w <- w - eps * grad U + sqrt(2 eps T) xi``. An SGD step of learning rate ``lr`` on ``L`` moves by
``lr * grad L = (lr / N) grad U``, so ``eps = lr / N``, and the noise added after each optimizer
step has standard deviation ``sqrt(2 lr T / N)``. This is exactly what happens with
``prior_update="gradient"``.

With the proximal prior update (plain SGD, the default) the optimizer steps on the task loss and
head term only, and the Gaussian prior ``N(m, Sigma)`` (``Sigma`` = the scaled prior covariance
in use, ``P = Sigma^{-1}``) is then applied exactly as ``w <- m + A (w - m)``,
``A = (I + S P)^{-1}``, ``S = diag(eps)``. For the weights it covers, the noise ``zeta`` is added
between the two, with covariance ``T (2 S + S P S)``: then ``A (T Sigma + T (2 S + S P S)) A^T =
T Sigma``, so the chain leaves the tempered prior ``N(m, T Sigma)`` exactly invariant for every
step size, however stiff the prior (explicit Euler-Maruyama diverges there, as MAP's gradient
step does; plain ``2 eps T`` noise before the prox would collapse stiff weights onto the mean).
For ``eps P -> 0`` it is plain SGLD noise. It is drawn as
``zeta = sqrt(2 T S) xi + sqrt(T) S P s`` with ``s ~ N(0, Sigma)`` (``Cov(P s) = P``), where
``P s`` is the gradient of the prior's own penalty at ``m + s``: one pass over the factor to draw
``s`` and the penalty's two. The task loss and head term move through the gradient step (a
Lie-Trotter splitting), and ``temperature = 0`` leaves exactly the MAP update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from skorch.callbacks import Callback
from torch import nn

from .batchnorm import batchnorm_buffers, batchnorm_inputs, recompute_batchnorm
from .exceptions import ConfigError, PriorFormatError
from .penalty import PriorPenalty
from ._validation import check_choice
from .swag import SwagCallback

__all__ = [
    "SWAG_RANK",
    "BayesianInferenceCallback",
    "BayesianInferenceMixin",
    "Inference",
    "PriorPrecisionSampler",
    "SamplingPlan",
    "cyclical_step_size",
    "check_sampling_arguments",
    "langevin_noise_",
    "plan_sampling",
]

#: Deviation columns of the downstream SWAG posterior (the SWAG paper's default), fewer if fewer
#: snapshots are planned.
SWAG_RANK = 20


class Inference(str, Enum):
    """What ``fit`` keeps and ``predict_proba`` averages over.

    - ``"map"``: the fitted weights (ordinary fine-tuning);
    - ``"swag"``: ``n_samples`` draws from a SWAG posterior collected during the last part of
      fine-tuning;
    - ``"sgld"``: ``n_samples`` iterates of cyclical stochastic-gradient Langevin dynamics.
    """

    MAP = "map"
    SWAG = "swag"
    SGLD = "sgld"


# -- the plan ---------------------------------------------------------------------------------------
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


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name}={value!r} is not valid; expected an integer >= {low}")
    return int(value)


def _check_float(value: Any, name: str, *, low: float, high: float | None = None, strict: bool = False,
                 hint: str = "") -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))
    ok = ok and (float(value) > low if strict else float(value) >= low) and (high is None or float(value) < high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise ConfigError(f"{name}={value!r} is not valid; expected a finite number {bound}{hint}")
    return float(value)


def check_sampling_arguments(inference: Inference | str, *, n_samples: int, sample_start: float, sample_every: int,
                             sgld_cycles: int) -> tuple[Inference, float, int, int]:
    """Validate the sampling arguments of :func:`plan_sampling`, before the length of a fit is known.

    Returns ``(inference, sample_start, sample_every, sgld_cycles)`` as an :class:`Inference`,
    a float and two ints.
    """
    inference = check_choice(Inference, inference, "inference")
    _check_int(n_samples, "n_samples", 1)
    sample_every = _check_int(sample_every, "sample_every", 1)
    cycles = _check_int(sgld_cycles, "sgld_cycles", 1)
    sample_start = _check_float(sample_start, "sample_start", low=0.0, high=1.0,
                                hint=" (the fraction of max_epochs trained before sampling starts)")
    return inference, sample_start, sample_every, cycles


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
    max_epochs = _check_int(max_epochs, "max_epochs", 1)
    inference, sample_start, sample_every, cycles = check_sampling_arguments(
        inference, n_samples=n_samples, sample_start=sample_start, sample_every=sample_every, sgld_cycles=sgld_cycles)
    if inference is Inference.MAP:
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


# -- Langevin noise -----------------------------------------------------------------------------------
class PriorPrecisionSampler:
    """Draws ``P s`` with ``s ~ N(0, Sigma)``, i.e. a sample of ``N(0, P)``, for a penalty's prior.

    ``Sigma = diag(d) + scale * F^T F`` is the covariance the penalty uses (``d = scale *
    variance + eps``, its reduced prior's factor ``F``) and ``P = Sigma^{-1}``: ``s`` costs one
    pass over the factor and ``P s`` is the gradient of the penalty at ``mean + s`` (its own two
    passes). ``sqrt(d)``, the mean and the factor are prepared once, on ``device``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer import Prior, PriorPenalty
    >>> prior = Prior.from_module(torch.nn.Linear(3, 2), variance=0.5)
    >>> sampler = PriorPrecisionSampler(PriorPenalty(prior), "cpu")
    >>> [tuple(t.shape) for t in sampler.sample(torch.Generator().manual_seed(0))]
    [(2, 3), (2,)]
    """

    def __init__(self, penalty: PriorPenalty, device: str | torch.device) -> None:
        prior = penalty.prior
        device = torch.device(device)
        self.penalty = penalty
        self.sqrt_d = (penalty.scale * prior.variance.to(device, torch.float64) + penalty.eps).sqrt_().float()
        self.mean = prior.mean.to(device, torch.float32)
        self.factor = (prior.factor.to(device, torch.float32) * math.sqrt(penalty.scale)) if prior.rank else None

    def sample(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``P s`` split into the prior's parameter shapes (float32, on the sampler's device)."""
        s = torch.randn(self.mean.shape, generator=generator, device=self.mean.device).mul_(self.sqrt_d)
        if self.factor is not None:
            s.add_(torch.randn(len(self.factor), generator=generator, device=s.device) @ self.factor)
        points = [v.detach().requires_grad_(True) for v in self.penalty.prior.split(s.add_(self.mean)).values()]
        with torch.enable_grad():
            return list(torch.autograd.grad(self.penalty(points), points))


@torch.no_grad()
def langevin_noise_(
    params: Sequence[torch.Tensor],
    steps: Sequence[float],
    temperature: float,
    generator: torch.Generator | None = None,
    prox: tuple[PriorPenalty | PriorPrecisionSampler, Sequence[torch.Tensor]] | None = None,
) -> None:
    """Add one step's Langevin noise to ``params``, in place (see the module docstring).

    Parameters
    ----------
    params : sequence of tensors
        Weights just moved by a gradient step.
    steps : sequence of float
        ``eps = lr / N`` per tensor: the step size on the negative log-posterior ``U``.
    temperature : float
        ``T >= 0``; ``0`` adds nothing.
    generator : torch.Generator, optional
        Source of the noise, on the tensors' device.
    prox : (PriorPenalty or PriorPrecisionSampler, sequence of tensors), optional
        A penalty (or a sampler prepared for it) and the tensors it covers (some of ``params``)
        when ``penalty.prox_`` with the same ``steps`` follows: those get noise
        ``sqrt(2 T eps) xi + sqrt(T) eps P s`` (covariance ``T (2 S + S P S)``), which the prox
        turns into an exact Langevin step for the prior; the others get ``sqrt(2 T eps) xi``.

    Examples
    --------
    >>> import torch
    >>> w = torch.zeros(100_000)
    >>> langevin_noise_([w], [0.01], temperature=1.0, generator=torch.Generator().manual_seed(0))
    >>> round(float(w.std()), 2)   # sqrt(2 * 0.01)
    0.14
    """
    if temperature == 0:
        return
    shaped: dict[int, torch.Tensor] = {}
    if prox is not None:
        sampler, covered = prox
        if not isinstance(sampler, PriorPrecisionSampler):
            sampler = PriorPrecisionSampler(sampler, covered[0].device)
        shaped = {id(p): v.to(p.dtype) for p, v in zip(covered, sampler.sample(generator))}
    for p, eps in zip(params, steps):
        if eps == 0:
            continue
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        noise.mul_(math.sqrt(2.0 * eps * temperature))
        if id(p) in shaped:
            noise.add_(shaped[id(p)], alpha=eps * math.sqrt(temperature))
        p.add_(noise)


# -- flat weights -------------------------------------------------------------------------------------------
@torch.no_grad()
def _copy_to_flat(tensors: Iterable[torch.Tensor], out: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        out[offset:offset + n].copy_(t.detach().reshape(-1))
        offset += n


@torch.no_grad()
def _copy_from_flat(tensors: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _all_named_parameters(net: Any) -> list[tuple[str, nn.Parameter]]:
    """The downstream posterior covers the whole network, head included."""
    return list(net.module_.named_parameters())


def _as_device(value: Any) -> torch.device:
    try:
        return torch.device(value)
    except (TypeError, RuntimeError, ValueError):
        raise ConfigError(f"inference_device={value!r} is not valid; expected a device such as 'cpu' or 'cuda'") \
            from None


def _seed(random_state: Any) -> int:
    if random_state is None:
        # From torch's global generator, so torch.manual_seed makes the run reproducible.
        return int(torch.randint(0, 2**62, ()))
    return _check_int(random_state, "random_state", 0)


# -- the callback ---------------------------------------------------------------------------------------------
class BayesianInferenceCallback(Callback):
    """Collect SWAG or SGLD samples during a fit, as the net's ``inference`` asks.

    It reads the net's hyperparameters (``inference``, ``n_samples``, ``sample_start``,
    ``sample_every``, ``temperature``, ``sgld_cycles``, ``sample_lr``, ``inference_device``,
    ``random_state``) at ``on_train_begin``, so one instance serves every fit. For SWAG it drives a
    :class:`~sklearn_bayes_transfer.swag.SwagCallback` over all the network's parameters. For SGLD
    it sets the cyclical step size before every training step of the sampling phase and adds the
    Langevin noise right after the optimizer's step (an optimizer step hook), before the net's
    proximal prior step, for which the noise is shaped (see the module docstring). At
    ``on_train_end`` it stores ``samples_`` and ``sample_buffers_`` on the net and puts the
    optimizer's learning rates back. The estimators add it as the default callback
    ``"bayes_inference"``; it does nothing for ``inference="map"``.
    """

    def initialize(self) -> "BayesianInferenceCallback":
        self.plan_: SamplingPlan | None = None
        self.swag_: SwagCallback | None = None
        self.store_: torch.Tensor | None = None
        self.prox_: tuple[PriorPrecisionSampler, list[torch.Tensor]] | None = None
        self._remove_hook()
        return self

    def _remove_hook(self) -> None:
        hook = getattr(self, "hook_", None)
        if hook is not None:
            hook.remove()
        self.hook_ = None

    # -- training begins -----------------------------------------------------------------------------
    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        self.initialize()
        for attr in ("samples_", "sample_buffers_"):
            net.__dict__.pop(attr, None)
        plan = net.training_plan_.sampling
        if plan.inference is Inference.MAP:
            return
        self.plan_ = plan
        self.first_epoch_ = len(net.history)  # history index of this fit's first epoch
        self.seed_ = _seed(net.random_state)
        self.generators_: dict[torch.device, torch.Generator] = {}
        self.lrs_ = [group["lr"] for group in net.optimizer_.param_groups]
        self.kept_ = 0
        storage = _as_device(net.inference_device)
        if plan.inference is Inference.SWAG:
            rank = max(2, min(SWAG_RANK, len(plan.sample_epochs)))
            self.swag_ = SwagCallback(start=self.first_epoch_ + plan.start, collect_every=int(net.sample_every),
                                      rank=rank, lr=net.sample_lr, params=_all_named_parameters, device=str(storage))
            self.swag_.initialize()
            self.swag_.on_train_begin(net, X=X, y=y)
            return
        self._check_plain_sgd(net)
        n = sum(p.numel() for p in net.module_.parameters())
        self.store_ = torch.empty(len(plan.sample_epochs), n, dtype=torch.float32, device=storage)
        self.step_ = 0
        self.steps_per_epoch_ = 1
        self.max_lr_ = float(net.sample_lr if net.sample_lr is not None else net.lr)
        if float(net.temperature) > 0:
            prox = net._langevin_prox()
            if prox is not None:
                penalty, covered = prox
                prox = (PriorPrecisionSampler(penalty, covered[0].device), covered)
            self.prox_ = prox
            self.hook_ = net.optimizer_.register_step_post_hook(lambda optimizer, args, kwargs: self._noise(net))

    @staticmethod
    def _check_plain_sgd(net: Any) -> None:
        optimizer = net.optimizer_
        plain = type(optimizer) is torch.optim.SGD and all(
            not g.get("momentum") and not g.get("nesterov") and not g.get("maximize") for g in optimizer.param_groups)
        if not plain:
            raise ConfigError(
                f"inference='sgld' adds Langevin noise to plain SGD steps, but the optimizer is "
                f"{type(optimizer).__name__} with {_describe_groups(optimizer)}; use optimizer=torch.optim.SGD "
                "without momentum (the default), or inference='swag' for other optimizers")

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators_:
            self.generators_[device] = torch.Generator(device=device).manual_seed(self.seed_)
        return self.generators_[device]

    def _phase_epoch(self, net: Any) -> int:
        # History gains the epoch's row in the net's own on_epoch_begin, before any callback.
        return len(net.history) - 1 - self.first_epoch_ - self.plan_.start

    # -- during training -------------------------------------------------------------------------------
    def on_epoch_begin(self, net: Any, dataset_train: Any = None, **kwargs: Any) -> None:
        if self.swag_ is not None:
            self.swag_.on_epoch_begin(net, dataset_train=dataset_train, **kwargs)
        elif self.store_ is not None and dataset_train is not None:
            self.steps_per_epoch_ = len(net.get_iterator(dataset_train, training=True))

    def on_batch_begin(self, net: Any, batch: Any = None, training: bool = False, **kwargs: Any) -> None:
        if self.swag_ is not None:
            self.swag_.on_batch_begin(net, batch=batch, training=training, **kwargs)
        elif self.store_ is not None and training and self._phase_epoch(net) >= 0:
            lr = cyclical_step_size(self.step_, self.plan_.n_epochs * self.steps_per_epoch_, self.plan_.cycles,
                                    self.max_lr_)
            for group in net.optimizer_.param_groups:
                group["lr"] = lr

    def _noise(self, net: Any) -> None:
        """Langevin noise after an optimizer step of the sampling phase (before the proximal step)."""
        if self.store_ is None or self._phase_epoch(net) < 0:
            return
        n = max(int(getattr(net, "n_train_", 1)), 1)
        params, steps = [], []
        for group in net.optimizer_.param_groups:
            params += group["params"]
            steps += [float(group["lr"]) / n] * len(group["params"])
        if params:
            langevin_noise_(params, steps, float(net.temperature), self._generator(params[0].device),
                            prox=self.prox_)

    def on_batch_end(self, net: Any, batch: Any = None, training: bool = False, **kwargs: Any) -> None:
        if self.swag_ is not None:
            self.swag_.on_batch_end(net, batch=batch, training=training, **kwargs)
        elif self.store_ is not None and training and self._phase_epoch(net) >= 0:
            self.step_ += 1

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        if self.swag_ is not None:
            self.swag_.on_epoch_end(net, **kwargs)
            self.kept_ = self.swag_.collector_.n_snapshots
        elif self.store_ is not None and self._phase_epoch(net) in self.plan_.sample_epochs:
            _copy_to_flat(net.module_.parameters(), self.store_[self.kept_])
            self.kept_ += 1
        if self.plan_ is not None:
            net.history.record("posterior_samples", self.kept_)

    # -- training ends -------------------------------------------------------------------------------
    def on_train_end(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        self._remove_hook()
        if self.plan_ is None:
            return
        for group, lr in zip(net.optimizer_.param_groups, self.lrs_):
            group["lr"] = lr
        try:
            samples = self._swag_samples(net) if self.swag_ is not None else self.store_[:self.kept_]
            if samples is not None and len(samples) and X is not None:
                net.samples_ = samples
                net.sample_buffers_ = self._sample_buffers(net, samples, X)
        finally:
            # The SWAG moments, the sample store and the prior sampler are not needed after fit.
            self.swag_ = self.store_ = self.prox_ = None

    def _swag_samples(self, net: Any) -> torch.Tensor | None:
        collector = self.swag_.collector_
        if collector is None or collector.n_snapshots < 2:
            return None  # training ended (interrupted) before enough snapshots
        mean, variance, dev = collector.mean(), collector.variance(), collector.deviations()
        g = self._generator(mean.device)
        n = int(net.n_samples)
        z_diag = torch.randn(n, mean.numel(), generator=g, device=mean.device)
        z_low = torch.randn(n, dev.shape[0], generator=g, device=mean.device)
        # w = mean + sqrt(diag / 2) z1 + Dev^T z2 / sqrt(2 (K - 1))   (Maddox et al., 2019)
        return mean + z_diag * (0.5 * variance).sqrt() + (z_low @ dev) / math.sqrt(2.0 * (dev.shape[0] - 1))

    def _sample_buffers(self, net: Any, samples: torch.Tensor, X: Any) -> torch.Tensor:
        buffers = [b for _, b in batchnorm_buffers(net.module_)]
        size = sum(b.numel() for b in buffers)
        out = torch.empty(len(samples), size, dtype=torch.float32, device=samples.device)
        if not size:
            return out
        inputs = batchnorm_inputs(X, int(net.batch_size), self._generator(torch.device("cpu")))
        params = list(net.module_.parameters())
        saved = [t.detach().clone() for t in params + buffers]
        try:
            for s in range(len(samples)):
                _copy_from_flat(params, samples[s])
                recompute_batchnorm(net, inputs)
                _copy_to_flat(buffers, out[s])
        finally:
            with torch.no_grad():
                for t, value in zip(params + buffers, saved):
                    t.copy_(value)
        return out


def _describe_groups(optimizer: torch.optim.Optimizer) -> str:
    keys = ("momentum", "nesterov", "maximize")
    values = {k: optimizer.param_groups[0][k] for k in keys if k in optimizer.param_groups[0]}
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "no momentum setting"


# -- the estimator side ---------------------------------------------------------------------------------------
class BayesianInferenceMixin:
    """Posterior sampling and Bayesian model averaging for a skorch net (a base of the estimators' mixin).

    The estimator sets the hyperparameters ``inference``, ``n_samples``, ``sample_start``,
    ``sample_every``, ``temperature``, ``sgld_cycles``, ``sample_lr``, ``inference_device`` and
    ``random_state`` in ``__init__``; the :class:`BayesianInferenceCallback` collects the samples
    and :meth:`predict_proba` averages over them.
    """

    def _check_inference_hyperparameters(self, epochs: int | None = None) -> SamplingPlan | None:
        """Validate the inference hyperparameters; with the fit's ``epochs`` known, plan its sampling phase."""
        _check_float(self.temperature, "temperature", low=0.0,
                     hint=" (1 samples the Bayes posterior, < 1 a cold one, 0 is no noise)")
        if self.sample_lr is not None:
            _check_float(self.sample_lr, "sample_lr", low=0.0, strict=True, hint=" or None (the net's lr)")
        _as_device(self.inference_device)
        if self.random_state is not None:
            _check_int(self.random_state, "random_state", 0)
        arguments = dict(n_samples=self.n_samples, sample_start=self.sample_start, sample_every=self.sample_every,
                         sgld_cycles=self.sgld_cycles)
        if epochs is None:
            check_sampling_arguments(self.inference, **arguments)
            return None
        return plan_sampling(self.inference, max_epochs=epochs, **arguments)

    def _langevin_prox(self) -> tuple[PriorPenalty, list[torch.Tensor]] | None:
        """``(penalty, covered parameters)`` when ``penalty.prox_`` with steps ``lr / N`` follows every
        optimizer step, else ``None`` (the prior-regularised mixin overrides it); SGLD shapes its
        noise for that step."""
        return None

    @property
    def _default_callbacks(self):
        return [*super()._default_callbacks, ("bayes_inference", BayesianInferenceCallback())]

    # -- prediction --------------------------------------------------------------------------------------
    def _prediction_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n_samples`` stored samples to average (evenly spread over those kept)."""
        inference = check_choice(Inference, self.inference, "inference")
        samples = getattr(self, "samples_", None)
        if samples is None:
            raise ConfigError(
                f"inference={inference.value!r} predicts with posterior samples, but this estimator holds none: "
                "fit it with this inference (a fit that stopped before its sampling phase keeps none)")
        n = _check_int(self.n_samples, "n_samples", 1)
        if n > len(samples):
            raise ConfigError(
                f"n_samples={n} asks for more samples than the {len(samples)} collected during fit; lower n_samples, "
                "or refit with it (SGLD keeps more with more epochs, an earlier sample_start or a smaller "
                "sample_every)")
        index = torch.as_tensor(np.round(np.linspace(len(samples) - 1, 0, n))[::-1].copy(), dtype=torch.long)
        return samples[index], self.sample_buffers_[index]

    def predict_proba(self, X):
        """Predicted probabilities; with ``inference`` ``"swag"`` or ``"sgld"``, their average over
        the posterior samples (each with its own BatchNorm statistics)."""
        parent = super().predict_proba
        return self._bayes_average(lambda: parent(X))

    def _bayes_average(self, predict: Callable[[], np.ndarray]) -> np.ndarray:
        """``predict()`` for MAP; else its mean over the posterior samples loaded in turn into ``module_``.

        ``predict`` returns probabilities through the net's own predict nonlinearity (softmax over
        dim 1 for classes, per pixel for a segmenter), so the average is Bayesian model averaging
        whatever the output's shape. ``module_`` gets its own weights back afterwards.
        """
        if check_choice(Inference, self.inference, "inference") is Inference.MAP:
            return predict()
        samples, buffers = self._prediction_samples()
        params = list(self.module_.parameters())
        bn = [b for _, b in batchnorm_buffers(self.module_)]
        saved = [t.detach().clone() for t in params + bn]
        total = None
        try:
            for sample, sample_bn in zip(samples, buffers):
                _copy_from_flat(params, sample)
                _copy_from_flat(bn, sample_bn)
                proba = np.asarray(predict())
                total = proba.astype(np.float64) if total is None else total + proba
        finally:
            with torch.no_grad():
                for t, value in zip(params + bn, saved):
                    t.copy_(value)
        return (total / len(samples)).astype(proba.dtype)

    # -- model files ----------------------------------------------------------------------------------------
    def _model_file_extras(self) -> dict[str, Any]:
        """The posterior samples, as tensors and plain containers for a model file (empty for MAP)."""
        samples = getattr(self, "samples_", None)
        if samples is None:
            return {}
        named = list(self.module_.named_parameters())
        bn = batchnorm_buffers(self.module_)
        return {
            "inference": check_choice(Inference, self.inference, "inference").value,
            "samples": samples.detach().to("cpu", torch.float32).contiguous(),
            "sample_buffers": self.sample_buffers_.detach().to("cpu", torch.float32).contiguous(),
            "sample_param_names": [n for n, _ in named],
            "sample_param_shapes": [list(p.shape) for _, p in named],
            "sample_buffer_names": [n for n, _ in bn],
            "sample_buffer_shapes": [list(b.shape) for _, b in bn],
        }

    def _restore_model_file_extras(self, extras: Mapping[str, Any]) -> None:
        """Restore what :meth:`_model_file_extras` wrote, onto an initialised estimator.

        Raises
        ------
        PriorFormatError
            If the samples are malformed or were taken from a network of other parameters.
        """
        if not extras or "samples" not in extras:
            return
        samples, buffers = extras.get("samples"), extras.get("sample_buffers")
        named = list(self.module_.named_parameters())
        bn = batchnorm_buffers(self.module_)
        expected = {
            "sample_param_names": [n for n, _ in named],
            "sample_param_shapes": [list(p.shape) for _, p in named],
            "sample_buffer_names": [n for n, _ in bn],
            "sample_buffer_shapes": [list(b.shape) for _, b in bn],
        }
        for key, value in expected.items():
            stored = [list(v) if isinstance(v, (list, tuple)) else v for v in extras.get(key, [])]
            if stored != value:
                raise PriorFormatError(f"the model file's posterior samples do not fit this network: {key} is "
                                       f"{_preview(stored)}, the network has {_preview(value)}")
        d = sum(p.numel() for _, p in named)
        b = sum(t.numel() for _, t in bn)
        if not (isinstance(samples, torch.Tensor) and samples.ndim == 2 and samples.shape[1] == d
                and len(samples) >= 1 and samples.is_floating_point()):
            raise PriorFormatError(f"the model file's 'samples' must be a float tensor of shape (S >= 1, {d}), got "
                                   f"{getattr(samples, 'shape', type(samples).__name__)}")
        if not (isinstance(buffers, torch.Tensor) and tuple(buffers.shape) == (len(samples), b)):
            raise PriorFormatError(f"the model file's 'sample_buffers' must be a tensor of shape ({len(samples)}, "
                                   f"{b}), got {getattr(buffers, 'shape', type(buffers).__name__)}")
        inference = check_choice(Inference, extras.get("inference", self.inference), "inference")
        storage = _as_device(self.inference_device)
        self.inference = inference.value
        # Copies: a model file is read memory-mapped, and the samples outlive it.
        self.samples_ = samples.to(storage, torch.float32, copy=True)
        self.sample_buffers_ = buffers.to(storage, torch.float32, copy=True)


def _preview(values: Sequence[Any], limit: int = 4) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} entries)"

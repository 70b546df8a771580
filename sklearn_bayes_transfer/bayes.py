"""Bayesian inference for the downstream estimators: SWAG and SGLD samples, model averaging.

``inference`` picks what ``fit`` keeps and what ``predict_proba`` returns:

- ``"map"``: the fitted weights, as ordinary fine-tuning;
- ``"swag"``: a SWAG posterior (Maddox et al., 2019) collected with the reused
  :class:`~sklearn_bayes_transfer.swag.SwagCallback` over the last part of fine-tuning, at a
  constant learning rate ``sample_lr``, from which ``n_samples`` weight vectors are drawn;
- ``"sgld"``: stochastic-gradient Langevin dynamics on the same prior-regularised loss, with the
  cyclical cosine step size of Zhang et al. (2020, "Cyclical Stochastic Gradient MCMC"), keeping
  ``n_samples`` iterates at the ends of epochs in the low-step-size half of each cycle;
- ``"laplace"``: after MAP training, ``n_samples`` draws from the Laplace posterior (the learned
  prior plus the diagonal Fisher, :func:`~sklearn_bayes_transfer.laplace.laplace_samples`),
  averaged through the network linearised at the fitted weights (:meth:`BayesianInferenceMixin.infer`);
  measured to be far too wide (docs/evidence.md).

``predict_proba`` averages the network's predicted probabilities (its own predict nonlinearity:
softmax over the classes, over dim 1 for a segmenter) over the samples: Bayesian model averaging.
Samples are kept compactly as one float32 matrix ``samples_`` of shape ``(S, D)`` over all of
``module_.named_parameters()`` (on ``inference_device``, the CPU by default), beside
``sample_buffers_`` ``(S, B)``: the BatchNorm running statistics recomputed for every sample at the
end of ``fit`` on (up to :data:`~sklearn_bayes_transfer.batchnorm.BN_MAX_EXAMPLES` of) the inputs passed to ``fit``. Recomputing them
once there, rather than at every prediction, means predictions and model files need no training
data.

The sampling plan is :mod:`~sklearn_bayes_transfer.sampling`'s, the Langevin noise (and why it is
shaped for the proximal prior step) :mod:`~sklearn_bayes_transfer.sgld`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from skorch.callbacks import Callback
from torch import nn
from torch.func import functional_call, jvp

from ._validation import Integral, Interval, Real, check_choice, check_params
from .batchnorm import batchnorm_buffers, batchnorm_inputs, recompute_batchnorm
from .exceptions import ConfigError, PriorFormatError
from .laplace import laplace_samples
from .sampling import (
    SAMPLING_CONSTRAINTS,
    Inference,
    SamplingPlan,
    cyclical_step_size,
    plan_sampling,
)
from .sgld import PriorPrecisionSampler, langevin_noise_
from .swag import SwagCallback

__all__ = ["SWAG_RANK", "BayesianInferenceCallback", "BayesianInferenceMixin"]

#: Deviation columns of the downstream SWAG posterior (the SWAG paper's default), fewer if fewer
#: snapshots are planned.
SWAG_RANK = 20


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
    return int(random_state)


# -- the callback ---------------------------------------------------------------------------------------------
class BayesianInferenceCallback(Callback):
    """Collect SWAG or SGLD samples during a fit, following the net's ``training_plan_.sampling``.

    The settings are the estimator's inference hyperparameters, passed in when the estimator
    builds its callbacks (so a changed setting takes effect at the next ``fit``). At
    ``on_train_begin`` it reads the fit's sampling plan and, for SGLD after a proximal prior step,
    the net's ``penalty_``, ``prior_params_`` and ``prior_update_``. For SWAG it drives a
    :class:`~sklearn_bayes_transfer.swag.SwagCallback` over all the network's parameters. For SGLD
    it sets the cyclical step size before every training step of the sampling phase and adds the
    Langevin noise right after the optimizer's step (an optimizer step hook), before the net's
    proximal prior step, for which the noise is shaped (see the module docstring). At
    ``on_train_end`` it stores ``samples_`` and ``sample_buffers_`` on the net and puts the
    optimizer's learning rates back. The estimators add it as the default callback
    ``"bayes_inference"``; it does nothing for ``inference="map"``.

    Parameters
    ----------
    n_samples : int, default=20
        SWAG draws to keep (SGLD keeps the iterates its plan names).
    sample_every : int, default=1
        Epochs between SWAG snapshots.
    sgld_temperature : float, default=1.0
        Temperature of the Langevin noise.
    sample_lr : float, optional
        SWAG's collection rate and the top of SGLD's cycles (default: the net's ``lr``).
    inference_device : str, default="cpu"
        Where the samples are kept.
    random_state : int, optional
        Seeds the noise and the draws (``None``: drawn from torch's global generator).
    """

    def __init__(self, n_samples: int = 20, sample_every: int = 1, sgld_temperature: float = 1.0,
                 sample_lr: float | None = None, inference_device: str = "cpu",
                 random_state: int | None = None) -> None:
        self.n_samples = n_samples
        self.sample_every = sample_every
        self.sgld_temperature = sgld_temperature
        self.sample_lr = sample_lr
        self.inference_device = inference_device
        self.random_state = random_state

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
        self.seed_ = _seed(self.random_state)
        self.generators_: dict[torch.device, torch.Generator] = {}
        self.lrs_ = [group["lr"] for group in net.optimizer_.param_groups]
        self.kept_ = 0
        storage = _as_device(self.inference_device)
        if plan.inference is Inference.LAPLACE:
            return  # samples at the end of training
        if plan.inference is Inference.SWAG:
            rank = max(2, min(SWAG_RANK, len(plan.sample_epochs)))
            self.swag_ = SwagCallback(start=self.first_epoch_ + plan.start, collect_every=int(self.sample_every),
                                      rank=rank, lr=self.sample_lr, params=_all_named_parameters, device=str(storage))
            self.swag_.initialize()
            self.swag_.on_train_begin(net, X=X, y=y)
            return
        self._check_plain_sgd(net)
        n = sum(p.numel() for p in net.module_.parameters())
        self.store_ = torch.empty(len(plan.sample_epochs), n, dtype=torch.float32, device=storage)
        self.step_ = 0
        self.steps_per_epoch_ = 1
        self.max_lr_ = float(self.sample_lr if self.sample_lr is not None else net.lr)
        if float(self.sgld_temperature) > 0:
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
            self.steps_per_epoch_ = net.training_plan_.steps_per_epoch  # counted when the fit was planned

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
        if self.prox_ is None:
            # Built when sampling starts: the prior's scale may change before (prior_scale="evidence").
            self.prox_ = _langevin_prox(net)
        n = max(int(getattr(net, "n_train_", 1)), 1)
        params, steps = [], []
        for group in net.optimizer_.param_groups:
            params += group["params"]
            steps += [float(group["lr"]) / n] * len(group["params"])
        if params:
            langevin_noise_(params, steps, float(self.sgld_temperature), self._generator(params[0].device),
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
        if getattr(net, "_interrupted_", False):  # Ctrl-C: no samples from a cut-short run
            self.swag_ = self.store_ = self.prox_ = None
            return
        try:
            if self.plan_.inference is Inference.LAPLACE:
                samples = self._laplace_samples(net, X, y) if X is not None else None
            else:
                samples = self._swag_samples(net) if self.swag_ is not None else self.store_[:self.kept_]
            if samples is not None and len(samples) and X is not None:
                net.samples_ = samples
                if self.plan_.inference is Inference.LAPLACE:  # the linearised network keeps w*'s statistics
                    net.sample_buffers_ = self._own_buffers(net, len(samples), samples.device)
                else:
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
        n = int(self.n_samples)
        z_diag = torch.randn(n, mean.numel(), generator=g, device=mean.device)
        z_low = torch.randn(n, dev.shape[0], generator=g, device=mean.device)
        # w = mean + sqrt(diag / 2) z1 + Dev^T z2 / sqrt(2 (K - 1))   (Maddox et al., 2019)
        return mean + z_diag * (0.5 * variance).sqrt() + (z_low @ dev) / math.sqrt(2.0 * (dev.shape[0] - 1))

    def _laplace_samples(self, net: Any, X: Any, y: Any) -> torch.Tensor:
        """``n_samples`` draws from the Laplace posterior at the fitted weights, over ``module_.parameters()``.

        The backbone's posterior has the learned prior's precision plus the diagonal Fisher
        (:func:`~sklearn_bayes_transfer.laplace.laplace_samples`); the head's, precision
        ``head_weight_decay`` plus its Fisher. Parameters under neither prior (a backbone trained
        without a prior term) stay at their fitted values: a last-layer Laplace.
        """
        params = list(net.module_.parameters())
        fisher = dict(zip(map(id, params), net._curvature(net.get_dataset(X, y), params)[0]))
        n, storage, g = int(self.n_samples), _as_device(self.inference_device), self._generator(torch.device("cpu"))
        offsets, total = {}, 0
        for p in params:
            offsets[id(p)] = total
            total += p.numel()
        out = torch.empty(n, total, dtype=torch.float32, device=storage)
        _copy_to_flat(params, out[0])
        out[1:] = out[0]
        alpha = float(net.head_weight_decay)
        for p in net.head_params_:
            sd = (alpha + fisher[id(p)].detach().to("cpu", torch.float64).reshape(-1)).rsqrt()
            start = offsets[id(p)]
            noise = torch.randn(n, p.numel(), generator=g, dtype=torch.float64) * sd
            out[:, start:start + p.numel()] += noise.to(storage, torch.float32)
        if net.penalty_ is not None:
            covered = list(net.prior_params_)
            draws = laplace_samples(net.prior_, [p.detach().cpu() for p in covered], [fisher[id(p)] for p in covered],
                                    float(net.prior_scale_), n, eps=float(net.prior_eps), structure=net._structure(),
                                    generator=g)
            pos = 0
            for p in covered:
                start = offsets[id(p)]
                out[:, start:start + p.numel()] = draws[:, pos:pos + p.numel()].to(storage)
                pos += p.numel()
        return out

    @staticmethod
    def _own_buffers(net: Any, n: int, device: torch.device) -> torch.Tensor:
        buffers = [b for _, b in batchnorm_buffers(net.module_)]
        out = torch.empty(n, sum(b.numel() for b in buffers), dtype=torch.float32, device=device)
        for row in out:
            _copy_to_flat(buffers, row)
        return out

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


def _langevin_prox(net: Any) -> tuple[PriorPrecisionSampler, list[torch.Tensor]] | None:
    """A sampler of the prior's precision and the parameters it covers, when the net applies its
    prior as a proximal step after every optimizer step (SGLD then shapes its noise for that step)."""
    penalty = getattr(net, "penalty_", None)
    if penalty is None or getattr(net, "prior_update_", None) != "proximal":
        return None
    covered = list(net.prior_params_)
    return PriorPrecisionSampler(penalty, covered[0].device), covered


def _describe_groups(optimizer: torch.optim.Optimizer) -> str:
    keys = ("momentum", "nesterov", "maximize")
    values = {k: optimizer.param_groups[0][k] for k in keys if k in optimizer.param_groups[0]}
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "no momentum setting"


# -- the estimator side ---------------------------------------------------------------------------------------
class BayesianInferenceMixin:
    """Posterior sampling and Bayesian model averaging for a skorch net (a base of the estimators' mixin).

    The estimator sets the hyperparameters ``inference``, ``n_samples``, ``sample_start``,
    ``sample_every``, ``sgld_temperature``, ``sgld_cycles``, ``sample_lr``, ``inference_device`` and
    ``random_state`` in ``__init__``; the :class:`BayesianInferenceCallback` collects the samples
    and :meth:`predict_proba` averages over them.
    """

    _parameter_constraints: dict[str, list[Any]] = {
        **SAMPLING_CONSTRAINTS,
        "sgld_temperature": [Interval(Real, 0, None)],
        "sample_lr": [None, Interval(Real, 0, None, closed="neither")],
        "inference_device": [str, torch.device],
        "random_state": [None, Interval(Integral, 0, None)],
    }

    def _check_inference_hyperparameters(self, epochs: int | None = None) -> SamplingPlan | None:
        """Validate the inference hyperparameters; with the fit's ``epochs`` known, plan its sampling phase."""
        check_params({name: getattr(self, name) for name in self._parameter_constraints}, self._parameter_constraints)
        _as_device(self.inference_device)
        if epochs is None:
            return None
        return plan_sampling(self.inference, max_epochs=epochs, n_samples=self.n_samples,
                             sample_start=self.sample_start, sample_every=self.sample_every,
                             sgld_cycles=self.sgld_cycles)

    @property
    def _default_callbacks(self):
        # Settings passed in as they are; fit validates them before the callbacks are built.
        callback = BayesianInferenceCallback(
            n_samples=self.n_samples, sample_every=self.sample_every, sgld_temperature=self.sgld_temperature,
            sample_lr=self.sample_lr, inference_device=self.inference_device, random_state=self.random_state)
        return [*super()._default_callbacks, ("bayes_inference", callback)]

    # -- prediction --------------------------------------------------------------------------------------
    def _prediction_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n_samples`` stored samples to average (evenly spread over those kept)."""
        inference = check_choice(Inference, self.inference, "inference")
        samples = getattr(self, "samples_", None)
        if samples is None:
            raise ConfigError(
                f"inference={inference.value!r} predicts with posterior samples, but this estimator holds none: "
                "fit it with this inference (a fit that stopped before its sampling phase keeps none)")
        check_params({"n_samples": self.n_samples}, SAMPLING_CONSTRAINTS)
        n = int(self.n_samples)
        if n > len(samples):
            raise ConfigError(
                f"n_samples={n} asks for more samples than the {len(samples)} collected during fit; lower n_samples, "
                "or refit with it (SGLD keeps more with more epochs, an earlier sample_start or a smaller "
                "sample_every)")
        index = torch.as_tensor(np.round(np.linspace(len(samples) - 1, 0, n))[::-1].copy(), dtype=torch.long)
        return samples[index], self.sample_buffers_[index]

    def predict_proba(self, X):
        """Predicted probabilities; with Bayesian ``inference``, their average over the posterior samples."""
        parent = super().predict_proba
        return self._bayes_average(lambda: parent(X))

    def _bayes_average(self, predict: Callable[[], np.ndarray]) -> np.ndarray:
        """``predict()`` for MAP; else its mean over the posterior samples.

        SWAG and SGLD samples are loaded in turn into ``module_`` (with their BatchNorm
        statistics); Laplace samples go through the network linearised at its fitted weights
        (:meth:`infer`). ``predict`` returns probabilities through the net's own predict
        nonlinearity (softmax over dim 1 for classes, per pixel for a segmenter), so the average is
        Bayesian model averaging whatever the output's shape. ``module_`` gets its own weights back.
        """
        inference = check_choice(Inference, self.inference, "inference")
        if inference is Inference.MAP:
            return predict()
        samples, buffers = self._prediction_samples()
        if inference is Inference.LAPLACE:
            return self._linearised_average(predict, samples)
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

    def _linearised_average(self, predict: Callable[[], np.ndarray], samples: torch.Tensor) -> np.ndarray:
        named = list(self.module_.named_parameters())
        total = None
        try:
            for sample in samples:
                delta, offset = {}, 0
                for name, p in named:
                    delta[name] = sample[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype) - p.detach()
                    offset += p.numel()
                self._glm_delta_ = delta
                proba = np.asarray(predict())
                total = proba.astype(np.float64) if total is None else total + proba
        finally:
            self._glm_delta_ = None
        return (total / len(samples)).astype(proba.dtype)

    def infer(self, x, **fit_params):
        """skorch's forward pass; while Laplace samples are averaged, the GLM predictive's.

        That is ``f(x; w*) + J(x) (w - w*)``: the network linearised at its fitted weights ``w*``
        and evaluated at a posterior sample ``w`` (one forward-mode pass, :func:`torch.func.jvp`).
        With a diagonal-curvature Laplace posterior the network itself evaluated at ``w`` predicts
        little better than chance, while the linearised one is the model the Laplace posterior
        describes (Immer et al., AISTATS 2021).
        """
        delta = getattr(self, "_glm_delta_", None)
        if delta is None or fit_params or not isinstance(x, torch.Tensor):
            return super().infer(x, **fit_params)
        x = x.to(self.device)
        params = {name: p.detach() for name, p in self.module_.named_parameters()}
        buffers = dict(self.module_.named_buffers())

        def network(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.module_, ({**buffers, **weights},), (x,))

        out, tangent = jvp(network, (params,), (delta,))
        return out + tangent

    # -- model files ----------------------------------------------------------------------------------------
    def posterior_state(self) -> dict[str, Any]:
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

    def load_posterior_state(self, extras: Mapping[str, Any]) -> None:
        """Restore what :meth:`posterior_state` wrote, onto an initialised estimator.

        Only fitted state changes: the samples must be of this estimator's ``inference``.

        Raises
        ------
        PriorFormatError
            If the samples are malformed, were taken from a network of other parameters, or are
            of another kind of inference than the estimator's.
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
        stored = extras.get("inference")
        if stored != check_choice(Inference, self.inference, "inference").value:
            raise PriorFormatError(f"the model file's posterior samples are of inference={stored!r} but its "
                                   f"hyperparameters say inference={self.inference!r}; the file is inconsistent")
        storage = _as_device(self.inference_device)
        # Copies: a model file is read memory-mapped, and the samples outlive it.
        self.samples_ = samples.to(storage, torch.float32, copy=True)
        self.sample_buffers_ = buffers.to(storage, torch.float32, copy=True)


def _preview(values: Sequence[Any], limit: int = 4) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} entries)"

"""SWAG: moments and deviations of a weight trajectory, and the skorch callback that collects them.

:class:`SwagCollector` is plain torch. It keeps, over ``T`` snapshots ``w_t`` of a set of
parameters, the running first and second moments (in float64: in float32 ``sq_mean - mean**2``
loses variances of 1e-8..1e-5 against weights of order 1) and a ring buffer of the last ``K``
deviations ``d_t = w_t - mean_t``, where ``mean_t`` is the running mean *after* ``w_t`` was
included (the deviation from the running mean at collection time, as in Maddox et al., 2019).

:meth:`SwagCollector.to_prior` exports the convention of ``docs/design.md``::

    variance = 0.5 * clamp(sq_mean - mean**2, min=var_clamp)
    factor   = Dev^T / sqrt(2 (K - 1))          # (K, D), oldest deviation first
    Sigma    = diag(variance) + factor^T factor

:class:`SwagCallback` is the only part that knows skorch: it drives the learning rate of the
collection phase and feeds the collector every ``collect_every`` epochs or steps. It works on any
skorch net, so downstream Bayesian inference can reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

import torch
from skorch.callbacks import Callback

from ._validation import check_choice
from .distributed import unwrap
from .exceptions import ConfigError, PriorMismatchError
from .prior import Prior

__all__ = ["CollectUnit", "SwagCallback", "SwagCollector", "SwagSchedule", "default_swag_params"]

# Elements per step of a snapshot. On the CPU a chunk's working set (float64 scratch, mean and
# second moment, float32 source and deviation: ~1 MiB) stays in cache, and at torch's parallel
# grain size (32768) each op runs on one thread, free of OpenMP fork/join costs that dominated
# larger chunks on a busy 2-core machine (benchmarks/swag_overhead.py). On a GPU, fewer launches
# matter more.
_CPU_CHUNK = 1 << 15
_GPU_CHUNK = 1 << 24


class CollectUnit(str, Enum):
    """What ``collect_every`` counts: ``"epoch"`` (end of epochs) or ``"step"`` (optimizer steps)."""

    EPOCH = "epoch"
    STEP = "step"


class SwagSchedule(str, Enum):
    """Learning rate during SWAG collection.

    - ``"constant"``: the collection learning rate throughout (as torch's ``SWALR`` after its
      annealing);
    - ``"cosine"``: cyclic cosine, from ``max_lr`` down to the collection learning rate over each
      collection cycle of ``collect_every`` units, collecting at the end of the cycle (the low
      point).
    """

    CONSTANT = "constant"
    COSINE = "cosine"



class SwagCollector:
    """Running SWAG moments and the last ``rank`` deviations of a set of parameters.

    Parameters
    ----------
    named_parameters : iterable of (str, torch.Tensor)
        The parameters to follow, in flattening order. :meth:`collect` without arguments reads
        their current values.
    rank : int, default=20
        Number of deviation columns ``K`` kept (a ring buffer of the most recent ones).
    device : str or torch.device, optional
        Where the moments (float64) and deviations (float32) live; by default the device of the
        first parameter. ``"cpu"`` saves GPU memory at the cost of a device-to-host copy per
        snapshot.
    chunk_size : int, optional
        Elements processed per step of a snapshot; by default 32768 on the CPU (the working
        set stays in cache) and whole parameters on a GPU (fewer kernel launches).

    Attributes
    ----------
    names : tuple of str
    shapes : tuple of tuple of int
    n_params : int
        ``D``, the total number of followed values.
    n_snapshots : int
        ``T``, the number of snapshots collected so far.

    Examples
    --------
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> swag = SwagCollector([("w", w)], rank=2)
    >>> for value in (1.0, 2.0, 3.0):
    ...     with torch.no_grad():
    ...         _ = w.fill_(value)
    ...     swag.collect()
    >>> swag.mean()
    tensor([2., 2., 2.])
    >>> swag.deviations()[:, 0]  # w_t - running mean after w_t: 2 - 1.5 and 3 - 2
    tensor([0.5000, 1.0000])
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        *,
        rank: int = 20,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
    ) -> None:
        named = list(named_parameters)
        if not named:
            raise ConfigError("SwagCollector needs at least one parameter to follow")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 2:
            raise ConfigError(f"rank={rank!r} is not valid; SWAG needs rank >= 2 deviation columns "
                              "(the low-rank covariance divides by rank - 1)")
        self.names = tuple(str(n) for n, _ in named)
        self.shapes = tuple(tuple(int(s) for s in p.shape) for _, p in named)
        self.n_params = sum(math.prod(s) for s in self.shapes)
        self.rank = rank
        self.device = torch.device(device) if device is not None else named[0][1].device
        self.n_snapshots = 0
        self._params = [p for _, p in named]
        self._mean = torch.zeros(self.n_params, dtype=torch.float64, device=self.device)
        self._sq_mean = torch.zeros_like(self._mean)
        # A snapshot streams through the parameters in cache-sized chunks: each chunk is cast to
        # float64 once into a small scratch buffer, and the moment updates and the deviation all
        # read it from cache. No torch.cat, no D-sized temporaries.
        if chunk_size is None:
            chunk_size = _CPU_CHUNK if self.device.type == "cpu" else _GPU_CHUNK
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size={chunk_size!r} is not valid; expected a positive integer")
        self._chunks: list[tuple[int, int, int, int]] = []  # (parameter, start in it, length, flat offset)
        offset = 0
        for index, shape in enumerate(self.shapes):
            n = math.prod(shape)
            for start in range(0, n, chunk_size):
                self._chunks.append((index, start, min(chunk_size, n - start), offset + start))
            offset += n
        self._scratch = torch.empty(min(chunk_size, max(math.prod(s) for s in self.shapes)),
                                    dtype=torch.float64, device=self.device)
        self._dev: torch.Tensor | None = None  # (rank, D) float32, allocated at the first snapshot
        self._next = 0

    def bind(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Follow new parameter tensors with the same names and shapes (e.g. a re-created optimizer).

        Raises
        ------
        PriorMismatchError
            If the names or shapes differ from the ones the collector was built for.
        """
        named = list(named_parameters)
        names = tuple(str(n) for n, _ in named)
        shapes = tuple(tuple(int(s) for s in p.shape) for _, p in named)
        if names != self.names or shapes != self.shapes:
            raise PriorMismatchError(self._mismatch(names, shapes))
        self._params = [p for _, p in named]

    def _mismatch(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> str:
        for i, (a, b) in enumerate(zip(zip(self.names, self.shapes), zip(names, shapes))):
            if a != b:
                return (f"parameter {i} is {b[0]} {b[1]} but the collector follows {a[0]} {a[1]}; "
                        "snapshots must come from the same parameters in the same order")
        return (f"got {len(names)} parameters but the collector follows {len(self.names)}; "
                "snapshots must come from the same parameters in the same order")

    @torch.no_grad()
    def collect(self, params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        """Add one snapshot: the followed parameters' current values, or ``params`` if given.

        ``params`` is an iterable of tensors (or ``(name, tensor)`` pairs) in the followed order
        and shapes.
        """
        if params is None:
            source = self._params
        else:
            source = [p[1] if isinstance(p, tuple) else p for p in params]
            shapes = tuple(tuple(int(s) for s in p.shape) for p in source)
            if shapes != self.shapes:
                raise PriorMismatchError(self._mismatch(self.names[:len(shapes)], shapes))
        if self._dev is None:
            # Rows are only ever read after they are written, so no zero-filling is needed.
            self._dev = torch.empty(self.rank, self.n_params, dtype=torch.float32, device=self.device)
        n = self.n_snapshots
        keep, add = n / (n + 1), 1.0 / (n + 1)
        flats = [p.detach().reshape(-1) for p in source]
        if any(f.device != self.device for f in flats):
            flats = [f.to(self.device) for f in flats]
        row = self._dev[self._next]
        for index, start, length, offset in self._chunks:
            w = self._scratch[:length]
            w.copy_(flats[index][start:start + length])
            mean = self._mean[offset:offset + length]
            mean.lerp_(w, add)
            self._sq_mean[offset:offset + length].mul_(keep).addcmul_(w, w, value=add)
            row[offset:offset + length].copy_(w.sub_(mean))
        self._next = (self._next + 1) % self.rank
        self.n_snapshots = n + 1

    def state_dict(self) -> dict[str, Any]:
        """The running moments (float64), the deviation ring buffer and the snapshot count, for checkpoints."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "rank": self.rank,
                "n_snapshots": self.n_snapshots, "next": self._next, "mean": self._mean, "sq_mean": self._sq_mean,
                "deviations": self._dev}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a collector over the same parameters and rank.

        Raises
        ------
        PriorMismatchError
            If the state follows other parameters, or has another rank or size.
        """
        names = tuple(state["names"])
        shapes = tuple(tuple(int(d) for d in s) for s in state["shapes"])
        if names != self.names or shapes != self.shapes:
            raise PriorMismatchError(self._mismatch(names, shapes))
        if int(state["rank"]) != self.rank:
            raise PriorMismatchError(f"the saved SWAG state has rank {state['rank']}, this collector {self.rank}")
        dev = state["deviations"]
        if state["mean"].shape != self._mean.shape or (dev is not None and tuple(dev.shape) != (self.rank, self.n_params)):
            raise PriorMismatchError(f"the saved SWAG moments do not hold {self.n_params} values")
        self._mean.copy_(state["mean"])
        self._sq_mean.copy_(state["sq_mean"])
        self._dev = None if dev is None else dev.to(self.device, torch.float32).clone()
        self.n_snapshots = int(state["n_snapshots"])
        self._next = int(state["next"])

    @torch.no_grad()
    def apply_mean(self) -> None:
        """Write the SWAG mean into the followed parameters (e.g. before recomputing BatchNorm)."""
        self._require(1, "applying the SWAG mean")
        offset = 0
        for p, shape in zip(self._params, self.shapes):
            n = math.prod(shape)
            p.copy_(self._mean[offset:offset + n].view(shape))
            offset += n

    def _require(self, at_least: int, what: str) -> None:
        if self.n_snapshots < at_least:
            raise ConfigError(f"{what} needs at least {at_least} SWAG snapshot(s); {self.n_snapshots} collected")

    def mean(self) -> torch.Tensor:
        """SWAG mean ``(1/T) sum_t w_t``, float32 of shape (D,), on the storage device."""
        self._require(1, "the SWAG mean")
        return self._mean.to(torch.float32)

    def variance(self, var_clamp: float = 1e-30) -> torch.Tensor:
        """Diagonal ``clamp(mean(w^2) - mean(w)^2, min=var_clamp)``, computed in float64, returned as float32.

        This is the raw SWAG diagonal; :meth:`to_prior` halves it.
        """
        self._require(1, "the SWAG variance")
        return (self._sq_mean - self._mean.square()).clamp_(min=float(var_clamp)).to(torch.float32)

    def deviations(self) -> torch.Tensor:
        """The last ``min(T, rank)`` deviations as rows, oldest first: float32 of shape (k, D)."""
        self._require(1, "the SWAG deviations")
        assert self._dev is not None
        if self.n_snapshots < self.rank:
            return self._dev[: self.n_snapshots].clone()
        order = [(self._next + i) % self.rank for i in range(self.rank)]
        return self._dev[order]

    def to_prior(
        self,
        names: Sequence[str] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
        var_clamp: float = 1e-30,
    ) -> Prior:
        """Export a :class:`~sklearn_bayes_transfer.prior.Prior` in the convention of ``docs/design.md``.

        ``variance = 0.5 * clamp(diag, var_clamp)``, ``factor = Dev^T / sqrt(2 (K - 1))`` with
        ``K = rank``, so that ``Sigma = diag(variance) + factor^T factor``. Tensors are moved to
        the CPU. ``meta`` gets ``method``, ``n_snapshots``, ``rank`` and ``var_clamp`` unless it
        sets them itself.

        Raises
        ------
        ConfigError
            If fewer than ``rank`` snapshots were collected.
        """
        if self.n_snapshots < self.rank:
            raise ConfigError(f"only {self.n_snapshots} SWAG snapshot(s) were collected but rank={self.rank} "
                              f"needs at least {self.rank}; collect more snapshots or lower the rank")
        if not (isinstance(var_clamp, (int, float)) and var_clamp > 0 and math.isfinite(var_clamp)):
            raise ConfigError(f"var_clamp={var_clamp!r} is not valid; expected a small positive number such as 1e-8")
        mean = self.mean().cpu()
        variance = (0.5 * self.variance(var_clamp)).cpu()
        factor = (self.deviations() / math.sqrt(2.0 * (self.rank - 1))).cpu()
        info = {"method": "swag", "n_snapshots": self.n_snapshots, "rank": self.rank,
                "var_clamp": float(var_clamp),
                "deviations": "w_t minus the running mean after including w_t"}
        info.update(dict(meta or {}))
        return Prior(mean, variance, factor,
                     names=list(names) if names is not None else list(self.names),
                     shapes=list(shapes) if shapes is not None else [list(s) for s in self.shapes],
                     buffers={k: v.detach().cpu().clone() for k, v in dict(buffers or {}).items()},
                     meta=info)


def default_swag_params(net: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a :class:`SwagCallback` follows by default.

    Those of ``net.module_.backbone`` when the module has a ``backbone`` child (so a task head
    is left out of the posterior), else all of ``net.module_``'s.
    """
    module = unwrap(net.module_)  # under DDP (Accelerate), the wrapped module
    target = getattr(module, "backbone", None)
    if not isinstance(target, torch.nn.Module):
        target = module
    return list(target.named_parameters())


class SwagCallback(Callback):
    """Collect a SWAG posterior during a skorch training run.

    Training runs normally for ``start`` epochs; from epoch ``start`` on (0-based, counted over
    the net's whole history, so ``partial_fit`` continues the count) the learning rate follows
    ``schedule`` and a snapshot is taken at the end of every ``collect_every``-th epoch or
    optimizer step of the collection phase.

    Parameters
    ----------
    start : int, default=0
        Epochs of ordinary training before collection begins.
    collect_every : int, default=1
        Collect once per this many ``unit`` of the collection phase.
    unit : {"epoch", "step"}, default="epoch"
        What ``collect_every`` counts.
    rank : int, default=20
        Number of deviation columns ``K`` kept; at least ``rank`` snapshots are needed.
    lr : float, optional
        Learning rate during collection (the low end of each cosine cycle). ``None`` leaves the
        optimizer's learning rate alone.
    schedule : {"constant", "cosine"}, default="constant"
        See :class:`SwagSchedule`.
    max_lr : float, optional
        High end of each cosine cycle; by default the net's ``lr``.
    params : callable, optional
        ``params(net) -> iterable of (name, parameter)`` selecting what is followed; by default
        :func:`default_swag_params` (the backbone if there is one, else the whole module).
    var_clamp : float, default=1e-8
        Lower clamp of the raw diagonal variance used by :meth:`to_prior`.
    device : str, optional
        Storage device of the moments (see :class:`SwagCollector`); default: the parameters'.

    Attributes
    ----------
    collector_ : SwagCollector
        The running moments; created at the first ``on_train_begin``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> X = np.random.RandomState(0).randn(64, 3).astype("float32")
    >>> y = X.sum(1, keepdims=True)
    >>> swag = SwagCallback(start=2, rank=3, lr=0.01)
    >>> net = NeuralNetRegressor(torch.nn.Linear(3, 1), max_epochs=6, lr=0.05, train_split=None,
    ...                          callbacks=[swag], verbose=0).fit(X, y)
    >>> swag.collector_.n_snapshots, swag.to_prior().rank
    (4, 3)
    """

    def __init__(
        self,
        start: int = 0,
        collect_every: int = 1,
        unit: CollectUnit | str = "epoch",
        rank: int = 20,
        lr: float | None = None,
        schedule: SwagSchedule | str = "constant",
        max_lr: float | None = None,
        params: Callable[[Any], Iterable[tuple[str, torch.Tensor]]] | None = None,
        var_clamp: float = 1e-8,
        device: str | None = None,
    ) -> None:
        self.start = start
        self.collect_every = collect_every
        self.unit = unit
        self.rank = rank
        self.lr = lr
        self.schedule = schedule
        self.max_lr = max_lr
        self.params = params
        self.var_clamp = var_clamp
        self.device = device

    # -- validation and planning ------------------------------------------------------------------
    def _validate(self) -> None:
        self.unit_ = check_choice(CollectUnit, self.unit, "unit")
        self.schedule_ = check_choice(SwagSchedule, self.schedule, "schedule")
        for name in ("start", "collect_every", "rank"):
            value = getattr(self, name)
            low = {"start": 0, "collect_every": 1, "rank": 2}[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                hint = " (the low-rank covariance divides by rank - 1)" if name == "rank" else ""
                raise ConfigError(f"{name}={value!r} is not valid; expected an integer >= {low}{hint}")
        for name in ("lr", "max_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name}={value!r} is not valid; expected a positive learning rate or None")
        if self.schedule_ is SwagSchedule.COSINE and self.lr is None:
            raise ConfigError("schedule='cosine' needs lr (the low end of each cycle); pass lr=...")

    def planned_snapshots(self, max_epochs: int, steps_per_epoch: int) -> int:
        """Snapshots a run of ``max_epochs`` epochs of ``steps_per_epoch`` steps will collect.

        Examples
        --------
        >>> SwagCallback(start=5, collect_every=2).planned_snapshots(max_epochs=10, steps_per_epoch=7)
        2
        >>> SwagCallback(start=5, collect_every=2, unit="step").planned_snapshots(10, 7)
        17
        """
        self._validate()
        units = max(max_epochs - self.start, 0)
        if self.unit_ is CollectUnit.STEP:
            units *= steps_per_epoch
        return units // self.collect_every

    def how_to_get_more(self) -> str:
        """A sentence telling the user how to collect more snapshots."""
        return (f"snapshots are taken every {self.collect_every} {CollectUnit(self.unit).value}(s) from epoch "
                f"{self.start} on; train more epochs after swag_start, start collecting earlier (lower "
                "swag_start), collect more often (smaller collect_every, or per step with unit='step'), or lower "
                "the rank")

    # -- skorch hooks -------------------------------------------------------------------------------
    def initialize(self) -> SwagCallback:
        self._validate()
        self.collector_: SwagCollector | None = None
        self.steps_in_phase_ = 0
        self.cycle_pos_ = 0  # training steps since the last snapshot (or the start of collection)
        self.steps_per_epoch_: int | None = None
        return self

    def _selected(self, net: Any) -> list[tuple[str, torch.Tensor]]:
        selector = self.params if self.params is not None else default_swag_params
        return list(selector(net))

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        if getattr(self, "collector_", None) is None:
            self.initialize()
            self.collector_ = SwagCollector(self._selected(net), rank=self.rank, device=self.device)
        else:
            self.collector_.bind(self._selected(net))

    def _epoch(self, net: Any) -> int:
        # History gains its row in the net's own on_epoch_begin, before any callback runs.
        return len(net.history) - 1

    def _in_phase(self, net: Any) -> bool:
        return self._epoch(net) >= self.start

    def on_epoch_begin(self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any) -> None:
        if not self._in_phase(net) or self.lr is None:
            return
        if self.schedule_ is SwagSchedule.CONSTANT:
            self._set_lr(net, float(self.lr))
        elif self.unit_ is CollectUnit.EPOCH and dataset_train is not None:
            self.steps_per_epoch_ = len(net.get_iterator(dataset_train, training=True))

    def on_batch_begin(self, net: Any, batch: Any = None, training: bool = False, **kwargs: Any) -> None:
        if not training or self.schedule_ is not SwagSchedule.COSINE or not self._in_phase(net):
            return
        per_epoch = 1 if self.unit_ is CollectUnit.STEP else (self.steps_per_epoch_ or 1)
        cycle = self.collect_every * per_epoch
        pos = self.cycle_pos_ % cycle
        # First step of a cycle at max_lr, last step (right before the snapshot) at lr.
        frac = min(pos / (cycle - 1), 1.0) if cycle > 1 else 1.0
        high = float(self.max_lr if self.max_lr is not None else net.lr)
        low = float(self.lr)  # type: ignore[arg-type]
        self._set_lr(net, low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * frac)))

    def on_batch_end(self, net: Any, batch: Any = None, training: bool = False, **kwargs: Any) -> None:
        if not training or not self._in_phase(net):
            return
        self.steps_in_phase_ += 1
        self.cycle_pos_ += 1
        if self.unit_ is CollectUnit.STEP and self.steps_in_phase_ % self.collect_every == 0:
            self.collector_.collect()
            self.cycle_pos_ = 0

    def on_epoch_end(self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any) -> None:
        if self._in_phase(net) and self.unit_ is CollectUnit.EPOCH \
                and (self._epoch(net) - self.start + 1) % self.collect_every == 0:
            self.collector_.collect()
            self.cycle_pos_ = 0
        net.history.record("swag_snapshots", self.collector_.n_snapshots if self.collector_ is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        """Where collection stands (step counters and the collector's moments), for checkpoints."""
        return {"steps_in_phase": self.steps_in_phase_, "cycle_pos": self.cycle_pos_,
                "steps_per_epoch": self.steps_per_epoch_,
                "collector": None if self.collector_ is None else self.collector_.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], net: Any) -> None:
        """Continue from :meth:`state_dict`, following ``net``'s parameters (call after ``net.initialize()``)."""
        self.steps_in_phase_ = int(state["steps_in_phase"])
        self.cycle_pos_ = int(state["cycle_pos"])
        self.steps_per_epoch_ = None if state["steps_per_epoch"] is None else int(state["steps_per_epoch"])
        if state["collector"] is not None:
            self.collector_ = SwagCollector(self._selected(net), rank=self.rank, device=self.device)
            self.collector_.load_state_dict(state["collector"])

    @staticmethod
    def _set_lr(net: Any, lr: float) -> None:
        for group in net.optimizer_.param_groups:
            group["lr"] = lr

    # -- export ---------------------------------------------------------------------------------------
    def to_prior(
        self,
        names: Sequence[str] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Prior:
        """Export the collected posterior (see :meth:`SwagCollector.to_prior`).

        ``meta`` is completed with this callback's settings (``swag_start``, ``collect_every``,
        ``collect_unit``, ``swag_lr``, ``swag_schedule``).

        Raises
        ------
        ConfigError
            If fewer than ``rank`` snapshots were collected, saying how to collect more.
        """
        collector = getattr(self, "collector_", None)
        n = collector.n_snapshots if collector is not None else 0
        if n < self.rank:
            raise ConfigError(f"only {n} SWAG snapshot(s) were collected but rank={self.rank} needs at least "
                              f"{self.rank}: {self.how_to_get_more()}")
        info = {"swag_start": self.start, "collect_every": self.collect_every,
                "collect_unit": CollectUnit(self.unit).value, "swag_lr": self.lr,
                "swag_schedule": SwagSchedule(self.schedule).value}
        info.update(dict(meta or {}))
        return collector.to_prior(names, shapes, buffers, info, var_clamp=self.var_clamp)

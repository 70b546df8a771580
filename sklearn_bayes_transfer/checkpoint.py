"""Resumable training: one atomic checkpoint per epoch of a skorch net and the state around it.

A checkpoint is a single file, ``checkpoint.pt`` in the run's directory, replaced atomically at the
end of every epoch (a run killed at any moment, even while writing it, leaves the previous complete
checkpoint). It holds the module's and the optimizer's state, the training history, the random
number generators' states, whatever state the caller adds (the SWAG moments of :class:`PriorFitter`)
and the run's *settings*: resuming with other settings (another backbone, rank, data size, ...) is
refused with a message naming the first setting that differs. The file holds tensors and plain
containers only and is read with ``torch.load(..., weights_only=True)``.

Resuming restores everything the next epoch reads, so on the CPU with a fixed seed a resumed run
gives bit for bit the result of an uninterrupted one (``docs/resume.md``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from skorch.callbacks import Callback
from skorch.history import History

from ._io import atomic_torch_save, safe_torch_load
from ._validation import plain, qualified_name
from ._version import __version__
from .distributed import is_main_process, unwrap
from .exceptions import CheckpointError, OutputExistsError

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "EpochCheckpoint", "FitCheckpoint", "checkpoint_summary",
           "prepare_checkpoint_dir", "read_checkpoint", "restore_net"]

#: Name of the checkpoint file inside a checkpoint directory.
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "sklearn-bayes-transfer/checkpoint"
_FORMAT_VERSION = 1


def prepare_checkpoint_dir(directory: str | os.PathLike, *, resume: bool, restart: bool = False) -> Path:
    """Make ``directory`` ready for a run's checkpoints and return the checkpoint file's path.

    The directory is created if needed and must be writable. One that already holds a checkpoint is
    only used with ``resume`` (continue it) or ``restart`` (delete it and start over), so that a
    new run never overwrites another's progress by accident. Temporary files left by a write that
    was killed are removed.

    Raises
    ------
    CheckpointError
        If the directory cannot be created or written.
    OutputExistsError
        If it holds a checkpoint and neither ``resume`` nor ``restart`` is set.
    """
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"checkpoint directory '{folder}' is not a directory; give a directory path") from None
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint directory '{folder}': {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"checkpoint directory '{folder}' is not writable; choose another directory or "
                              "fix its permissions")
    path = folder / CHECKPOINT_FILE
    if path.exists() and not resume:
        if not restart:
            raise OutputExistsError(f"checkpoint directory '{folder}' already holds a checkpoint; resume it "
                                    "(--resume, resume=True), start over (--force), or use another directory")
        path.unlink(missing_ok=True)  # another process of the same launch may have done it
    if is_main_process():  # the one that writes
        for stale in folder.glob(f".{CHECKPOINT_FILE}.*.tmp"):
            stale.unlink(missing_ok=True)
    return path


def _rng_state() -> dict[str, Any]:
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        for index, value in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value, index)


class EpochCheckpoint(Callback):
    """Write the run's state to ``path`` at the end of every training epoch, atomically.

    Put it after every callback whose state it saves (the ones that ``extra_state`` reads).

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file (see :func:`prepare_checkpoint_dir`).
    settings : dict
        Plain description of the run; :func:`read_checkpoint` refuses a checkpoint whose settings differ.
    extra_state : callable, optional
        ``extra_state(net) -> dict`` of tensors and plain values saved beside the net's state.

    Examples
    --------
    >>> from skorch import NeuralNet
    >>> net = NeuralNet(torch.nn.Linear(2, 2), torch.nn.MSELoss, max_epochs=1, train_split=None,
    ...                 callbacks=[("checkpoint", EpochCheckpoint("run/checkpoint.pt", {"lr": 0.1}))])
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any],
                 extra_state: Callable[[Any], dict[str, Any]] | None = None) -> None:
        self.path = path
        self.settings = settings
        self.extra_state = extra_state

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        if not is_main_process():
            return  # the weights are the same on every process; one writes
        state = {
            "format": CHECKPOINT_FORMAT, "format_version": _FORMAT_VERSION, "library_version": __version__,
            "settings": json.dumps(plain(dict(self.settings), "settings"), sort_keys=True),
            "epochs": len(net.history),
            "module": unwrap(net.module_).state_dict(),
            "optimizer": net.optimizer_.state_dict(),
            "history": json.dumps(net.history.to_list(), default=float),
            "rng": _rng_state(),
            "extra": self.extra_state(net) if self.extra_state is not None else {},
        }
        atomic_torch_save(state, self.path)


def read_checkpoint(path: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path``, checked against this run's ``settings``; ``None`` if there is none.

    Raises
    ------
    CheckpointError
        If the file is unreadable or not a checkpoint of ours, or if a setting differs (named,
        with both values).
    """
    path = Path(path)
    if not path.exists():
        return None
    state, saved = _load(path, mmap=False)
    current = plain(dict(settings), "settings")
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"checkpoint '{path}' comes from a run with {key}={_shown(saved.get(key))}, but this run has "
                f"{key}={_shown(current.get(key))}; resume with the same settings, or start over with --force")
    return state


def _load(path: str | os.PathLike, *, mmap: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint file's state and its decoded settings, checked to be a complete checkpoint of ours."""
    state = safe_torch_load(path, what="checkpoint", mmap=mmap, error=CheckpointError)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not a sklearn-bayes-transfer checkpoint; use another "
                              "checkpoint directory")
    if state.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {state.get('format_version')!r}; this "
                              f"library (version {__version__}) reads version {_FORMAT_VERSION}: start over with --force")
    try:
        saved = json.loads(state["settings"])
        for key in ("module", "optimizer", "history", "rng", "extra", "epochs"):
            state[key]  # a missing part raises KeyError
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is incomplete or corrupt ({exc}); start over with --force") from None
    return state, saved


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def restore_net(net: Any, state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Load a checkpoint's module, optimizer, history and random states into an initialized ``net``."""
    try:
        unwrap(net.module_).load_state_dict(state["module"])
        net.optimizer_.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"checkpoint '{path}' does not fit this model ({first}); start over with --force") from None
    net.history = History(json.loads(state["history"]))
    _set_rng_state(state["rng"])


# Hyperparameters that may change between a fine-tune and its resumption (or are not settings).
_FREE_TO_CHANGE = {"callbacks", "verbose", "device", "warm_start", "iterator_train__num_workers",
                   "iterator_valid__num_workers", "compile", "use_caching", "torch_load_kwargs"}


def _setting(value: Any) -> Any:
    """A hyperparameter as a comparable plain value: a prior by its digest, classes by name."""
    from .prior import Prior

    if isinstance(value, Prior):
        return {"prior digest": value.digest()}
    if isinstance(value, type):
        return qualified_name(value)
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    try:
        return plain(value, "setting")
    except Exception:  # noqa: BLE001 - objects (modules, transforms) are compared by their type only
        return type(value).__qualname__


class FitCheckpoint(EpochCheckpoint):
    """Make an estimator's fine-tune resumable: a checkpoint every epoch, and ``resume`` to continue one.

    A skorch callback for :class:`~sklearn_bayes_transfer.PriorRegularizedClassifier` and
    :class:`~sklearn_bayes_transfer.PriorRegularizedSegmenter` (``finetune --checkpoint-dir``). It
    saves the weights, the optimizer, the history, the random states, the prior scale and the state
    of the learning-rate schedule and of ``prior_scale="evidence"``; ``resume=True`` continues from
    it, giving the uninterrupted fit's weights (bit for bit on the CPU). Checkpoints are refused
    for ``inference="swag"`` and ``"sgld"``, whose samples they do not hold (``docs/resume.md``).

    Parameters
    ----------
    directory : str or os.PathLike
        Where ``checkpoint.pt`` is written.
    resume : bool, default=False
        Continue from the checkpoint there (a fresh start if there is none).
    restart : bool, default=False
        Delete a checkpoint found there and start over (without it, one is refused unless ``resume``).

    Examples
    --------
    >>> from sklearn_bayes_transfer import PriorRegularizedClassifier
    >>> clf = PriorRegularizedClassifier(callbacks=[("checkpoint", FitCheckpoint("runs/ft", resume=True))])
    """

    def __init__(self, directory: str | os.PathLike, resume: bool = False, restart: bool = False) -> None:
        super().__init__(Path(directory) / CHECKPOINT_FILE, {}, extra_state=self._estimator_state)
        self.directory = directory
        self.resume = resume
        self.restart = restart

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        sampling = getattr(getattr(net, "training_plan_", None), "sampling", None)
        inference = getattr(getattr(sampling, "inference", None), "value", "map")
        if inference in ("swag", "sgld"):
            raise CheckpointError(f"checkpoints of a fine-tune hold no posterior samples: inference={inference!r} "
                                  "cannot be resumed; use inference='map' or 'laplace', or no checkpoint directory")
        self.path = prepare_checkpoint_dir(self.directory, resume=self.resume, restart=self.restart)
        self.restart = False  # a later fit of the same estimator continues its own checkpoints
        self.settings = self._settings(net)
        state = read_checkpoint(self.path, self.settings) if self.resume else None
        if state is None:
            return
        restore_net(net, state, self.path)
        extra = state["extra"]
        if extra["prior_scale"] is not None and extra["prior_scale"] != net.prior_scale_:
            net._set_prior_scale(extra["prior_scale"])
        for name, callback in net.callbacks_:
            if name in extra["callbacks"]:
                for attr, value in extra["callbacks"][name].items():
                    setattr(callback, attr, value)
        net._resumed_epochs_ = int(state["epochs"])

    @staticmethod
    def _settings(net: Any) -> dict[str, Any]:
        params = net.get_params(deep=False)
        settings = {k: _setting(v) for k, v in params.items()
                    if k not in _FREE_TO_CHANGE and not k.startswith("callbacks__")}
        plan = net.training_plan_
        settings.update(n_train=int(plan.n_train), steps_per_epoch=int(plan.steps_per_epoch),
                        classes=[str(c) for c in net.classes_])
        return settings

    @staticmethod
    def _estimator_state(net: Any) -> dict[str, Any]:
        callbacks = dict(net.callbacks_)
        saved: dict[str, dict[str, Any]] = {}
        schedule = callbacks.get("lr_schedule")
        if schedule is not None and hasattr(schedule, "step_"):
            saved["lr_schedule"] = {"step_": schedule.step_}
        evidence = callbacks.get("evidence")
        if evidence is not None and getattr(evidence, "active_", False):
            saved["evidence"] = {"step_": evidence.step_, "trace_": list(evidence.trace_)}
        return {"prior_scale": None if net.prior_scale_ is None else float(net.prior_scale_), "callbacks": saved}


def checkpoint_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, as plain python: epochs done, the run's settings, its last losses.

    Raises
    ------
    CheckpointError
        If the file is unreadable or not a checkpoint of ours.
    """
    state, settings = _load(path, mmap=True)  # the weights are not read
    try:
        history = json.loads(state["history"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is incomplete or corrupt ({exc})") from None
    last = history[-1] if history else {}
    return {"file": str(path), "epochs_done": int(state.get("epochs", len(history))),
            "library_version": state.get("library_version"), "settings": settings,
            "last_epoch": {k: v for k, v in last.items() if k != "batches"}}

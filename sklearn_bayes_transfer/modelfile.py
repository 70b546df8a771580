"""Fine-tuned model files: a fitted estimator saved as tensors and plain containers.

A model file is written with ``torch.save`` of one dict and read with ``weights_only=True``,
so loading one never runs code (unlike pickling the estimator, which stays available to Python
users as in scikit-learn). Version 1 holds::

    {"format": "sklearn-bayes-transfer/model", "version": 1,
     "estimator": "PriorRegularizedClassifier",          # a name from a fixed table, never a path
     "backbone": {"backbone": "resnet18", "backbone_kwargs": {...}},
     "head": {"kind": "linear", "in_features": 512, "out_features": 10, "bias": True},
     "classes": [...] or None,                           # plain python labels
     "preprocess": Preprocess.to_meta() or None,
     "hyperparameters": {...},                           # the plain-valued constructor arguments
     "fitted": {"n_features_in": ..., "input_shape": [...], "n_train": ..., "prior_scale": ...,
                "evidence_trace": [{"step": ..., "prior_scale": ..., "log_evidence": ...}, ...]},
     "state_dict": {name: Tensor},                       # the whole network, on the CPU
     "samples": dict or None,                            # Bayesian-inference state, see below
     "meta": {"library_version": ..., "created": ..., "optimizer": ..., "prior": {...}}}

The same dict can be written as a safetensors file (a path ending in ``.safetensors``, or
``file_format="safetensors"``): the tensors as safetensors tensors, everything else as JSON in the
header's ``payload`` entry, each tensor replaced by ``{"__tensor__": name}``. :func:`load_model` reads
both formats by content.

The prior is not stored: a fitted network predicts without it. :func:`load_model` rebuilds the
backbone from its registry name, the head from its spec, loads the weights and sets the fitted
attributes, so ``predict``, ``predict_proba`` and ``score`` work as before saving.

Estimator protocol
------------------
An estimator class listed in this module's table is saved generically through
:class:`SavableEstimator`: scikit-learn's fitted check (``__sklearn_is_fitted__``), a plain
description of its head and the way back (``head_spec`` / ``head_from_spec``), how backbone and
head make its network (``assemble_network``), and its posterior samples, if any
(``posterior_state`` / ``load_posterior_state``). ``classes_`` (if any) is restored as
``classes_fitted_``, which the estimators' ``classes_`` reads. Loading sets fitted state only: the
hyperparameters are the ones the file recorded.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._io import atomic_torch_save, check_input_file, own_storages, safe_torch_load
from ._safetensors import file_format_for, is_safetensors, read_safetensors, write_safetensors
from ._validation import Integral, Interval, Options, check_params, mismatch_report, plain, qualified_name
from ._version import __version__
from .backbones import BackboneWithHead, backbone_from_meta, backbone_meta
from .data import Preprocess
from .exceptions import BayesTransferError, ConfigError, PriorFormatError
from .prior import FORMAT_NAME as PRIOR_FORMAT_NAME

__all__ = ["MODEL_FORMAT_NAME", "MODEL_FORMAT_VERSION", "ModelFileError", "SavableEstimator", "convert_model",
           "load_model", "model_summary", "save_model"]

MODEL_FORMAT_NAME = "sklearn-bayes-transfer/model"
MODEL_FORMAT_VERSION = 1

#: The estimators a model file may name, and the module of this package that defines each. A
#: file only ever selects an entry of this table: nothing named inside a file is imported.
class SavableEstimator(Protocol):
    """What an estimator offers to be written to and rebuilt from a model file."""

    module_: nn.Module

    def __sklearn_is_fitted__(self) -> bool:
        """Whether the estimator is fitted (scikit-learn's ``check_is_fitted`` asks this)."""

    def head_spec(self) -> dict[str, Any]:
        """The fitted network's head as plain values (kind and sizes)."""

    @classmethod
    def head_from_spec(cls, spec: dict[str, Any], backbone: nn.Module) -> nn.Module:
        """A new head from :meth:`head_spec`'s description."""

    @classmethod
    def assemble_network(cls, backbone: nn.Module, head: nn.Module) -> nn.Module:
        """The network made of a backbone and a head."""

    def posterior_state(self) -> dict[str, Any]:
        """Posterior samples as tensors and plain containers; empty without any."""

    def load_posterior_state(self, state: Mapping[str, Any]) -> None:
        """Put :meth:`posterior_state`'s samples back on an initialised estimator."""


_ESTIMATOR_MODULES: dict[str, str] = {
    "PriorRegularizedClassifier": "classifier",
    "PriorRegularizedSegmenter": "segmenter",
}

# Constructor arguments that are not hyperparameters of the fitted model: the prior and module
# are replaced on loading, the device is chosen by the caller, classes are stored on their own.
_NOT_HYPERPARAMETERS = frozenset({"prior", "module", "device", "classes"})
# Fitted attributes (besides classes_ and preprocess_) that a rebuilt estimator gets back.
_FITTED_ATTRIBUTES = ("n_features_in_", "input_shape_", "n_train_", "prior_scale_", "evidence_trace_")


class ModelFileError(PriorFormatError):
    """A model file cannot be written or read: wrong format, version, estimator or content."""


# -- saving -----------------------------------------------------------------------------------------
def save_model(estimator: Any, path: str | os.PathLike, *, overwrite: bool = True,
               file_format: str | None = None) -> Path:
    """Write a fitted estimator to a model file, atomically.

    Parameters
    ----------
    estimator : PriorRegularizedClassifier or PriorRegularizedSegmenter
        A fitted estimator whose network is ``BackboneWithHead`` over a registered backbone
        (what the estimators build from a prior).
    path : str or os.PathLike
        The file to write.
    overwrite : bool, default=True
        If False and ``path`` exists, raise :class:`~sklearn_bayes_transfer.OutputExistsError`.
    file_format : {"torch", "safetensors"}, optional
        By default safetensors for a path ending in ``.safetensors``, else a ``torch.save`` file.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ModelFileError
        If the estimator is not fitted, not a known estimator class, or its network cannot be
        rebuilt from a name (a user's own module): pickle such an estimator instead.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_bayes_transfer import Prior
    >>> from sklearn_bayes_transfer.backbones import get_backbone
    >>> from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
    >>> prior = Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01)
    >>> X, y = np.random.default_rng(0).random((8, 8, 8)).astype("float32"), np.array([0, 1] * 4)
    >>> clf = PriorRegularizedClassifier(prior, max_epochs=1, verbose=0).fit(X, y)
    >>> path = save_model(clf, "model.pt")                          # doctest: +SKIP
    >>> np.allclose(load_model(path).predict_proba(X), clf.predict_proba(X))  # doctest: +SKIP
    True
    """
    return _write_payload(_model_payload(estimator), path, overwrite=overwrite, file_format=file_format)


def convert_model(source: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = True,
                  file_format: str | None = None) -> Path:
    """Write the model file ``source`` again in the other format (see :func:`save_model`); same content.

    Raises
    ------
    ModelFileError
        If ``source`` is not a readable model file.
    """
    payload = _read_payload(source)
    _check_payload(payload, str(source))
    return _write_payload(payload, path, overwrite=overwrite, file_format=file_format)


def _write_payload(payload: dict[str, Any], path: str | os.PathLike, *, overwrite: bool,
                   file_format: str | None) -> Path:
    if file_format_for(path, file_format) == "torch":
        return atomic_torch_save(own_storages(payload), path, overwrite=overwrite)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _tensors_out(payload, tensors)
    metadata = {"format": MODEL_FORMAT_NAME, "version": str(MODEL_FORMAT_VERSION), "payload": json.dumps(skeleton)}
    return write_safetensors(tensors, metadata, path, overwrite=overwrite)


def _tensors_out(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor moved into ``tensors`` and replaced by a reference to it."""
    if isinstance(value, torch.Tensor):
        name = f"tensor/{len(tensors)}"
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, dict):
        return {k: _tensors_out(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors_out(v, tensors) for v in value]
    return value


def _tensors_in(value: Any, tensors: Mapping[str, torch.Tensor], source: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            if value["__tensor__"] not in tensors:
                raise ModelFileError(f"model file '{source}': its header refers to tensor {value['__tensor__']!r}, "
                                     "which the file does not hold")
            return tensors[value["__tensor__"]]
        return {k: _tensors_in(v, tensors, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_tensors_in(v, tensors, source) for v in value]
    return value


def _read_payload(path: str | os.PathLike) -> Any:
    """A model file's dict, from either format (a safetensors prior reads as a prior's format name)."""
    check_input_file(path, "model file", ModelFileError)
    if not is_safetensors(path):
        return safe_torch_load(path, what="model file", mmap=True, error=ModelFileError)
    tensors, metadata = read_safetensors(path, what="model file", error=ModelFileError)
    if metadata.get("format") != MODEL_FORMAT_NAME:
        return {"format": metadata.get("format", "no 'format' entry")}  # _check_payload says what it is
    try:
        skeleton = json.loads(metadata["payload"])
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"model file '{path}': its safetensors header lacks or garbles its payload "
                             f"({type(exc).__name__}: {exc})") from None
    return _tensors_in(skeleton, tensors, str(path))


def _model_payload(estimator: Any) -> dict[str, Any]:
    """The version-1 payload of a fitted estimator (see the module docstring)."""
    name = type(estimator).__name__
    if name not in _ESTIMATOR_MODULES or _estimator_class(name, "<save>") is not type(estimator):
        raise ModelFileError(f"cannot write a model file for a {name}: model files hold only "
                             f"{', '.join(_ESTIMATOR_MODULES)}; pickle this estimator instead "
                             "(pickle.dump / joblib.dump)")
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        raise ModelFileError(f"this {name} is not fitted yet; call fit before saving it") from None
    module = estimator.module_
    arch = backbone_meta(module.backbone) if isinstance(module, BackboneWithHead) else None
    if arch is None:
        raise ModelFileError(f"this {name}'s network ({type(module).__name__}) is not a registered backbone with a "
                             "head, so a model file could not rebuild it; pickle the estimator instead "
                             "(pickle.dump / joblib.dump), or register the backbone with register_backbone")
    classes = getattr(estimator, "classes_", None) if hasattr(estimator, "classes_fitted_") else None
    preprocess = getattr(estimator, "preprocess_", None)
    fitted = {attr.rstrip("_"): getattr(estimator, attr) for attr in _FITTED_ATTRIBUTES if hasattr(estimator, attr)}
    extras = estimator.posterior_state()
    prior = getattr(estimator, "prior_", None)
    optimizer = getattr(estimator, "optimizer", None)
    return {
        "format": MODEL_FORMAT_NAME,
        "version": MODEL_FORMAT_VERSION,
        "estimator": name,
        "backbone": _plain(arch, "backbone"),
        "head": _plain(_head_spec(estimator), "head spec"),
        "classes": None if classes is None else [_plain_label(c) for c in np.asarray(classes).tolist()],
        "preprocess": preprocess.to_meta() if preprocess is not None else None,
        "hyperparameters": _hyperparameters(estimator),
        "fitted": _plain(fitted, "fitted attributes"),
        "state_dict": {k: v.detach().to("cpu") for k, v in module.state_dict().items()},
        "samples": _plain(extras, "posterior samples", tensors=True) if extras else None,
        "meta": {
            "library_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "optimizer": qualified_name(optimizer) if isinstance(optimizer, type) else None,
            "prior": prior.meta if prior is not None else None,
        },
    }


def _head_spec(estimator: SavableEstimator) -> dict[str, Any]:
    try:
        return estimator.head_spec()
    except BayesTransferError as exc:
        raise ModelFileError(str(exc)) from None


def _hyperparameters(estimator: Any) -> dict[str, Any]:
    """The constructor arguments with plain values (classes such as the optimizer are left out)."""
    out = {}
    for key, value in estimator.get_params(deep=False).items():
        if key.startswith("_") or key in _NOT_HYPERPARAMETERS:
            continue
        try:
            out[key] = _plain(value, key)
        except ModelFileError:
            continue
    return out


# -- loading ----------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, *, device: str = "cpu") -> Any:
    """Read a model file safely (``weights_only=True``) and rebuild the fitted estimator.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save_model` (or ``bt-transfer finetune``).
    device : str, default="cpu"
        Where the rebuilt network runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...). Posterior
        samples that were kept on an accelerator (``inference_device``) move there too.

    Returns
    -------
    estimator
        A fitted estimator, with ``prior=None`` (the prior is not needed to predict).

    Raises
    ------
    ModelFileError
        Naming the file and what is wrong: not a model file (a prior file, a pickle that would
        run code, other bytes), an unsupported version, an unknown estimator, or content that
        does not fit the network it describes.

    Examples
    --------
    >>> clf = load_model("model.pt")                                # doctest: +SKIP
    >>> clf.predict(images)                                         # doctest: +SKIP
    """
    source = str(path)
    payload = _read_payload(path)
    _check_payload(payload, source)
    cls = _estimator_class(payload["estimator"], source)
    try:
        return _rebuild(cls, payload, source, device)
    except ModelFileError:
        raise
    except BayesTransferError as exc:
        raise ModelFileError(f"model file '{source}': {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelFileError(f"model file '{source}': invalid content ({type(exc).__name__}: {exc})") from None


def model_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a model file holds, as plain python, without rebuilding the network.

    Returns the estimator and backbone, the head, the classes, the hyperparameters, the fitted
    attributes (``prior_scale`` and, with ``prior_scale="evidence"``, the ``evidence_trace``), the
    number of parameters and of posterior samples, and the file's ``meta``.

    Examples
    --------
    >>> model_summary("model.pt")["fitted"]["prior_scale"]            # doctest: +SKIP
    5408.75
    """
    source = str(path)
    payload = _read_payload(path)
    _check_payload(payload, source)
    samples = payload["samples"]
    return {
        "file": source,
        "estimator": payload["estimator"],
        "version": payload["version"],
        "backbone": payload["backbone"],
        "head": payload["head"],
        "classes": payload["classes"],
        "n_params": sum(int(v.numel()) for k, v in payload["state_dict"].items()
                        if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))),
        "hyperparameters": payload["hyperparameters"],
        "fitted": payload["fitted"],
        "n_samples": int(samples["samples"].shape[0]) if samples else 0,
        "meta": payload["meta"],
    }


def _rebuild(cls: type, payload: dict[str, Any], source: str, device: str) -> Any:
    _check_state(payload["state_dict"], source)
    backbone = backbone_from_meta(payload["backbone"])
    module = cls.assemble_network(backbone, cls.head_from_spec(payload["head"], backbone))
    _load_state(module, payload["state_dict"], source)

    params = _restorable_hyperparameters(cls, payload["hyperparameters"], source)
    if params.get("inference_device", "cpu") != "cpu":
        # Posterior samples kept on an accelerator follow the network to the device asked for
        # (the file may come from a GPU machine); samples kept on the CPU stay there.
        params["inference_device"] = device
    estimator = cls(prior=None, module=module, device=device, **params)
    estimator.initialize()
    # initialize() re-validated the arguments; now the fitted state, as fit would leave it.
    if payload["classes"] is not None:
        outputs = payload["head"].get("out_features", payload["head"].get("n_classes"))
        if outputs is not None and outputs != len(payload["classes"]):
            raise ModelFileError(f"model file '{source}': it lists {len(payload['classes'])} classes but its head "
                                 f"has {outputs} outputs")
        estimator.classes_fitted_ = np.asarray(payload["classes"])
        estimator.classes_inferred_ = estimator.classes_fitted_
    preprocess = payload["preprocess"]
    estimator.preprocess_ = None if preprocess is None else Preprocess.from_meta(preprocess, error=ModelFileError)
    for attr in _FITTED_ATTRIBUTES:
        key = attr.rstrip("_")
        if key in payload["fitted"]:
            value = payload["fitted"][key]
            setattr(estimator, attr, tuple(value) if attr == "input_shape_" and isinstance(value, list) else value)
    if payload["samples"] is not None:
        estimator.load_posterior_state(payload["samples"])
    return estimator


def _check_payload(payload: Any, source: str) -> None:
    def bad(msg: str) -> ModelFileError:
        return ModelFileError(f"model file '{source}': {msg}")

    if not isinstance(payload, dict):
        raise bad(f"expected a dict written by save_model, found {type(payload).__name__}")
    found = payload.get("format", "no 'format' key")
    if found == PRIOR_FORMAT_NAME:
        raise bad("this is a prior file, not a fine-tuned model; fine-tune with it first "
                  "(bt-transfer finetune --prior ...)")
    if found != MODEL_FORMAT_NAME:
        raise bad(f"not a sklearn-bayes-transfer model file (format: {found!r}); model files are written by "
                  "bt-transfer finetune or save_model")
    if payload.get("version") != MODEL_FORMAT_VERSION:
        raise bad(f"format version {payload.get('version')!r} is not supported; this library reads version "
                  f"{MODEL_FORMAT_VERSION} (upgrade sklearn-bayes-transfer if the file is newer)")
    expected = {"estimator": str, "backbone": dict, "head": dict, "classes": (list, type(None)),
                "preprocess": (dict, type(None)), "hyperparameters": dict, "fitted": dict, "state_dict": dict,
                "samples": (dict, type(None)), "meta": dict}
    for key, kind in expected.items():
        if key not in payload:
            raise bad(f"missing key {key!r}")
        if not isinstance(payload[key], kind):
            raise bad(f"{key!r} has the wrong type ({type(payload[key]).__name__})")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise bad("'state_dict' must map parameter names to tensors")


def _estimator_class(name: Any, source: str) -> type:
    module_name = _ESTIMATOR_MODULES.get(name) if isinstance(name, str) else None
    if module_name is None:
        raise ModelFileError(f"model file '{source}': estimator {name!r} is not one this library can rebuild "
                             f"(known: {', '.join(_ESTIMATOR_MODULES)})")
    try:
        module = importlib.import_module(f".{module_name}", __package__)
    except ModuleNotFoundError:
        raise ModelFileError(f"model file '{source}': estimator {name!r} is not available in this installation "
                             "(upgrade sklearn-bayes-transfer)") from None
    return getattr(module, name)


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a short message listing what does not fit."""
    report = mismatch_report({k: v.shape for k, v in module.state_dict().items()},
                             {k: v.shape for k, v in state.items()}, expected_name="network", found_name="file")
    if report is not None:
        raise ModelFileError(f"model file '{source}': the weights do not fit the network it describes: tensors "
                             f"{report}")
    module.load_state_dict(state, strict=True)


# skorch's own constructor arguments that a model file may hold, with what a file may set them to
# (the estimators' own are checked with their ``_parameter_constraints``).
_SKORCH_CONSTRAINTS: dict[str, list[Any]] = {
    "train_split": [None],
    "callbacks": [None],
    "predict_nonlinearity": [Options({"auto"}), None],
    "warm_start": [bool],
    "verbose": [Interval(Integral, 0, None)],
    "compile": [bool],
    "use_caching": [Options({"auto"}), bool],
    "torch_load_kwargs": [None, dict],
    "preprocess": [Options({"auto"}), None, dict],
}


def _restorable_hyperparameters(cls: type, stored: dict[str, Any], source: str) -> dict[str, Any]:
    """Stored hyperparameters this version's ``cls`` accepts, each checked as ``cls`` checks it.

    Prefixed (``a__b``) ones are records only. A value outside the constraints (a crafted file's
    ``batch_size=-5``, a string where skorch expects a callback list) is a :class:`ModelFileError`.
    """
    accepted = set(cls().get_params(deep=False))
    constraints = {**_SKORCH_CONSTRAINTS, **cls._all_parameter_constraints()}
    params = {}
    for key, value in stored.items():
        if "__" in key or key in _NOT_HYPERPARAMETERS:
            continue
        if key not in accepted:
            warnings.warn(f"model file '{source}': hyperparameter {key}={value!r} is unknown to this version's "
                          f"{cls.__name__}; it is ignored", UserWarning, stacklevel=4)
            continue
        if key == "callbacks" and value == []:
            value = None  # a fit's own callbacks are objects; the file records that there were none to keep
        if key not in constraints:
            raise ModelFileError(f"model file '{source}': hyperparameter {key!r} cannot be restored from a file")
        try:
            check_params({key: value}, {key: constraints[key]})
        except ConfigError as exc:
            raise ModelFileError(f"model file '{source}': hyperparameter {exc}") from None
        params[key] = value
    return params


def _check_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Finite weights and statistics, non-negative BatchNorm variances."""
    for name, value in state.items():
        if not value.is_floating_point():
            continue
        if not bool(torch.isfinite(value).all()):
            raise ModelFileError(f"model file '{source}': tensor {name!r} contains NaN or Inf values")
        if name.endswith("running_var") and value.numel() and float(value.min()) < 0:
            raise ModelFileError(f"model file '{source}': BatchNorm variance {name!r} has a negative value "
                                 f"{float(value.min()):.3g}")


# -- plain values -----------------------------------------------------------------------------------
def _plain(value: Any, where: str, *, tensors: bool = False) -> Any:
    """``value`` as plain python (and, with ``tensors``, CPU tensors), so ``weights_only`` loads it."""
    return plain(value, where, error=ModelFileError, tensors=tensors)


def _plain_label(label: Any) -> Any:
    label = label.item() if isinstance(label, np.generic) else label
    if not isinstance(label, (str, int, float, bool)) or isinstance(label, float) and not math.isfinite(label):
        raise ModelFileError(f"class label {label!r} ({type(label).__name__}) cannot be stored in a model file; "
                             "use str or int labels")
    return label


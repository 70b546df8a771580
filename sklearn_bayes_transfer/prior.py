"""The prior: an immutable Gaussian over a backbone's flattened parameters.

Convention (``docs/design.md``): ``Sigma = diag(variance) + factor^T factor`` exactly, with ``factor`` of
shape ``(K, D)``. Parameters are flattened in ``backbone.named_parameters()`` order; buffers
(BatchNorm running statistics) travel beside the distribution, for initialisation only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_torch_save, check_input_file, own_storages, safe_torch_load
from ._safetensors import file_format_for, is_safetensors, read_safetensors, write_safetensors
from ._validation import check_choice, mismatch_report, plain
from ._version import __version__
from .exceptions import ConfigError, PriorFormatError, PriorMismatchError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGENET_PREPROCESS",
    "FactorNormalization",
    "Prior",
    "PriorStructure",
    "named_parameters_for",
]

FORMAT_NAME = "sklearn-bayes-transfer/prior"
FORMAT_VERSION = 1
#: The preprocessing torchvision's and the paper's ImageNet weights were trained with (prior ``meta``).
IMAGENET_PREPROCESS = {"image_size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
                       "std": [0.229, 0.224, 0.225]}

#: Storage dtypes a prior's factor may have, by name.
FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# Wrappers (DDP, DataParallel, torch.compile, our own estimator modules) prefix names with these.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class PriorStructure(str, Enum):
    """How much of the learned covariance the downstream prior uses.

    - ``"lowrank"``: the full SWAG covariance, diagonal plus low-rank factor;
    - ``"diag"``: the diagonal only (the factor is dropped);
    - ``"isotropic"``: one variance for all weights, the mean marginal variance of the learned
      prior, around the learned mean (an L2-SP-like baseline with a learned centre);
    - ``"none"``: no prior on the backbone (standard fine-tuning with the same code path).
    """

    LOWRANK = "lowrank"
    DIAG = "diag"
    ISOTROPIC = "isotropic"
    NONE = "none"


class FactorNormalization(str, Enum):
    """How the rows of an official ``_covmat.pt`` are scaled.

    - ``"auto"``: detect from ``(covmat**2).sum(0) / variance`` (about K for raw rows, about 1
      for rows already divided by ``sqrt(K - 1)``);
    - ``"raw"``: rows are deviations ``w_t - mean``;
    - ``"normalized"``: rows are deviations divided by ``sqrt(K - 1)``.
    """

    AUTO = "auto"
    RAW = "raw"
    NORMALIZED = "normalized"



def _strip_wrapper_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def named_parameters_for(prior: "Prior", module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return ``module``'s parameters that ``prior`` covers, in the prior's order.

    Names are matched exactly, after stripping wrapper prefixes (``module.`` from DDP or
    ``DataParallel``, ``_orig_mod.`` from ``torch.compile``). If the module has a ``backbone``
    child and the prior's names are not all found at the top level, they are looked up under
    ``backbone.``, so a prior fitted on a bare backbone binds to a backbone-plus-head model.

    Raises
    ------
    PriorMismatchError
        Listing the first missing names and mismatching shapes.
    """
    available = {_strip_wrapper_prefix(n): p for n, p in module.named_parameters()}
    if not all(n in available for n in prior.names):
        nested = {n[len("backbone."):]: p for n, p in available.items() if n.startswith("backbone.")}
        if nested and sum(n in nested for n in prior.names) > sum(n in available for n in prior.names):
            available = nested
    report = mismatch_report(dict(zip(prior.names, prior.shapes)), {n: p.shape for n, p in available.items()},
                             expected_name="prior", found_name="module", unexpected=False)
    if report is not None:
        hint = f" (prior backbone: {prior.meta.get('backbone', 'unknown')!r}; module parameters start with " \
               f"{', '.join(list(available)[:3])})"
        raise PriorMismatchError(f"prior does not fit the module: prior parameters {report}{hint}")
    return [(n, available[n]) for n in prior.names]


class Prior:
    """A Gaussian prior ``N(mean, diag(variance) + factor^T factor)`` over backbone weights.

    A ``Prior`` is immutable: methods that change it return a new object sharing unchanged
    tensors. Because of that, ``copy.deepcopy`` (and so :func:`sklearn.base.clone`) returns the
    object itself instead of copying possibly gigabytes of tensors.

    Parameters
    ----------
    mean : torch.Tensor of shape (D,)
        Centre of the prior (for example the SWAG mean).
    variance : torch.Tensor of shape (D,)
        Diagonal part of the covariance (for SWAG: half the clamped diagonal variance).
    factor : torch.Tensor of shape (K, D), optional
        Low-rank part; ``None`` or ``K = 0`` for a diagonal prior. Stored in float32, bfloat16
        or float16; all arithmetic accumulates in float32 or better.
    names : sequence of str
        Backbone parameter names, in ``named_parameters()`` order.
    shapes : sequence of shapes
        Their shapes; the element counts must add up to ``D``.
    buffers : mapping of str to torch.Tensor, optional
        Non-parameter state (BatchNorm running statistics) used to initialise a backbone.
    meta : mapping, optional
        Plain-python metadata: ``backbone``, ``backbone_kwargs``, ``preprocess``, ``method``, ...

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer import Prior
    >>> layer = torch.nn.Linear(3, 2)
    >>> prior = Prior.from_module(layer, variance=0.1)
    >>> prior.n_params, prior.rank
    (8, 0)
    """

    __slots__ = ("_mean", "_variance", "_factor", "_names", "_shapes", "_buffers", "_meta", "_source")

    def __init__(
        self,
        mean: torch.Tensor,
        variance: torch.Tensor,
        factor: torch.Tensor | None = None,
        *,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        buffers: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        mean = _as_vector(mean, "mean")
        variance = _as_vector(variance, "variance")
        d = mean.numel()
        if variance.numel() != d:
            raise PriorFormatError(f"variance has {variance.numel()} entries but mean has {d}")
        if factor is None:
            factor = torch.zeros(0, d, dtype=torch.float32)
        if not isinstance(factor, torch.Tensor) or factor.dim() != 2 or factor.shape[1] != d:
            shape = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
            raise PriorFormatError(f"factor must have shape (K, D) = (K, {d}), got {shape}")
        if factor.dtype not in FACTOR_DTYPES.values():
            if not factor.dtype.is_floating_point:
                raise PriorFormatError(f"factor must be floating point, got dtype {factor.dtype}")
            factor = factor.to(torch.float32)
        names = tuple(str(n) for n in names)
        shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
        if len(names) != len(shapes):
            raise PriorFormatError(f"{len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            raise PriorFormatError("parameter names are not unique")
        total = sum(math.prod(s) for s in shapes)
        if total != d:
            raise PriorFormatError(f"parameter shapes add up to {total} elements but mean has {d}")
        if not _all_finite(mean):
            raise PriorFormatError("mean contains NaN or Inf values")
        if not _all_finite(variance):
            raise PriorFormatError("variance contains NaN or Inf values")
        if d and float(variance.min()) < 0:
            raise PriorFormatError(f"variance must be >= 0, found minimum {float(variance.min()):.3g}")
        if factor.numel() and not _all_finite(factor):
            raise PriorFormatError("factor contains NaN or Inf values")
        self._mean = mean
        self._variance = variance
        self._factor = factor
        self._names = names
        self._shapes = shapes
        self._buffers = {str(k): _as_tensor(v, f"buffers[{k!r}]") for k, v in dict(buffers or {}).items()}
        _check_buffers(self._buffers)
        self._meta = plain(dict(meta or {}), "meta", error=PriorFormatError)
        self._source: _FileSource | None = None

    # -- read-only views -------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Centre of the prior, float32 of shape (D,).

        The prior's own tensor, not a copy: copy it before anything may write into it
        (``torch.nn.utils.vector_to_parameters(prior.mean, ...)`` makes the parameters views of it,
        so training would change the prior).
        """
        return self._mean

    @property
    def variance(self) -> torch.Tensor:
        """Diagonal part of the covariance, float32 of shape (D,)."""
        return self._variance

    @property
    def factor(self) -> torch.Tensor:
        """Low-rank part of the covariance, shape (K, D), ``Sigma = diag(variance) + F^T F``."""
        return self._factor

    @property
    def names(self) -> tuple[str, ...]:
        """Backbone parameter names, in flattening order."""
        return self._names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the named parameters."""
        return self._shapes

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """Non-parameter state such as BatchNorm running statistics (a copy of the mapping)."""
        return dict(self._buffers)

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata (a copy): backbone, preprocessing, how the prior was made."""
        return _deep_copy_plain(self._meta)

    @property
    def n_params(self) -> int:
        """Number of covered parameters ``D``."""
        return self._mean.numel()

    @property
    def rank(self) -> int:
        """Rank ``K`` of the low-rank factor (0 for a diagonal prior)."""
        return self._factor.shape[0]

    @property
    def factor_dtype(self) -> torch.dtype:
        """Storage dtype of the factor."""
        return self._factor.dtype

    def __repr__(self) -> str:
        backbone = self._meta.get("backbone", "?")
        return (f"Prior(backbone={backbone!r}, n_params={self.n_params}, rank={self.rank}, "
                f"factor_dtype={str(self.factor_dtype).replace('torch.', '')})")

    def __deepcopy__(self, memo: dict) -> "Prior":
        # Immutable: sharing is safe, and GridSearchCV clones estimators once per candidate.
        return self

    def __copy__(self) -> "Prior":
        return self

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__ if k != "_source"}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "_source", None)
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def __reduce__(self) -> tuple:
        """Pickle by reference when loaded from a file and unchanged since: its path and content digest.

        Search workers (joblib, Dask) then memory-map the file instead of receiving the tensors
        with every candidate; a worker that cannot read the file, or finds other content there,
        raises :class:`PriorFormatError` naming the path. Other priors pickle their tensors.
        """
        source = self._source
        if source is not None and source.versions == self._versions():
            return (_prior_from_file, (source.path, source.digest))
        return (_prior_from_state, (self.__getstate__(),))

    def _versions(self) -> tuple[int, ...]:
        """In-place modification counters of every tensor (they change if anyone writes into one)."""
        tensors = (self._mean, self._variance, self._factor, *self._buffers.values())
        return tuple(t._version for t in tensors)

    def _replace(self, **changes: Any) -> "Prior":
        new = object.__new__(Prior)
        for k in self.__slots__:
            object.__setattr__(new, k, changes.get(k, getattr(self, k)))
        object.__setattr__(new, "_source", None)  # derived content is not the file's
        return new

    # -- derived quantities -------------------------------------------------------------------
    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat ``(D,)`` vector as the named parameter shapes."""
        if vector.shape[-1] != self.n_params:
            raise PriorMismatchError(f"vector has {vector.shape[-1]} entries, the prior covers {self.n_params}")
        out, offset = {}, 0
        for name, shape in zip(self._names, self._shapes):
            n = math.prod(shape)
            out[name] = vector[..., offset:offset + n].reshape(*vector.shape[:-1], *shape)
            offset += n
        return out

    def marginal_variance(self) -> torch.Tensor:
        """Diagonal of ``Sigma``: ``variance + colsum(factor**2)``, float32 of shape (D,)."""
        var = self._variance.to(torch.float32).clone()
        for start in range(0, self.rank):
            row = self._factor[start].to(torch.float32)
            var.add_(row * row)
        return var

    def covariance(self) -> torch.Tensor:
        """Dense ``(D, D)`` covariance in float64; only for small priors (tests, inspection)."""
        if self.n_params > 20_000:
            raise ConfigError(f"covariance() builds a dense {self.n_params}x{self.n_params} matrix; "
                              "it is meant for small priors only")
        f = self._factor.to(torch.float64)
        return torch.diag(self._variance.to(torch.float64)) + f.T @ f

    def reference_scale(self) -> float:
        """The scale ``lambda_0 = mean(mean**2) / mean(variance)``.

        At ``prior_scale = lambda_0`` the prior's diagonal spread matches the weights' own size;
        write grids as ``lambda_0 * 10**k`` so they transfer between priors.
        """
        mean_sq = float(self._mean.to(torch.float64).pow(2).mean())
        mean_var = float(self._variance.to(torch.float64).mean())
        if mean_var <= 0:
            return float("inf")
        return mean_sq / mean_var

    def reduce(self, structure: PriorStructure | str) -> "Prior":
        """Return the prior reduced to ``structure`` (``"lowrank"``, ``"diag"`` or ``"isotropic"``)."""
        structure = check_choice(PriorStructure, structure, "prior_structure")
        if structure is PriorStructure.LOWRANK:
            return self
        empty = torch.zeros(0, self.n_params, dtype=self._factor.dtype)
        if structure is PriorStructure.DIAG:
            return self._replace(_factor=empty)
        if structure is PriorStructure.ISOTROPIC:
            level = float(self.marginal_variance().to(torch.float64).mean())
            return self._replace(_variance=torch.full_like(self._variance, level), _factor=empty)
        raise ConfigError("prior_structure='none' means no prior; there is nothing to reduce to")

    def with_factor_dtype(self, dtype: torch.dtype | str) -> "Prior":
        """Return the prior with its factor stored as ``float32``, ``bfloat16`` or ``float16``."""
        if isinstance(dtype, str):
            if dtype not in FACTOR_DTYPES:
                raise ConfigError(f"factor_dtype={dtype!r} is not valid; expected one of {sorted(FACTOR_DTYPES)}")
            dtype = FACTOR_DTYPES[dtype]
        if dtype not in FACTOR_DTYPES.values():
            raise ConfigError(f"factor_dtype={dtype} is not valid; expected torch.float32, bfloat16 or float16")
        if dtype == self._factor.dtype:
            return self
        return self._replace(_factor=self._factor.to(dtype))

    def variance_stats(self) -> dict[str, float]:
        """Summary statistics of the diagonal variance, with the fraction sitting at the clamp.

        SWAG clamps the raw diagonal at ``var_clamp`` (``meta["var_clamp"]``), so the stored
        variance of a clamped weight is ``var_clamp / 2``. Without that key the fraction at the
        minimum value is reported instead.
        """
        v = self._variance.to(torch.float64)
        if v.numel() == 0:
            return {}
        clamp = self._meta.get("var_clamp")
        at = 0.5 * float(clamp) if clamp is not None else float(v.min())
        at_clamp = float((v <= at * (1 + 1e-4)).to(torch.float64).mean())
        return {
            "min": float(v.min()), "median": float(v.median()), "mean": float(v.mean()), "max": float(v.max()),
            "clamp_value": at, "fraction_at_clamp": at_clamp,
            "clamp_known": clamp is not None,
        }

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        variance: float = 1.0,
        meta: Mapping[str, Any] | None = None,
    ) -> "Prior":
        """An isotropic prior ``N(w0, variance * I)`` around a module's current weights.

        This is the L2-SP baseline (Li et al., 2018): no learned covariance, a chosen centre.
        Buffers (BatchNorm statistics) are stored for initialisation.

        Examples
        --------
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> Prior.from_module(net, variance=0.01).names
        ('0.weight', '0.bias', '2.weight', '2.bias')
        """
        if not (isinstance(variance, (int, float)) and math.isfinite(variance) and variance > 0):
            raise ConfigError(f"variance must be a positive finite number, got {variance!r}")
        named = [(_strip_wrapper_prefix(n), p) for n, p in module.named_parameters()]
        if not named:
            raise ConfigError(f"{type(module).__name__} has no parameters to put a prior on")
        with torch.no_grad():
            mean = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for _, p in named])
        info = {"backbone": getattr(module, "backbone_name", type(module).__name__),
                "backbone_kwargs": dict(getattr(module, "backbone_kwargs", {}) or {}),
                "method": "isotropic", "source_task": "given-weights",
                "library_version": __version__, "created": _now()}
        info.update(dict(meta or {}))
        return cls(mean, torch.full_like(mean, float(variance)), None,
                   names=[n for n, _ in named], shapes=[tuple(p.shape) for _, p in named],
                   buffers={_strip_wrapper_prefix(n): b.detach().to("cpu").clone() for n, b in module.named_buffers()},
                   meta=info)

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The version-1 file payload: tensors and plain containers only."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "names": list(self._names),
            "shapes": [list(s) for s in self._shapes],
            "mean": self._mean,
            "variance": self._variance,
            "factor": self._factor,
            "buffers": dict(self._buffers),
            "meta": _deep_copy_plain(self._meta),
            "digest": self.digest(),
        }

    def digest(self) -> str:
        """SHA-256 of the prior's content (names, shapes, meta and every tensor's bytes), as hex.

        :meth:`save` stores it and :meth:`load` checks it, so a flipped bit or a truncated copy
        is refused rather than used. A prior loaded with that check, and unchanged since, returns the
        checked value without reading its tensors again.
        """
        source = self._source
        if source is not None and source.verified and source.versions == self._versions():
            return source.digest
        h = hashlib.sha256()
        h.update(json.dumps({"names": list(self._names), "shapes": [list(s) for s in self._shapes],
                             "buffers": sorted(self._buffers), "meta": self._meta}, sort_keys=True,
                            default=str).encode())
        for tensor in (self._mean, self._variance, self._factor, *(self._buffers[k] for k in sorted(self._buffers))):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{flat.dtype}:{flat.numel()};".encode())
            h.update(flat.view(torch.uint8).numpy())
        return h.hexdigest()

    def save(self, path: str | os.PathLike, *, overwrite: bool = True, file_format: str | None = None) -> Path:
        """Write the prior atomically (temporary file, then rename).

        ``file_format`` is ``"torch"`` (a ``torch.save`` dict) or ``"safetensors"`` (the tensors with
        safetensors, everything else in its JSON header); by default, safetensors for a path ending
        in ``.safetensors``. Both hold the same content and :meth:`load` reads either. With
        ``overwrite=False`` an existing file is refused with :class:`OutputExistsError`.
        """
        if file_format_for(path, file_format) == "torch":
            return atomic_torch_save(own_storages(self.to_dict()), path, overwrite=overwrite)
        payload = self.to_dict()
        tensors = {"mean": payload["mean"], "variance": payload["variance"], "factor": payload["factor"],
                   **{f"buffers/{k}": v for k, v in payload["buffers"].items()}}
        metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "names": json.dumps(payload["names"]),
                    "shapes": json.dumps(payload["shapes"]), "meta": json.dumps(payload["meta"]),
                    "buffers": json.dumps(sorted(payload["buffers"])), "digest": payload["digest"]}
        return write_safetensors(tensors, metadata, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True) -> "Prior":
        """Read a prior file safely (``weights_only=True``) and lazily (memory-mapped).

        With ``verify`` (the default) the content is checked against the digest stored at save,
        which reads the whole file once; ``verify=False`` skips that for very large files.

        Raises
        ------
        PriorFormatError
            Naming the file and what is wrong with it.
        """
        payload = cls.read_payload(path, mmap=mmap)
        prior = cls.from_dict(payload, source=str(path), verify=verify)
        digest = payload.get("digest") if isinstance(payload, dict) else None
        if isinstance(digest, str):
            object.__setattr__(prior, "_source", _FileSource(os.path.realpath(path), digest, prior._versions(),
                                                             verified=verify))
        return prior

    @staticmethod
    def read_payload(path: str | os.PathLike, *, mmap: bool = True) -> Any:
        """The file's raw content as :meth:`from_dict` reads it, from either format, without checking it.

        A torch file gives whatever dict it holds (``weights_only``), a safetensors prior its
        tensors with the header decoded; any other file raises :class:`PriorFormatError`.
        """
        check_input_file(path, "prior file", PriorFormatError)
        if is_safetensors(path):
            return _safetensors_payload(path)
        return safe_torch_load(path, what="prior file", mmap=mmap)

    @classmethod
    def from_dict(cls, payload: Any, *, source: str = "<dict>", verify: bool = True) -> "Prior":
        """Build a prior from a version-1 payload (see :meth:`to_dict`), checking its digest if it has one."""
        def bad(msg: str) -> PriorFormatError:
            return PriorFormatError(f"prior file '{source}': {msg}")

        if not isinstance(payload, dict):
            raise bad(f"expected a dict written by Prior.save, found {type(payload).__name__}")
        if payload.get("format") != FORMAT_NAME:
            found = payload.get("format", "no 'format' key")
            hint = ""
            if found == "sklearn-bayes-transfer/model":
                hint = " (it is a fine-tuned model file: use it with `bt-transfer predict/evaluate` or load_model)"
            elif "state_dict" in payload or all(isinstance(v, torch.Tensor) for v in payload.values()):
                hint = " (is this a model state_dict? an official-repository prior? try `bt-transfer convert-official`)"
            raise bad(f"not a sklearn-bayes-transfer prior (format: {found!r}){hint}")
        version = payload.get("version")
        if version != FORMAT_VERSION:
            raise bad(f"format version {version!r} is not supported; this library reads version {FORMAT_VERSION} "
                      "(upgrade sklearn-bayes-transfer if the file is newer)")
        for key, kind in (("names", list), ("shapes", list), ("mean", torch.Tensor), ("variance", torch.Tensor),
                          ("factor", torch.Tensor), ("buffers", dict), ("meta", dict)):
            if key not in payload:
                raise bad(f"missing key {key!r}")
            if not isinstance(payload[key], kind):
                raise bad(f"{key!r} must be a {kind.__name__}, found {type(payload[key]).__name__}")
        try:
            prior = cls(payload["mean"], payload["variance"], payload["factor"], names=payload["names"],
                        shapes=payload["shapes"], buffers=payload["buffers"], meta=payload["meta"])
        except PriorFormatError as exc:
            raise bad(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise bad(f"invalid content: {exc}") from None
        stored = payload.get("digest")
        if stored is not None and not isinstance(stored, str):
            raise bad(f"'digest' must be a str, found {type(stored).__name__}")
        if verify and stored is not None and prior.digest() != stored:
            raise bad("its content does not match the digest stored when it was saved (a flipped bit, a truncated "
                      "or edited copy?); get the file again, or load it with verify=False at your own risk")
        return prior

    @classmethod
    def from_official(
        cls,
        prefix: str | os.PathLike,
        *,
        factor_normalization: FactorNormalization | str = "auto",
        backbone: str = "resnet50",
    ) -> "Prior":
        """Import a prior released by the paper's repository (hsouri/BayesianTransferLearning).

        Reads ``<prefix>_model.pt`` (torchvision ResNet state_dict with ``fc = Identity``),
        ``<prefix>_mean.pt``, ``<prefix>_variance.pt`` (SWAG diagonal) and ``<prefix>_covmat.pt``
        (K x D deviation rows), all with ``weights_only=True``, and converts them to this
        library's convention ``Sigma = diag(variance) + factor^T factor``:

        - raw rows ``C``: ``variance = diag / 2``, ``factor = C / sqrt(2 (K - 1))``;
        - rows already divided by ``sqrt(K - 1)``: ``factor = C / sqrt(2)``.

        What was detected is recorded in ``meta["import"]`` and reported in a warning when the
        detection is ambiguous. The mean is checked against the model file's parameters; a
        difference (the file may hold the last SWAG iterate) is reported as a warning.
        """
        normalization = check_choice(FactorNormalization, factor_normalization, "factor_normalization")
        files = _read_official(str(prefix))
        detected, ratio = _detect_normalization(files, normalization)
        return _convert_official(cls, files, normalization, detected, ratio, backbone)


@dataclass(frozen=True)
class _FileSource:
    """Where a loaded prior came from: the file, its stored digest, and its tensors' versions at load."""

    path: str
    digest: str
    versions: tuple[int, ...]
    verified: bool = False  # the content was checked against ``digest`` at load


# Priors a worker process has loaded by reference, by (path, digest): one mapping per file and process.
_BY_REFERENCE: dict[tuple[str, str], "Prior"] = {}


def _prior_from_state(state: dict) -> "Prior":
    prior = object.__new__(Prior)
    prior.__setstate__(state)
    return prior


def _prior_from_file(path: str, digest: str) -> "Prior":
    """Unpickle a prior sent by reference: memory-map ``path`` and check it holds what was sent."""
    key = (path, digest)
    if key not in _BY_REFERENCE:
        try:
            prior = Prior.load(path, verify=False)
        except PriorFormatError as exc:
            raise PriorFormatError(f"{exc} (this prior was sent to a worker as its file path; make the file "
                                   "readable at that path on every worker, or send a prior built in memory)") from None
        found = prior._source.digest if prior._source is not None else None
        if found != digest:
            raise PriorFormatError(f"prior file '{path}' on this worker is not the one that was sent (content digest "
                                   f"{str(found)[:12]} instead of {digest[:12]}); give every worker the same file")
        _BY_REFERENCE[key] = prior
    return _BY_REFERENCE[key]


# Elements checked at a time by _all_finite: the temporaries stay small (a few MB) for any prior size.
_FINITE_CHUNK = 1 << 21


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, in chunks: a memory-mapped file is read once, never copied."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        # A NaN or an infinity makes the sum non-finite, so a finite sum clears the chunk at the
        # speed of memory; only a non-finite one (which may also be an overflow) is looked at closely.
        if not bool(torch.isfinite(chunk.sum())) and not bool(torch.isfinite(chunk).all()):
            return False
    return True


def _safetensors_payload(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors prior as the dict :meth:`Prior.from_dict` reads (its header's strings decoded)."""
    tensors, metadata = read_safetensors(path, what="prior file", error=PriorFormatError)
    if metadata.get("format") != FORMAT_NAME:
        # Another kind of file (a model file, a foreign safetensors file): from_dict says what it is,
        # as it does for a torch file, and inspect can tell a model file by its format.
        return {"format": metadata.get("format", "no 'format' entry in its safetensors header")}
    try:
        version = int(metadata.get("version", ""))
        decoded = {key: json.loads(metadata[key]) for key in ("names", "shapes", "meta", "buffers")}
    except (KeyError, ValueError) as exc:
        raise PriorFormatError(f"prior file '{path}': its safetensors header lacks or garbles {exc}") from None
    if not isinstance(decoded["buffers"], list) or any(f"buffers/{b}" not in tensors for b in decoded["buffers"]):
        raise PriorFormatError(f"prior file '{path}': its header lists buffers that the file does not hold")
    missing = [k for k in ("mean", "variance", "factor") if k not in tensors]
    if missing:
        raise PriorFormatError(f"prior file '{path}': missing tensor(s) {', '.join(missing)}")
    return {"format": FORMAT_NAME, "version": version, "names": decoded["names"], "shapes": decoded["shapes"],
            "mean": tensors["mean"], "variance": tensors["variance"], "factor": tensors["factor"],
            "buffers": {b: tensors[f"buffers/{b}"] for b in decoded["buffers"]}, "meta": decoded["meta"],
            "digest": metadata.get("digest")}


def _check_buffers(buffers: Mapping[str, torch.Tensor]) -> None:
    """BatchNorm statistics must be finite, and variances non-negative."""
    for name, value in buffers.items():
        if not value.is_floating_point():
            continue
        if not bool(torch.isfinite(value).all()):
            raise PriorFormatError(f"buffer {name!r} contains NaN or Inf values")
        if name.endswith("running_var") and value.numel() and float(value.min()) < 0:
            raise PriorFormatError(f"buffer {name!r} is a variance but has a negative value {float(value.min()):.3g}")


# -- the official repository's four files: read, detect, convert --------------------------------------------
@dataclass(frozen=True)
class _OfficialFiles:
    prefix: str
    paths: dict[str, Path]
    params: list[tuple[str, torch.Tensor]]   # the model file's parameters, in order
    buffers: dict[str, torch.Tensor]         # its BatchNorm statistics
    mean: torch.Tensor                        # (D,) float32
    diag: torch.Tensor                        # (D,) float32, the SWAG diagonal
    covmat: torch.Tensor                      # (K, D) deviation rows


def _check_values(tensor: torch.Tensor, path: Path, *, non_negative: bool = False) -> None:
    """Finite values (and, for a variance, none below 0), or an error naming the file, the place and the value."""
    if not tensor.is_floating_point():
        raise PriorFormatError(f"'{path}' holds {tensor.dtype} values; expected floating point")
    flat = tensor.reshape(-1)
    bad = ~torch.isfinite(flat)
    if bad.any():
        index = int(bad.nonzero()[0])
        raise PriorFormatError(f"'{path}' holds non-finite values ({int(bad.sum())} of {flat.numel()}; the first, "
                               f"{float(flat[index])} (NaN or Inf), at flat index {index})")
    if non_negative and flat.numel() and float(flat.min()) < 0:
        index = int(flat.argmin())
        raise PriorFormatError(f"'{path}' holds negative variances ({int((flat < 0).sum())} of {flat.numel()}; the "
                               f"smallest, {float(flat[index]):g}, at flat index {index}); a variance must be >= 0")


def _read_official(prefix: str) -> _OfficialFiles:
    """The four files (``weights_only`` loads), checked against each other; errors name the file."""
    paths = {part: Path(f"{prefix}_{part}.pt") for part in ("model", "mean", "variance", "covmat")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise PriorFormatError(f"official prior with prefix '{prefix}' is incomplete: missing {', '.join(missing)} "
                               "(expected <prefix>_model.pt, _mean.pt, _variance.pt, _covmat.pt)")
    state = safe_torch_load(paths["model"], what="official model file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PriorFormatError(f"'{paths['model']}' is not a state_dict of tensors")
    # Strip wrapper prefixes before dropping the head, so ``module.fc.*`` is dropped too.
    state = {k: v for k, v in ((_strip_wrapper_prefix(k), v) for k, v in state.items()) if not k.startswith("fc.")}
    tensors = {}
    for part in ("mean", "variance", "covmat"):
        t = safe_torch_load(paths[part], what=f"official {part} file")
        if not isinstance(t, torch.Tensor):
            raise PriorFormatError(f"'{paths[part]}' must hold one tensor, found {type(t).__name__}")
        _check_values(t.detach(), paths[part], non_negative=part == "variance")
        tensors[part] = t.detach()
    mean = tensors["mean"].reshape(-1).to(torch.float32)
    diag = tensors["variance"].reshape(-1).to(torch.float32)
    covmat = tensors["covmat"]
    d = mean.numel()
    if covmat.dim() != 2:
        raise PriorFormatError(f"'{paths['covmat']}' must be 2-D (K x D), found shape {tuple(covmat.shape)}")
    if covmat.shape[1] != d and covmat.shape[0] == d:
        covmat = covmat.T
    if covmat.shape[1] != d:
        raise PriorFormatError(f"'{paths['covmat']}' has shape {tuple(covmat.shape)}, expected (K, {d}) to match the mean")
    if diag.numel() != d:
        raise PriorFormatError(f"'{paths['variance']}' has {diag.numel()} entries, the mean has {d}")
    if covmat.shape[0] < 2:
        raise PriorFormatError(f"'{paths['covmat']}' has K={covmat.shape[0]} rows; at least 2 deviation rows are needed")
    params = [(n, t) for n, t in state.items() if not n.endswith(_BN_BUFFER_SUFFIXES)]
    buffers = {n: t.clone() for n, t in state.items() if n.endswith(_BN_BUFFER_SUFFIXES)}
    total = sum(t.numel() for _, t in params)
    if total != d:
        raise PriorFormatError(f"the model file's parameters hold {total} values but the mean has {d}: "
                               f"'{paths['model']}' and '{paths['mean']}' do not belong together")
    return _OfficialFiles(prefix, paths, params, buffers, mean, diag, covmat)


def _detect_normalization(files: _OfficialFiles, asked: FactorNormalization) -> tuple[FactorNormalization, float]:
    """Whether the covariance rows are raw deviations or already divided by ``sqrt(K - 1)``.

    ``colsum(C**2) / diag`` is about ``K`` for raw rows and ``K / (K - 1)`` for normalised ones;
    the median over parameters is compared with the geometric midpoint of the two. Returns the
    normalisation to use (``asked`` unless it is ``"auto"``) and the measured ratio.
    """
    k = files.covmat.shape[0]
    ratio = float(((files.covmat.to(torch.float64) ** 2).sum(0) / files.diag.to(torch.float64).clamp_min(1e-30))
                  .median())
    if asked is not FactorNormalization.AUTO:
        return asked, ratio
    if k == 2:
        warnings.warn("with K=2 raw and normalised rows cannot be told apart; assuming raw deviations "
                      "(pass factor_normalization to choose)", stacklevel=3)
        return FactorNormalization.RAW, ratio
    threshold = math.sqrt(k * k / (k - 1))
    return (FactorNormalization.RAW if ratio > threshold else FactorNormalization.NORMALIZED), ratio


def _convert_official(cls: type, files: _OfficialFiles, asked: FactorNormalization, detected: FactorNormalization,
                      ratio: float, backbone: str) -> "Prior":
    """The prior in this library's convention, with what was found recorded in ``meta["import"]``."""
    k = files.covmat.shape[0]
    flat = torch.cat([t.reshape(-1).to(torch.float32) for _, t in files.params])
    max_diff = float((flat - files.mean).abs().max()) if flat.numel() else 0.0
    scale = float(files.mean.abs().max()) if flat.numel() else 0.0
    mean_matches = max_diff <= 1e-5 * max(scale, 1.0)
    if not mean_matches:
        warnings.warn(f"the mean in '{files.paths['mean']}' differs from the parameters in '{files.paths['model']}' "
                      f"(max |difference| {max_diff:.3g}); the mean file is used as the prior centre", stacklevel=3)
    divisor = math.sqrt(2 * (k - 1)) if detected is FactorNormalization.RAW else math.sqrt(2.0)
    factor = (files.covmat.to(torch.float32) / divisor).contiguous()
    meta = {
        "backbone": backbone, "backbone_kwargs": {}, "method": "swag", "source_task": "official-import",
        "n_snapshots": None, "rank": k, "library_version": __version__, "created": _now(),
        "preprocess": dict(IMAGENET_PREPROCESS),
        "import": {"prefix": files.prefix, "factor_normalization": detected.value,
                   "detected": asked is FactorNormalization.AUTO,
                   "row_sq_sum_over_variance_median": ratio, "mean_matches_model": mean_matches,
                   "mean_model_max_abs_diff": max_diff},
    }
    return cls(files.mean, 0.5 * files.diag, factor, names=[n for n, _ in files.params],
               shapes=[tuple(t.shape) for _, t in files.params], buffers=files.buffers, meta=meta)


# -- helpers ----------------------------------------------------------------------------------------
def _as_vector(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PriorFormatError(f"{name} must be a torch.Tensor, found {type(t).__name__}")
    if t.dim() != 1:
        raise PriorFormatError(f"{name} must be 1-D (D,), found shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise PriorFormatError(f"{name} must be floating point, found dtype {t.dtype}")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _as_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PriorFormatError(f"{name} must be a torch.Tensor, found {type(t).__name__}")
    return t


def _deep_copy_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_deep_copy_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _deep_copy_plain(v) for k, v in value.items()}
    return value



def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

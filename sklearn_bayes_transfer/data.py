"""Images in, tensors out: array adapters, image folders, segmentation pairs, transforms.

Everything here produces ``float32`` tensors laid out ``(N, C, H, W)`` (or ``(C, H, W)`` per
item), with pixel values in ``[0, 1]`` before normalisation. :class:`Preprocess` records what a
source model saw (size, channels, mean/std) so that the same pipeline is applied downstream.

Pixel value conventions
-----------------------
- ``uint8`` arrays and 8-bit images are divided by 255; 16-bit images (PIL modes ``I;16``, ``I``)
  by 65535. Other integer arrays (and ``bool``) are cast to float as they are, not rescaled.
  Float arrays are taken as they are.
- Grey to RGB repeats the channel; RGB to grey is the ITU-R 601-2 luminance
  ``0.299 R + 0.587 G + 0.114 B`` (what ``PIL.Image.convert("L")`` uses, here in float).
  A 4th (alpha) channel is dropped.
- Resizing is bilinear (``align_corners=False``), antialiased when an image shrinks; masks are
  resized with nearest-neighbour (``"nearest-exact"``) so class ids stay class ids.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ._io import atomic_write
from ._validation import Integral, Interval, as_numpy, check_params
from .exceptions import ConfigError, DataError

__all__ = [
    "load_image",
    "IMAGE_EXTENSIONS",
    "LUMA_WEIGHTS",
    "Preprocess",
    "as_image_tensor",
    "as_mask_tensor",
    "prepare_images",
    "convert_channels",
    "resize_images",
    "resize_masks",
    "ImageFolder",
    "load_image_folder",
    "load_segmentation_folder",
    "SegmentationDataset",
    "JointTransform",
    "TransformedDataset",
    "save_image",
    "save_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
)
#: ITU-R 601-2 luma weights (R, G, B), the ones ``PIL.Image.convert("L")`` uses.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

# JPEG compression blurs class ids at region borders, so masks must be stored losslessly.
_LOSSY_EXTENSIONS = (".jpg", ".jpeg")

SizeLike = int | tuple[int, int] | None


# ---------------------------------------------------------------------------------------------
# argument checks shared by the public functions
# ---------------------------------------------------------------------------------------------

def _check_size(value: Any, name: str, error: type[Exception] = ConfigError) -> tuple[int, int] | None:
    """``None``, an int (square) or ``(H, W)`` of positive ints -> ``(H, W)`` or ``None``."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if isinstance(value, torch.Size):
        value = tuple(value)
    if (
        not isinstance(value, (Sequence, np.ndarray))
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
        or not all(int(v) > 0 for v in value)
    ):
        raise error(f"{name} must be None, a positive int or a pair of positive ints (height, width); got {value!r}")
    return int(value[0]), int(value[1])


def _check_channels(value: Any, name: str = "channels", error: type[Exception] = ConfigError) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in (1, 3):
        raise error(f"{name} must be 1 (grey) or 3 (RGB); got {value!r}")
    return int(value)


def _check_floats(value: Any, name: str, length: int, *, positive: bool, error: type[Exception]) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise error(f"{name} must be a list of {length} numbers (one per channel); got {value!r}")
    try:
        floats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a list of {length} numbers (one per channel); got {value!r}") from None
    if len(floats) != length:
        raise error(f"{name} must have one value per channel ({length}); got {len(floats)}: {list(floats)}")
    if not all(math.isfinite(v) for v in floats):
        raise error(f"{name} must hold finite numbers; got {list(floats)}")
    if positive and not all(v > 0 for v in floats):
        raise error(f"{name} must hold positive numbers (they divide the pixels); got {list(floats)}")
    return floats


# ---------------------------------------------------------------------------------------------
# tensor operations
# ---------------------------------------------------------------------------------------------

def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert float images ``(N, C, H, W)`` to ``channels`` channels.

    1 -> 3 repeats the grey channel, 3 -> 1 takes the ITU-R 601-2 luminance, a 4th (alpha)
    channel is dropped. Other conversions raise :class:`DataError`.

    Examples
    --------
    >>> import torch
    >>> convert_channels(torch.ones(2, 1, 4, 4), 3).shape
    torch.Size([2, 3, 4, 4])
    """
    in_channels = images.shape[1]
    if in_channels == 4:
        images, in_channels = images[:, :3], 3
    if in_channels == channels:
        return images
    if in_channels == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if in_channels == 3 and channels == 1:
        r, g, b = LUMA_WEIGHTS
        return r * images[:, 0:1] + g * images[:, 1:2] + b * images[:, 2:3]
    raise DataError(
        f"cannot convert images with {images.shape[1]} channels to {channels}: only grey (1), "
        f"RGB (3) and RGBA (4, alpha dropped) inputs are converted"
    )


def resize_images(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear resize of float images ``(N, C, H, W)`` to ``size = (H, W)``.

    Antialiased when either side shrinks, so that downsizing averages instead of aliasing.
    Returns the input unchanged when ``size`` is ``None`` or already the images' size.

    Examples
    --------
    >>> import torch
    >>> resize_images(torch.rand(1, 1, 9, 7), (5, 3)).shape
    torch.Size([1, 1, 5, 3])
    """
    if size is None:
        return images
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    shrink = size[0] < height or size[1] < width
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def resize_masks(masks: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Nearest-neighbour resize of integer masks ``(N, H, W)``; class ids are never blended.

    Examples
    --------
    >>> import torch
    >>> resize_masks(torch.zeros(1, 4, 4, dtype=torch.int64), (8, 8)).shape
    torch.Size([1, 8, 8])
    """
    if size is None or tuple(masks.shape[-2:]) == tuple(size):
        return masks
    # float64 holds every int32 class id exactly; "nearest-exact" matches PIL's pixel centres
    resized = F.interpolate(masks[:, None].to(torch.float64), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].to(masks.dtype)


# ---------------------------------------------------------------------------------------------
# arrays -> tensors
# ---------------------------------------------------------------------------------------------

def _describe(X: Any) -> str:
    shape = getattr(X, "shape", None)
    dtype = getattr(X, "dtype", None)
    if shape is not None:
        return f"shape {tuple(shape)} and dtype {dtype}"
    return f"type {type(X).__name__}"


def _numpy_to_torch(array: np.ndarray) -> tuple[torch.Tensor, bool]:
    """numpy -> torch without copying when possible; returns (tensor, shares read-only memory)."""
    kind = array.dtype.kind
    if kind not in "biuf":
        raise DataError(
            f"images must hold numbers (uint8, integers, bool or floats); got an array of "
            f"{_describe(array)}"
        )
    if kind == "u" and array.dtype.itemsize > 1:
        # torch has few kernels for uint16/32/64; the values are cast to float anyway
        array = array.astype(np.float32)
    elif kind == "f" and array.dtype not in (np.float16, np.float32, np.float64):
        array = array.astype(np.float64)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    read_only = not array.flags.writeable
    with warnings.catch_warnings():
        # read-only arrays are copied later if the result would share their memory
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array), read_only


def _stack_sequence(items: Sequence) -> tuple[torch.Tensor, bool]:
    if len(items) == 0:
        raise DataError("got an empty list of images; pass at least one image")
    if all(isinstance(item, torch.Tensor) for item in items):
        shapes = [tuple(item.shape) for item in items]
    else:
        items = [item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
                 for item in items]
        shapes = [item.shape for item in items]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise DataError(
                f"images in a list must all have the same shape to be stacked: X[0] has shape "
                f"{shapes[0]} but X[{i}] has shape {shape}; resize them first (or load a folder "
                f"with image_size=... / --image-size)"
            )
    if isinstance(items[0], torch.Tensor):
        return torch.stack([item.detach() for item in items]), False
    return _numpy_to_torch(np.stack(items))


def _as_nchw(X: Any) -> tuple[torch.Tensor, bool]:
    """Any supported input -> (N, C, H, W) tensor of the input's dtype (a view where possible)."""
    if isinstance(X, torch.Tensor):
        tensor, read_only = X.detach(), False
        if tensor.is_complex():
            raise DataError(f"images must hold real numbers; got a tensor of {_describe(X)}")
    elif isinstance(X, np.ndarray):
        tensor, read_only = _numpy_to_torch(X)
    elif isinstance(X, (list, tuple)):
        tensor, read_only = _stack_sequence(X)
    else:
        raise DataError(
            f"images must be a numpy array, a torch tensor or a list of arrays; got {type(X).__name__}"
        )
    expected = "(N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3, 4}"
    if tensor.ndim == 2:
        side = math.isqrt(tensor.shape[1])
        hint = (f"; for square images use X.reshape(-1, {side}, {side})"
                if tensor.shape[1] > 0 and side * side == tensor.shape[1] else "")
        raise DataError(f"images must be {expected}; got a 2-D array of shape {tuple(tensor.shape)} "
                        f"(flattened images?){hint}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    elif tensor.ndim == 4:
        first, last = tensor.shape[1], tensor.shape[3]
        if first in (1, 3):
            pass
        elif last in (1, 3):
            tensor = tensor.permute(0, 3, 1, 2)
        elif first == 4:
            pass
        elif last == 4:
            tensor = tensor.permute(0, 3, 1, 2)
        else:
            raise DataError(
                f"images must be {expected}; got shape {tuple(tensor.shape)}, where neither dimension 1 "
                f"nor dimension 3 is a channel count of 1, 3 or 4"
            )
    else:
        raise DataError(f"images must be {expected}; got {tensor.ndim}-D input of shape {tuple(tensor.shape)}")
    if tensor.shape[2] == 0 or tensor.shape[3] == 0:
        raise DataError(f"images must have a positive height and width; got shape {tuple(tensor.shape)}")
    return tensor, read_only


def _to_float(tensor: torch.Tensor) -> torch.Tensor:
    """uint8 -> [0, 1]; other numbers cast to float32 as they are; non-finite values refused."""
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).div_(255.0)
    if tensor.is_floating_point():
        out = tensor.to(torch.float32)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise DataError(
                f"images hold {bad} non-finite value(s) (NaN or inf, or float64 values beyond the "
                f"float32 range); clean or clip them first"
            )
        return out
    if tensor.is_complex():
        raise DataError(f"images must hold real numbers; got dtype {tensor.dtype}")
    return tensor.to(torch.float32)


def as_image_tensor(X: Any) -> torch.Tensor:
    """Turn image data into a contiguous ``float32`` tensor ``(N, C, H, W)``.

    Parameters
    ----------
    X : numpy array, torch tensor or list of arrays/tensors of one shape
        ``(N, H, W)`` (grey), ``(N, C, H, W)`` with ``C`` in {1, 3, 4}, or channels-last
        ``(N, H, W, C)`` (recognised when ``C`` is 1 or 3 and dimension 1 is not; or ``C`` is 4
        and dimension 1 is none of 1, 3, 4). ``uint8`` is divided by 255; other integer and bool
        data is cast to float without rescaling; floats are cast to ``float32`` as they are.
        A tensor keeps its device.

    Returns
    -------
    torch.Tensor
        Contiguous ``float32`` tensor ``(N, C, H, W)``; it may share memory with ``X`` when ``X``
        is already a writable, contiguous ``float32`` array in that layout.

    Raises
    ------
    DataError
        For other shapes, dtypes (strings, objects, complex), ragged lists, NaN or inf.

    Examples
    --------
    >>> import numpy as np
    >>> x = as_image_tensor(np.full((2, 8, 8), 255, dtype=np.uint8))
    >>> tuple(x.shape), float(x.max())
    ((2, 1, 8, 8), 1.0)
    """
    raw, read_only = _as_nchw(X)
    out = _to_float(raw).contiguous()
    if read_only and out.data_ptr() == raw.data_ptr():
        out = out.clone()
    return out


def as_mask_tensor(masks: Any) -> torch.Tensor:
    """Turn segmentation masks into an ``int64`` tensor ``(N, H, W)`` of class ids.

    Accepts ``(N, H, W)`` or ``(N, 1, H, W)`` integer or bool data; float data only when every
    value is a whole number.

    Examples
    --------
    >>> import numpy as np
    >>> as_mask_tensor(np.zeros((2, 1, 4, 4), dtype=np.uint8)).dtype
    torch.int64
    """
    if isinstance(masks, torch.Tensor):
        tensor = masks.detach()
    elif isinstance(masks, (np.ndarray, list, tuple)):
        array = np.asarray(masks)
        if array.dtype.kind not in "biuf":
            raise DataError(f"masks must hold integer class ids; got an array of {_describe(array)}")
        if array.dtype.kind == "u" and array.dtype.itemsize > 1:
            array = array.astype(np.int64)
        tensor, _ = _numpy_to_torch(array)
    else:
        raise DataError(f"masks must be a numpy array or a torch tensor; got {type(masks).__name__}")
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 3:
        raise DataError(f"masks must have shape (N, H, W) or (N, 1, H, W); got {tuple(tensor.shape)}")
    if tensor.is_floating_point():
        finite = torch.isfinite(tensor).all()
        if not bool(finite) or not bool((tensor == tensor.round()).all()):
            raise DataError(
                f"masks must hold integer class ids; got dtype {tensor.dtype} with non-integer values"
            )
    elif tensor.is_complex():
        raise DataError(f"masks must hold integer class ids; got dtype {tensor.dtype}")
    return tensor.to(torch.int64).contiguous()


# ---------------------------------------------------------------------------------------------
# Preprocess
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """What the source model saw: image size, channel count and per-channel mean/std.

    It travels in a prior's ``meta["preprocess"]`` (see :meth:`to_meta`) so that downstream data
    goes through the same pipeline. Calling it converts channels, resizes and normalises.

    Parameters
    ----------
    image_size : (int, int), int or None
        ``(H, W)`` to resize to; an int means a square; ``None`` keeps the input size.
    channels : {1, 3}
        Channel count the model expects; grey and RGB inputs are converted to it.
    mean, std : sequence of float
        Per-channel normalisation, ``len == channels``, ``std > 0``.

    Examples
    --------
    >>> import torch
    >>> p = Preprocess(image_size=(4, 4), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    >>> p(torch.full((2, 1, 8, 8), 0.5)).shape
    torch.Size([2, 3, 4, 4])
    >>> Preprocess.from_meta(p.to_meta()) == p
    True
    """

    image_size: tuple[int, int] | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        channels = _check_channels(self.channels)
        if channels is None:
            raise ConfigError("channels must be 1 (grey) or 3 (RGB); got None")
        object.__setattr__(self, "image_size", _check_size(self.image_size, "image_size"))
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "mean", _check_floats(self.mean, "mean", channels, positive=False, error=ConfigError))
        object.__setattr__(self, "std", _check_floats(self.std, "std", channels, positive=True, error=ConfigError))

    def to_meta(self) -> dict:
        """Plain-Python form for a prior's ``meta["preprocess"]`` (safe for ``weights_only`` loads)."""
        return {
            "image_size": None if self.image_size is None else [int(v) for v in self.image_size],
            "channels": int(self.channels),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_meta(cls, meta: Mapping, *, error: type[Exception] = ConfigError) -> "Preprocess":
        """Rebuild from :meth:`to_meta` output, validating every key.

        ``error`` is the exception class raised for bad metadata (a prior loader may pass
        ``PriorFormatError``); the message names the key at fault.
        """
        if not isinstance(meta, Mapping):
            raise error(f"preprocess metadata must be a mapping with keys image_size, channels, mean, "
                        f"std; got {type(meta).__name__}")
        for key in ("image_size", "channels", "mean", "std"):
            if key not in meta:
                raise error(f"preprocess metadata lacks the key '{key}' (expected image_size, channels, "
                            f"mean and std)")
        try:
            channels = _check_channels(meta["channels"], "preprocess key 'channels'", error)
            if channels is None:
                raise error("preprocess key 'channels' must be 1 or 3; got None")
            return cls(
                image_size=_check_size(meta["image_size"], "preprocess key 'image_size'", error),
                channels=channels,
                mean=_check_floats(meta["mean"], "preprocess key 'mean'", channels, positive=False, error=error),
                std=_check_floats(meta["std"], "preprocess key 'std'", channels, positive=True, error=error),
            )
        except ConfigError as exc:
            if error is ConfigError:
                raise
            raise error(str(exc)) from None

    @classmethod
    def fit(cls, X: Any, *, image_size: SizeLike = None, channels: int | None = None,
            batch_size: int = 1024) -> "Preprocess":
        """Per-channel mean and (population) std of ``as_image_tensor(X)``.

        The statistics are those of the images after channel conversion and resizing to
        ``image_size`` (when given), accumulated in float64 chunk by chunk; std is floored at
        1e-8 so a constant channel does not divide by zero. ``channels`` defaults to the input's
        (RGBA counts as RGB); ``image_size`` defaults to ``None`` (no resizing recorded).

        Examples
        --------
        >>> import numpy as np
        >>> p = Preprocess.fit(np.random.default_rng(0).random((10, 3, 4, 4)))
        >>> p.channels, len(p.mean)
        (3, 3)
        """
        size = _check_size(image_size, "image_size")
        raw, _ = _as_nchw(X)
        if raw.shape[0] == 0:
            raise DataError("cannot fit preprocessing statistics on zero images")
        channels = _check_channels(channels)
        if channels is None:
            channels = 1 if raw.shape[1] == 1 else 3
        batch_size = _check_batch_size(batch_size)
        count = 0
        mean = torch.zeros(channels, dtype=torch.float64)
        m2 = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, raw.shape[0], batch_size):
            chunk = _geometry(_to_float(raw[start:start + batch_size]), channels, size).double().cpu()
            n_chunk = chunk.numel() // channels
            chunk_mean = chunk.mean(dim=(0, 2, 3))
            chunk_m2 = ((chunk - chunk_mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
            # Chan et al.'s pairwise merge: stable where sum(x^2) - n mean^2 would cancel
            total = count + n_chunk
            delta = chunk_mean - mean
            mean = mean + delta * (n_chunk / total)
            m2 = m2 + chunk_m2 + delta**2 * (count * n_chunk / total)
            count = total
        std = torch.sqrt(m2 / count).clamp_min(1e-8)
        return cls(image_size=size, channels=channels, mean=tuple(mean.tolist()), std=tuple(std.tolist()))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Channel conversion, resizing, then ``(x - mean) / std``; returns ``float32``.

        ``images`` is ``(N, C, H, W)`` or a single ``(C, H, W)`` image; ``uint8`` input is
        divided by 255 first.
        """
        if not isinstance(images, torch.Tensor):
            raise DataError(
                f"Preprocess expects a torch tensor (N, C, H, W) or (C, H, W); got "
                f"{type(images).__name__}; use prepare_images(X, preprocess) for arrays"
            )
        single = images.ndim == 3
        if single:
            images = images.unsqueeze(0)
        elif images.ndim != 4:
            raise DataError(f"Preprocess expects images (N, C, H, W) or (C, H, W); got shape {tuple(images.shape)}")
        x = _geometry(_to_float(images), self.channels, self.image_size)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x[0] if single else x


def _geometry(images: torch.Tensor, channels: int | None, size: tuple[int, int] | None) -> torch.Tensor:
    """Channel conversion and resizing, cheapest order first (the two commute: both are linear)."""
    if channels is None:
        return resize_images(images, size)
    if channels < images.shape[1]:
        return resize_images(convert_channels(images, channels), size)
    return convert_channels(resize_images(images, size), channels)


def _check_batch_size(batch_size: Any) -> int:
    check_params({"batch_size": batch_size}, {"batch_size": [Interval(Integral, 1, None)]})
    return int(batch_size)


def prepare_images(X: Any, preprocess: Preprocess | None, *, batch_size: int = 1024) -> torch.Tensor:
    """:func:`as_image_tensor` followed by ``preprocess``, chunk by chunk to bound memory.

    Only one float copy of the *output* is allocated: e.g. 60,000 ``uint8`` 28x28 images become
    3x32x32 float32 without ever holding all of them as 28x28 floats too.

    Examples
    --------
    >>> import numpy as np
    >>> p = Preprocess(image_size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> prepare_images(np.zeros((5, 8, 8), dtype=np.uint8), p, batch_size=2).shape
    torch.Size([5, 3, 16, 16])
    """
    if preprocess is None:
        return as_image_tensor(X)
    if not isinstance(preprocess, Preprocess):
        raise ConfigError(f"preprocess must be a Preprocess or None; got {type(preprocess).__name__}")
    batch_size = _check_batch_size(batch_size)
    raw, _ = _as_nchw(X)
    n = raw.shape[0]
    height, width = preprocess.image_size or tuple(raw.shape[2:])
    out = torch.empty((n, preprocess.channels, height, width), dtype=torch.float32, device=raw.device)
    for start in range(0, n, batch_size):
        out[start:start + batch_size] = preprocess(raw[start:start + batch_size])
    return out


# ---------------------------------------------------------------------------------------------
# reading image files
# ---------------------------------------------------------------------------------------------

def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    out = tuple(("" if e.startswith(".") else ".") + e.lower() for e in extensions)
    if not out:
        raise ConfigError("extensions must name at least one file extension, e.g. ('.png',)")
    return out


def _find_files(directory: Path, extensions: tuple[str, ...], seen: dict[str, Path] | None = None) -> list[Path]:
    """Files below ``directory`` with one of ``extensions`` (any case), sorted; hidden ones skipped.

    Symbolic links to folders are followed, each real folder at most once (``seen``, shared across
    the calls of one scan): a link that loops back to a folder containing it, or leads to a folder
    already read, raises :class:`DataError` naming it, where following it would read images twice
    or forever.
    """
    seen = {} if seen is None else seen
    found: list[Path] = []
    stack = [directory]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            if real == os.path.commonpath([real, os.path.realpath(folder.parent)]):
                raise DataError(f"folder '{folder}' is a symbolic link to '{real}', which contains it: following it "
                                "would loop forever; remove the link")
            raise DataError(f"folder '{folder}' leads to '{real}', already read as '{seen[real]}': its images would "
                            "be read twice (with another label); remove the link")
        seen[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"cannot read folder '{folder}': {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if _is_dir(entry, path):
                stack.append(path)
            elif entry.name.lower().endswith(extensions):
                if entry.is_symlink() and not path.exists():
                    raise DataError(f"image '{path}' is a symbolic link to '{os.readlink(path)}', which does not "
                                    "exist (or loops); remove it")
                found.append(path)
    return sorted(found)


def _is_dir(entry: os.DirEntry, path: Path) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError as exc:  # a link that loops on itself
        raise DataError(f"'{path}' cannot be followed: {exc.strerror or exc}") from None


def _open(path: Path) -> Image.Image:
    image = None
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise DataError(
            f"'{path}' is not an image file Pillow can read; remove it or move it out of the folder"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"image '{path}' is refused: {exc}; resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if it "
                        "is genuine") from None
    except (OSError, ValueError, SyntaxError) as exc:
        if image is not None:
            image.close()
        raise DataError(f"cannot read image '{path}' (truncated or corrupt?): {exc}") from None
    return image


def _read_raw(path: Path) -> np.ndarray:
    """Decode one image to its natural channels, ``(C, H, W)`` in the file's integer/float type.

    Grey modes give 1 channel; colour modes give 3 (alpha dropped); palette images give 1 when
    every colour they use is grey.
    """
    with _open(path) as image:
        mode = image.mode
        if mode in ("1", "L", "LA", "La"):
            array = np.asarray(image.convert("L"))
        elif mode.startswith("I;16"):
            array = np.asarray(image).astype(np.uint16)
        elif mode == "I":
            array = np.asarray(image).astype(np.int32)
        elif mode == "F":
            array = np.asarray(image).astype(np.float32)
        elif mode == "RGB":
            array = np.asarray(image)
        elif mode in ("P", "PA"):
            array = np.asarray(image.convert("RGB"))
            if (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
                array = array[..., 0]
        else:  # RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV
            array = np.asarray(image.convert("RGB"))
    if array.ndim == 2:
        return array[None]
    return array.transpose(2, 0, 1)


def _raw_to_tensor(array: np.ndarray) -> torch.Tensor:
    """File values -> float32 in [0, 1]: 8-bit / 255, 16-bit (and 32-bit ``I``) / 65535."""
    # astype copies: arrays that PIL hands out may be read-only
    tensor = torch.from_numpy(array.astype(np.float32))
    if array.dtype == np.uint8:
        return tensor.div_(255.0)
    if array.dtype in (np.uint16, np.int32):
        # PIL's "I" mode is how older Pillow opens 16-bit PNGs: treat it as 16-bit, clipped
        return tensor.div_(65535.0).clamp_(0.0, 1.0)
    return tensor


def load_image(path: str | os.PathLike, channels: int | None = None,
               size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as a float32 ``(C, H, W)`` tensor in [0, 1], converted to ``channels`` and
    resized to ``size`` when given; a file that is not an image raises :class:`DataError` naming it."""
    image = _raw_to_tensor(_read_raw(Path(path)))[None]
    return _geometry(image, channels, size)[0]


def _hw(array: np.ndarray) -> str:
    return f"{array.shape[-2]}x{array.shape[-1]}"


def _stack_raw(raws: list[np.ndarray], paths: list[Path], size: tuple[int, int] | None,
               channels: int | None) -> np.ndarray:
    """Decoded images -> one float32 array (N, C, H, W); colour wins when grey and RGB mix."""
    if size is None:
        for raw, path in zip(raws, paths):
            if raw.shape[-2:] != raws[0].shape[-2:]:
                raise DataError(
                    f"images have different sizes: '{paths[0]}' is {_hw(raws[0])} and '{path}' is "
                    f"{_hw(raw)} (height x width); pass image_size=(H, W) (--image-size) to resize "
                    f"them all"
                )
    if channels is None:
        channels = 3 if any(raw.shape[0] == 3 for raw in raws) else 1
    height, width = size or raws[0].shape[-2:]
    out = np.empty((len(raws), channels, height, width), dtype=np.float32)
    for i, raw in enumerate(raws):
        out[i] = _geometry(_raw_to_tensor(raw)[None], channels, size)[0].numpy()
    return out


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------

def _check_dir(root: Any, what: str) -> Path:
    path = Path(root)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(f"{what} '{path}' is a symbolic link to '{os.readlink(path)}', which does not exist") \
                from None
        raise DataError(f"{what} '{path}' does not exist") from None
    except OSError as exc:  # ELOOP: a link that loops
        raise DataError(f"{what} '{path}' cannot be opened: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise DataError(f"{what} '{path}' is not a directory")
    return path


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images, loaded lazily one item at a time.

    With ``labeled=True`` the layout is torchvision's: one subfolder per class
    (``root/<class>/**/<image>``), classes sorted by name. With ``labeled=False`` every image
    below ``root`` is used and targets are ``-1``. Hidden files and folders are skipped.

    Parameters
    ----------
    root : path
    preprocess : Preprocess, optional
        Applied to each image after loading.
    labeled : bool, default True
    image_size : int or (H, W), optional
        Resize every image on load (bilinear, antialiased when shrinking).
    channels : {1, 3}, optional
        Convert every image on load. Without it (and without ``preprocess``) each image keeps
        its own channel count, so a folder mixing grey and RGB files cannot be batched: pass
        ``channels``.
    extensions : sequence of str
        File name endings that count as images (case-insensitive).

    Attributes
    ----------
    classes : list of str
        Class names (subfolder names), sorted; empty when unlabeled.
    paths : list of pathlib.Path
    targets : numpy.ndarray of int64
        Index into ``classes`` for each path, ``-1`` when unlabeled.

    Examples
    --------
    >>> ds = ImageFolder("photos", channels=3, image_size=32)       # doctest: +SKIP
    >>> image, target = ds[0]                                       # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, *, preprocess: Preprocess | None = None,
                 labeled: bool = True, image_size: SizeLike = None, channels: int | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        if preprocess is not None and not isinstance(preprocess, Preprocess):
            raise ConfigError(f"preprocess must be a Preprocess or None; got {type(preprocess).__name__}")
        self.root = _check_dir(root, "image folder")
        self.preprocess = preprocess
        self.labeled = bool(labeled)
        self.image_size = _check_size(image_size, "image_size")
        self.channels = _check_channels(channels)
        self.extensions = _normalise_extensions(extensions)
        if self.labeled:
            self.classes, self.paths, targets = self._scan_labeled()
        else:
            self.classes, self.paths = [], self._scan_unlabeled()
            targets = [-1] * len(self.paths)
        self.targets = np.asarray(targets, dtype=np.int64)

    def _looked_for(self) -> str:
        return f"looked for files ending in {', '.join(self.extensions)}"

    def _scan_unlabeled(self) -> list[Path]:
        paths = _find_files(self.root, self.extensions)
        if not paths:
            raise DataError(f"no images found in '{self.root}' ({self._looked_for()})")
        return paths

    def _scan_labeled(self) -> tuple[list[str], list[Path], list[int]]:
        entries = sorted(self.root.iterdir())
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        loose = [e for e in entries if e.is_file() and e.name.lower().endswith(self.extensions)
                 and not e.name.startswith(".")]
        if not class_dirs:
            if loose:
                raise DataError(
                    f"'{self.root}' holds {len(loose)} images but no class subfolders: a labelled folder "
                    f"needs one subfolder per class (root/<class>/<image>, as torchvision's ImageFolder); "
                    f"pass labeled=False (--unlabeled) to use the images without labels"
                )
            raise DataError(f"no images found in '{self.root}' ({self._looked_for()})")
        classes, paths, targets = [], [], []
        seen: dict[str, Path] = {os.path.realpath(self.root): self.root}
        for index, class_dir in enumerate(class_dirs):
            found = _find_files(class_dir, self.extensions, seen)
            if not found:
                raise DataError(
                    f"class folder '{class_dir}' holds no images ({self._looked_for()}); add images "
                    f"or remove the folder"
                )
            classes.append(class_dir.name)
            paths.extend(found)
            targets.extend([index] * len(found))
        if loose:
            warnings.warn(
                f"{len(loose)} images directly in '{self.root}' are ignored: with labeled=True only "
                f"images inside class subfolders are used",
                UserWarning,
                stacklevel=3,
            )
        return classes, paths, targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.paths[index], self.channels, self.image_size)
        if self.preprocess is not None:
            image = self.preprocess(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.labeled else "unlabeled"
        return f"ImageFolder('{self.root}', {len(self)} images, {kind})"


def load_image_folder(root: str | os.PathLike, *, labeled: bool = True, image_size: SizeLike = None,
                      channels: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a whole image folder into memory.

    Every file is decoded here, so a file that is not an image is reported now, by name.
    Images of different sizes need ``image_size``; when grey and colour images mix (and
    ``channels`` is not given) all are converted to RGB.

    Parameters
    ----------
    root : path
        ``root/<class>/<image>`` when ``labeled``, else any images below ``root``.
    labeled : bool, default True
    image_size : int or (H, W), optional
    channels : {1, 3}, optional

    Returns
    -------
    X : numpy.ndarray of float32, shape (N, C, H, W), values in [0, 1]
    y : numpy.ndarray of str (class names), or None when ``labeled=False``

    Examples
    --------
    >>> X, y = load_image_folder("train", image_size=(32, 32))      # doctest: +SKIP
    """
    folder = ImageFolder(root, labeled=labeled, image_size=image_size, channels=channels)
    raws = [_read_raw(path) for path in folder.paths]
    X = _stack_raw(raws, folder.paths, folder.image_size, folder.channels)
    if not labeled:
        return X, None
    return X, np.asarray(folder.classes, dtype=str)[folder.targets]


def _index_by_stem(directory: Path, what: str) -> dict[str, Path]:
    """Relative path without suffix -> file; two files sharing a stem are ambiguous."""
    index: dict[str, Path] = {}
    for path in _find_files(directory, IMAGE_EXTENSIONS):
        key = path.relative_to(directory).with_suffix("").as_posix()
        if key in index:
            raise DataError(
                f"two {what} files share the name '{key}': '{index[key]}' and '{path}'; keep one"
            )
        index[key] = path
    return index


def _read_mask(path: Path) -> np.ndarray:
    """Decode a mask to int64 class ids (H, W)."""
    if path.suffix.lower() in _LOSSY_EXTENSIONS:
        raise DataError(
            f"mask '{path}' is a JPEG: lossy compression changes class ids at region borders; "
            f"store masks as PNG"
        )
    with _open(path) as image:
        mode = image.mode
        array = np.asarray(image)
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgb = array[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise DataError(
                f"mask '{path}' is a colour ({mode}) image whose channels differ, but masks must hold "
                f"one class id per pixel; convert colours to class ids (a mode L, P or I PNG, as in "
                f"Pascal VOC's palette masks)"
            )
        array = rgb[..., 0]
    elif mode in ("LA", "La", "PA"):
        array = array[..., 0]
    elif mode == "F":
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise DataError(f"mask '{path}' holds non-integer float values; masks must hold class ids")
    elif mode not in ("1", "L", "P", "I") and not mode.startswith("I;16"):
        raise DataError(f"mask '{path}' has image mode {mode}; expected a grey (L), palette (P) or "
                        f"integer (I) PNG of class ids")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise DataError(f"mask '{path}' holds the value {int(array.min())}; class ids must be >= 0")
    return array


def load_segmentation_folder(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, *,
                             image_size: SizeLike = None, channels: int | None = None,
                             max_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load images and their masks, paired by file name without extension.

    ``images_dir/a.jpg`` pairs with ``masks_dir/a.png`` (sub-folders pair by relative path).
    Masks hold class ids per pixel: PNGs of mode L, P (palette indices are the ids, as in
    Pascal VOC) or I; an RGB mask is accepted only when its channels are equal.

    Parameters
    ----------
    images_dir, masks_dir : path
    image_size : int or (H, W), optional
        Resize images (bilinear) and masks (nearest) to it; required when image sizes differ.
    channels : {1, 3}, optional
        Defaults to RGB when any image is colour, else grey.
    max_id : int, optional
        The largest class id allowed (e.g. 255 for masks that must be written back as 8-bit PNGs);
        a mask holding more raises :class:`DataError` naming it.

    Returns
    -------
    X : numpy.ndarray of float32, shape (N, C, H, W), values in [0, 1]
    M : numpy.ndarray of int64, shape (N, H, W)

    Examples
    --------
    >>> X, M = load_segmentation_folder("data/images", "data/masks")    # doctest: +SKIP
    """
    images_dir = _check_dir(images_dir, "images folder")
    masks_dir = _check_dir(masks_dir, "masks folder")
    size = _check_size(image_size, "image_size")
    channels = _check_channels(channels)
    images = _index_by_stem(images_dir, "image")
    masks = _index_by_stem(masks_dir, "mask")
    if not images:
        raise DataError(f"no images found in '{images_dir}' (looked for files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    unmatched = sorted(set(images) - set(masks))
    if unmatched:
        raise DataError(
            f"image '{images[unmatched[0]]}' has no mask in '{masks_dir}' (expected a file named "
            f"'{unmatched[0]}.png'); {len(unmatched)} image(s) lack masks: {', '.join(unmatched[:5])}"
            + (" ..." if len(unmatched) > 5 else "")
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(
            f"mask '{masks[orphans[0]]}' has no image in '{images_dir}'; {len(orphans)} mask(s) lack "
            f"images: {', '.join(orphans[:5])}" + (" ..." if len(orphans) > 5 else "")
        )
    keys = sorted(images)
    raws, mask_arrays = [], []
    for key in keys:
        raw, mask = _read_raw(images[key]), _read_mask(masks[key])
        if max_id is not None and mask.size and mask.max() > max_id:
            raise DataError(f"mask '{masks[key]}' holds the value {int(mask.max())}; class ids (and the ignored "
                            f"value) must be at most {max_id} here")
        if raw.shape[-2:] != mask.shape:
            raise DataError(
                f"image '{images[key]}' is {_hw(raw)} but its mask '{masks[key]}' is {_hw(mask)} "
                f"(height x width); a mask must have its image's size"
            )
        raws.append(raw)
        mask_arrays.append(mask)
    X = _stack_raw(raws, [images[k] for k in keys], size, channels)
    if size is None:
        M = np.stack(mask_arrays)
    else:
        M = np.stack([resize_masks(torch.from_numpy(m)[None], size)[0].numpy() for m in mask_arrays])
    return X, M


# ---------------------------------------------------------------------------------------------
# datasets and transforms
# ---------------------------------------------------------------------------------------------

class JointTransform:
    """Random crop and horizontal flip applied identically to an image and its mask.

    When the crop is larger than the image, the image is padded with 0 and the mask with
    ``ignore_index`` at the bottom and right first, so padded pixels never count in the loss.

    Parameters
    ----------
    crop_size : int or (H, W), optional
        Output size; ``None`` keeps the input size (flip only).
    hflip : bool, default True
        Flip both left-right with probability 0.5.
    ignore_index : int, default 255
        Mask value for padding (the loss's ``ignore_index``).
    generator : torch.Generator, optional
        Source of randomness, for reproducible augmentation; the global generator if ``None``.
        DataLoader workers each get a copy of it, so give each worker its own seed if they
        should differ.

    Examples
    --------
    >>> import torch
    >>> t = JointTransform(crop_size=4, generator=torch.Generator().manual_seed(0))
    >>> image, mask = t(torch.rand(3, 6, 6), torch.zeros(6, 6, dtype=torch.int64))
    >>> tuple(image.shape), tuple(mask.shape)
    ((3, 4, 4), (4, 4))
    """

    def __init__(self, crop_size: SizeLike = None, hflip: bool = True, ignore_index: int = 255,
                 generator: torch.Generator | None = None) -> None:
        self.crop_size = _check_size(crop_size, "crop_size")
        self.hflip = bool(hflip)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise ConfigError(f"ignore_index must be an int; got {ignore_index!r}")
        self.ignore_index = int(ignore_index)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.generator = generator

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.generator).item())

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 3 or mask.ndim != 2 or tuple(image.shape[1:]) != tuple(mask.shape):
            raise DataError(
                f"JointTransform expects an image (C, H, W) and a mask (H, W) of the same size; got "
                f"shapes {tuple(image.shape)} and {tuple(mask.shape)}"
            )
        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
            pad_h, pad_w = max(crop_h - image.shape[1], 0), max(crop_w - image.shape[2], 0)
            if pad_h or pad_w:
                image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
                mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
            top = self._randint(image.shape[1] - crop_h + 1)
            left = self._randint(image.shape[2] - crop_w + 1)
            image = image[:, top:top + crop_h, left:left + crop_w]
            mask = mask[top:top + crop_h, left:left + crop_w]
        if self.hflip and self._randint(2) == 1:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()

    def __repr__(self) -> str:
        return (f"JointTransform(crop_size={self.crop_size}, hflip={self.hflip}, "
                f"ignore_index={self.ignore_index})")


class SegmentationDataset(torch.utils.data.Dataset):
    """Arrays of images and masks as ``(image, mask)`` pairs, with an optional joint transform.

    Parameters
    ----------
    X : array-like, (N, C, H, W) or any layout :func:`as_image_tensor` accepts
    masks : array-like of int, (N, H, W)
    transform : JointTransform or callable ``(image, mask) -> (image, mask)``, optional

    Examples
    --------
    >>> import numpy as np
    >>> ds = SegmentationDataset(np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 4, 4), np.int64))
    >>> [tuple(t.shape) for t in ds[0]]
    [(1, 4, 4), (4, 4)]
    """

    def __init__(self, X: Any, masks: Any, *, transform: JointTransform | None = None) -> None:
        self.X = as_image_tensor(X)
        self.masks = as_mask_tensor(masks)
        if self.X.shape[0] != self.masks.shape[0]:
            raise DataError(f"X holds {self.X.shape[0]} images but masks holds {self.masks.shape[0]} masks")
        if tuple(self.X.shape[2:]) != tuple(self.masks.shape[1:]):
            raise DataError(
                f"images are {self.X.shape[2]}x{self.X.shape[3]} but masks are "
                f"{self.masks.shape[1]}x{self.masks.shape[2]} (height x width); they must match"
            )
        if transform is not None and not callable(transform):
            raise ConfigError(f"transform must be callable (image, mask) -> (image, mask); got {transform!r}")
        self.transform = transform

    def __len__(self) -> int:
        return self.X.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.X[index], self.masks[index]
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


class TransformedDataset(torch.utils.data.Dataset):
    """Wrap a dataset of ``(x, y)`` items and apply ``preprocess`` to each ``x``.

    ``x`` may be a tensor or array ``(C, H, W)`` (``uint8`` is scaled to [0, 1]); it is returned
    as ``float32`` whether or not ``preprocess`` is given.

    Examples
    --------
    >>> import torch
    >>> base = [(torch.ones(1, 8, 8), 0)]
    >>> p = Preprocess(image_size=None, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    >>> TransformedDataset(base, p)[0][0].shape
    torch.Size([3, 8, 8])
    """

    def __init__(self, dataset: Any, preprocess: Preprocess | None) -> None:
        if preprocess is not None and not isinstance(preprocess, Preprocess):
            raise ConfigError(f"preprocess must be a Preprocess or None; got {type(preprocess).__name__}")
        self.dataset = dataset
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"TransformedDataset expects items (x, y); item {index} is {type(item).__name__}")
        x, y = item
        if isinstance(x, np.ndarray):
            x, _ = _numpy_to_torch(x)
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise DataError(f"TransformedDataset expects x to be an image (C, H, W); item {index} has "
                            f"{_describe(x)}")
        # Preprocess converts (and checks) the values itself: once per item, not twice.
        x = self.preprocess(x) if self.preprocess is not None else _to_float(x)
        return x, y


# ---------------------------------------------------------------------------------------------
# writing images
# ---------------------------------------------------------------------------------------------

def _pil_format(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the image format of '{path}' from its extension; use .png")
    return fmt


def save_image(array: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write one image atomically as 8 bits per channel (format from the extension).

    Parameters
    ----------
    array : array or tensor
        ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with ``C`` in {1, 3, 4}. Floats must lie in
        [0, 1] (undo any normalisation first) and are scaled by 255 and rounded; integers must
        lie in 0..255.
    path : path
    overwrite : bool, default True
        When ``False``, an existing file raises :class:`OutputExistsError`.

    Examples
    --------
    >>> import numpy as np
    >>> save_image(np.zeros((3, 8, 8)), "black.png")                 # doctest: +SKIP
    """
    path = Path(path)
    data = as_numpy(array)
    if data.ndim == 3:
        if data.shape[0] in (1, 3, 4):
            data = data.transpose(1, 2, 0)
        elif data.shape[2] not in (1, 3, 4):
            raise DataError(f"save_image expects (H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4; "
                            f"got shape {data.shape}")
        if data.shape[2] == 1:
            data = data[..., 0]
    elif data.ndim != 2:
        raise DataError(f"save_image expects one image (H, W), (C, H, W) or (H, W, C); got shape {data.shape}")
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or data.min() < 0.0 or data.max() > 1.0:
            raise DataError(
                f"save_image: float pixels must lie in [0, 1]; got values in [{np.nanmin(data):.4g}, "
                f"{np.nanmax(data):.4g}] (undo normalisation first) for '{path}'"
            )
        data = np.rint(data * 255.0).astype(np.uint8)
    elif data.dtype.kind in "iub":
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"save_image: integer pixels must lie in 0..255; got values in "
                            f"[{data.min()}, {data.max()}] for '{path}'")
        data = data.astype(np.uint8) * (255 if data.dtype.kind == "b" else 1)
    else:
        raise DataError(f"save_image: cannot write pixels of dtype {data.dtype} to '{path}'")
    fmt = _pil_format(path)
    image = Image.fromarray(np.ascontiguousarray(data))
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt), overwrite=overwrite)


def save_mask(mask: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write a mask ``(H, W)`` of class ids 0..255 atomically as a mode-L PNG (lossless).

    Examples
    --------
    >>> import numpy as np
    >>> save_mask(np.zeros((8, 8), dtype=np.int64), "mask.png")       # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() in _LOSSY_EXTENSIONS + (".webp",):
        raise DataError(f"cannot write mask '{path}' in a lossy format; use .png")
    data = as_numpy(mask)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise DataError(f"save_mask expects one mask (H, W); got shape {data.shape}")
    if data.dtype.kind == "f" and not (np.isfinite(data).all() and (data == np.round(data)).all()):
        raise DataError(f"save_mask: masks hold integer class ids; got non-integer floats for '{path}'")
    if data.dtype.kind not in "iufb":
        raise DataError(f"save_mask: cannot write mask values of dtype {data.dtype} to '{path}'")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(
            f"save_mask: class ids must lie in 0..255 to fit an 8-bit PNG; got values in "
            f"[{data.min()}, {data.max()}] for '{path}'"
        )
    image = Image.fromarray(data.astype(np.uint8))
    fmt = _pil_format(path)
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt), overwrite=overwrite)

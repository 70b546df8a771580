"""Tests of the library's own data: scikit-learn's digits as images and the synthetic glyph segmentation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from sklearn_bayes_transfer.datasets import load_digits_images, make_glyph_segmentation
from sklearn_bayes_transfer.exceptions import ConfigError, DataError

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------

def test_load_digits_images_matches_sklearn():
    X, y = load_digits_images()
    digits = load_digits()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(X[:, 0] * 16.0, digits.images, atol=1e-5)
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(y, digits.target)


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

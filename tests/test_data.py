"""Tests of the data layer: array adapters, Preprocess, folders, masks, transforms, writers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sklearn_bayes_transfer.data import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    JointTransform,
    Preprocess,
    SegmentationDataset,
    TransformedDataset,
    as_image_tensor,
    as_mask_tensor,
    convert_channels,
    load_image_folder,
    load_segmentation_folder,
    prepare_images,
    resize_images,
    resize_masks,
    save_image,
    save_mask,
)
from sklearn_bayes_transfer.exceptions import (
    ConfigError,
    DataError,
    OutputExistsError,
    PriorFormatError,
)

RNG = np.random.default_rng(0)


def luminance(rgb: np.ndarray, axis: int) -> np.ndarray:
    """ITU-R 601-2 luma, written out independently of the library."""
    r, g, b = np.moveaxis(rgb, axis, 0)
    return 0.299 * r + 0.587 * g + 0.114 * b


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


# --------------------------------------------------------------------------------------------
# as_image_tensor / as_mask_tensor
# --------------------------------------------------------------------------------------------

def test_uint8_grey_is_scaled_and_gets_a_channel():
    X = RNG.integers(0, 256, size=(4, 8, 10), dtype=np.uint8)
    out = as_image_tensor(X)
    assert out.dtype == torch.float32 and out.shape == (4, 1, 8, 10) and out.is_contiguous()
    np.testing.assert_allclose(out[:, 0].numpy(), X / 255.0, rtol=0, atol=1e-7)


def test_channels_last_is_recognised_and_made_contiguous():
    X = RNG.random((3, 8, 10, 3))
    out = as_image_tensor(X)
    assert out.shape == (3, 3, 8, 10) and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), np.transpose(X, (0, 3, 1, 2)).astype(np.float32))
    # channels-first wins when dimension 1 is a channel count
    assert as_image_tensor(np.zeros((2, 3, 5, 3), np.float32)).shape == (2, 3, 5, 3)
    assert as_image_tensor(torch.zeros(2, 6, 5, 1)).shape == (2, 1, 6, 5)


def test_other_dtypes():
    ints = np.array([[[0, 300], [7, -2]]], dtype=np.int16)
    np.testing.assert_array_equal(as_image_tensor(ints)[0, 0].numpy(), ints[0].astype(np.float32))
    flags = np.array([[[True, False]]])
    np.testing.assert_array_equal(as_image_tensor(flags)[0, 0].numpy(), [[1.0, 0.0]])
    halves = RNG.random((2, 1, 4, 4)).astype(np.float16)
    np.testing.assert_array_equal(as_image_tensor(halves).numpy(), halves.astype(np.float32))
    rgba = RNG.random((2, 4, 5, 5)).astype(np.float32)
    assert as_image_tensor(rgba).shape == (2, 4, 5, 5)
    big_endian = np.arange(4, dtype=">f4").reshape(1, 2, 2)
    np.testing.assert_array_equal(as_image_tensor(big_endian)[0, 0].numpy(), [[0, 1], [2, 3]])


def test_list_of_arrays_is_stacked_and_ragged_list_is_refused():
    images = [RNG.random((6, 6)) for _ in range(3)]
    np.testing.assert_allclose(as_image_tensor(images)[:, 0].numpy(), np.stack(images).astype(np.float32))
    tensors = [torch.rand(3, 4, 4) for _ in range(2)]
    assert torch.equal(as_image_tensor(tensors), torch.stack(tensors))
    with pytest.raises(DataError, match=r"X\[0\] has shape \(6, 6\) but X\[1\] has shape \(7, 6\)"):
        as_image_tensor([np.zeros((6, 6)), np.zeros((7, 6))])
    with pytest.raises(DataError, match="empty list"):
        as_image_tensor([])


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros((5, 64)), r"2-D array of shape \(5, 64\).*reshape\(-1, 8, 8\)"),
        (np.zeros((2, 1, 1, 4, 4)), r"5-D input"),
        (np.zeros((2, 5, 6, 7)), r"shape \(2, 5, 6, 7\).*channel count"),
        (np.array([[["a"]]]), r"dtype <U1"),
        (np.zeros((2, 3, 3), dtype=complex), r"complex"),
        (np.zeros((2, 0, 4)), r"positive height and width"),
        ("images.png", r"got str"),
    ],
)
def test_bad_inputs_are_refused_with_the_shape_or_dtype(X, message):
    with pytest.raises(DataError, match=message):
        as_image_tensor(X)


def test_non_finite_values_are_refused():
    X = np.zeros((2, 1, 3, 3), np.float32)
    X[1, 0, 1, 1] = np.nan
    with pytest.raises(DataError, match="1 non-finite"):
        as_image_tensor(X)
    with pytest.raises(DataError, match="non-finite"):
        as_image_tensor(np.full((1, 2, 2), 1e300))  # overflows float32


def test_read_only_arrays_are_copied_not_shared():
    X = np.zeros((2, 1, 3, 3), np.float32)
    X.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = as_image_tensor(X)
    out += 1.0
    assert X.max() == 0.0
    writable = np.zeros((2, 1, 3, 3), np.float32)
    assert np.shares_memory(as_image_tensor(writable).numpy(), writable)


def test_as_mask_tensor():
    masks = RNG.integers(0, 5, size=(2, 1, 4, 4)).astype(np.uint8)
    out = as_mask_tensor(masks)
    assert out.dtype == torch.int64 and out.shape == (2, 4, 4)
    np.testing.assert_array_equal(out.numpy(), masks[:, 0])
    np.testing.assert_array_equal(as_mask_tensor(masks[:, 0].astype(np.float32)).numpy(), masks[:, 0])
    with pytest.raises(DataError, match="non-integer"):
        as_mask_tensor(np.full((1, 2, 2), 0.5))
    with pytest.raises(DataError, match=r"\(N, H, W\)"):
        as_mask_tensor(np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# channel conversion, resizing, Preprocess
# --------------------------------------------------------------------------------------------

def test_grey_rgb_conversions_follow_the_formulas():
    rgb = RNG.random((2, 3, 5, 4)).astype(np.float32)
    grey = convert_channels(torch.from_numpy(rgb), 1)
    np.testing.assert_allclose(grey[:, 0].numpy(), luminance(rgb, axis=1), rtol=1e-6)
    one = torch.from_numpy(rgb[:, :1])
    three = convert_channels(one, 3)
    for c in range(3):
        assert torch.equal(three[:, c], one[:, 0])
    rgba = torch.from_numpy(np.concatenate([rgb, np.ones((2, 1, 5, 4), np.float32)], axis=1))
    assert torch.equal(convert_channels(rgba, 3), torch.from_numpy(rgb))
    with pytest.raises(DataError, match="2 channels to 3"):
        convert_channels(torch.zeros(1, 2, 3, 3), 3)


@pytest.mark.parametrize("size", [(5, 3), (4, 4), (13, 11), (9, 3)])
def test_resize_matches_pil_bilinear_for_odd_sizes(size):
    image = RNG.random((9, 7)).astype(np.float32)
    out = resize_images(torch.from_numpy(image)[None, None], size)
    assert out.shape == (1, 1, *size)
    # PIL's bilinear filter widens its support when shrinking: the reference for antialiasing
    expected = np.asarray(Image.fromarray(image, mode="F").resize((size[1], size[0]), Image.BILINEAR))
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-5)


def test_resize_masks_nearest_keeps_class_ids():
    mask = torch.tensor([[[0, 1], [2, 3]]])
    up = resize_masks(mask, (4, 4))
    np.testing.assert_array_equal(up[0].numpy(), np.kron(mask[0].numpy(), np.ones((2, 2), dtype=np.int64)))
    down = resize_masks(torch.from_numpy(RNG.integers(0, 7, size=(1, 9, 7))), (4, 3))
    assert down.dtype == torch.int64 and set(down.unique().tolist()) <= set(range(7))


def test_preprocess_call_converts_resizes_and_normalises():
    p = Preprocess(image_size=None, channels=1, mean=(0.25,), std=(0.5,))
    rgb = RNG.random((2, 3, 6, 6)).astype(np.float32)
    out = p(torch.from_numpy(rgb))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0].numpy(), (luminance(rgb, axis=1) - 0.25) / 0.5, rtol=1e-5, atol=1e-6)

    p3 = Preprocess(image_size=(3, 5), channels=3, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    grey = torch.rand(6, 6)
    out = p3(grey[None])  # a single (C, H, W) image
    assert out.shape == (3, 3, 5)
    resized = resize_images(grey[None, None], (3, 5))[0, 0]
    for c, (m, s) in enumerate(zip(p3.mean, p3.std)):
        torch.testing.assert_close(out[c], (resized - m) / s)
    uint8 = torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(p(uint8), torch.full((1, 1, 2, 2), 1.5))


def test_preprocess_meta_round_trip_is_plain_python():
    p = Preprocess(image_size=[32, 28], channels=3, mean=np.array([0.1, 0.2, 0.3]), std=(1, 2, 3))
    meta = p.to_meta()
    assert meta == {"image_size": [32, 28], "channels": 3, "mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]}
    json.dumps(meta)
    assert Preprocess.from_meta(meta) == p
    assert Preprocess.from_meta(Preprocess(None, 1, (0.0,), (1.0,)).to_meta()).image_size is None
    assert Preprocess(16, 1, (0.0,), (1.0,)).image_size == (16, 16)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mean": None, "_drop": "mean"}, r"lacks the key 'mean'"),
        ({"channels": 2}, r"'channels' must be 1 .* or 3"),
        ({"mean": [0.5]}, r"'mean' must have one value per channel \(3\)"),
        ({"std": [1.0, 0.0, 1.0]}, r"'std' must hold positive"),
        ({"image_size": [32]}, r"'image_size' must be None"),
        ({"image_size": "32"}, r"'image_size'"),
        ({"mean": "abc"}, r"'mean' must be a list"),
    ],
)
def test_preprocess_from_meta_names_the_bad_key(change, message):
    meta = Preprocess((8, 8), 3, (0.5,) * 3, (0.5,) * 3).to_meta()
    drop = change.pop("_drop", None)
    meta.update(change)
    if drop:
        del meta[drop]
    with pytest.raises(ConfigError, match=message):
        Preprocess.from_meta(meta)
    with pytest.raises(PriorFormatError, match=message):
        Preprocess.from_meta(meta, error=PriorFormatError)


def test_preprocess_constructor_validates():
    with pytest.raises(ConfigError, match="channels"):
        Preprocess(None, 4, (0.0,) * 4, (1.0,) * 4)
    with pytest.raises(ConfigError, match="finite"):
        Preprocess(None, 1, (float("nan"),), (1.0,))
    with pytest.raises(ConfigError, match="mapping"):
        Preprocess.from_meta([1, 2])


def test_preprocess_fit_matches_numpy():
    X = RNG.random((11, 3, 5, 4)) * np.array([1.0, 3.0, 0.1])[None, :, None, None] + 2.0
    p = Preprocess.fit(X, batch_size=4)  # several chunks: exercises the merge of statistics
    assert p.channels == 3 and p.image_size is None
    np.testing.assert_allclose(p.mean, X.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(p.std, X.std(axis=(0, 2, 3)), rtol=1e-5)

    grey = Preprocess.fit(X, channels=1, batch_size=3)
    lum = luminance(X.astype(np.float32), axis=1)
    np.testing.assert_allclose(grey.mean, [lum.mean()], rtol=1e-5)
    np.testing.assert_allclose(grey.std, [lum.std()], rtol=1e-4)

    uint8 = RNG.integers(0, 256, size=(7, 6, 6), dtype=np.uint8)
    sized = Preprocess.fit(uint8, image_size=(3, 3), channels=3)
    reference = resize_images(torch.from_numpy(uint8 / 255.0).float()[:, None], (3, 3)).numpy()
    assert sized.image_size == (3, 3) and sized.channels == 3
    np.testing.assert_allclose(sized.mean, [reference.mean()] * 3, rtol=1e-5)
    np.testing.assert_allclose(sized.std, [reference.std()] * 3, rtol=1e-4)


def test_preprocess_fit_floors_std_and_refuses_empty_input():
    p = Preprocess.fit(np.full((3, 1, 4, 4), 0.5))
    assert p.std == (1e-8,) and p.mean == (0.5,)
    with pytest.raises(DataError, match="zero images"):
        Preprocess.fit(np.zeros((0, 1, 4, 4)))


def test_prepare_images_chunks_equal_one_pass():
    X = RNG.integers(0, 256, size=(7, 9, 7, 3), dtype=np.uint8)
    p = Preprocess(image_size=(5, 4), channels=1, mean=(0.5,), std=(0.2,))
    out = prepare_images(X, p, batch_size=3)
    assert out.shape == (7, 1, 5, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, p(as_image_tensor(X)))
    assert torch.equal(prepare_images(X, None), as_image_tensor(X))
    assert prepare_images(np.zeros((0, 1, 9, 7), np.float32), p).shape == (0, 1, 5, 4)
    with pytest.raises(ConfigError, match="batch_size"):
        prepare_images(X, p, batch_size=0)


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------

@pytest.fixture
def labeled_folder(tmp_path):
    """root/cat/{a,b}.png and root/dog/sub/c.PNG, grey 8x8, with known pixels."""
    arrays = {}
    for rel in ["cat/a.png", "cat/b.png", "dog/sub/c.PNG"]:
        arrays[rel] = RNG.integers(0, 256, size=(8, 8), dtype=np.uint8)
        write_png(tmp_path / "root" / rel, arrays[rel])
    (tmp_path / "root" / "dog" / "notes.txt").write_text("not an image, and ignored")
    (tmp_path / "root" / "cat" / ".hidden.png").write_bytes(b"ignored")
    return tmp_path / "root", arrays


def test_load_image_folder_round_trip(labeled_folder):
    root, arrays = labeled_folder
    X, y = load_image_folder(root)
    assert X.dtype == np.float32 and X.shape == (3, 1, 8, 8)
    assert y.tolist() == ["cat", "cat", "dog"]
    for i, rel in enumerate(["cat/a.png", "cat/b.png", "dog/sub/c.PNG"]):
        np.testing.assert_allclose(X[i, 0], arrays[rel] / 255.0, atol=1e-7)


def test_image_folder_items_match_the_eager_loader(labeled_folder):
    root, arrays = labeled_folder
    folder = ImageFolder(root)
    assert folder.classes == ["cat", "dog"] and len(folder) == 3
    assert folder.targets.dtype == np.int64 and folder.targets.tolist() == [0, 0, 1]
    assert [p.name for p in folder.paths] == ["a.png", "b.png", "c.PNG"]
    image, target = folder[2]
    assert target == 1 and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), arrays["dog/sub/c.PNG"] / 255.0, atol=1e-7)

    p = Preprocess(image_size=(4, 6), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    processed, _ = ImageFolder(root, preprocess=p)[0]
    torch.testing.assert_close(processed, p(torch.from_numpy(arrays["cat/a.png"] / 255.0).float()[None]))
    batch = next(iter(torch.utils.data.DataLoader(ImageFolder(root, preprocess=p), batch_size=3)))
    assert batch[0].shape == (3, 3, 4, 6)


def test_unlabeled_folder_is_searched_recursively(labeled_folder):
    root, _ = labeled_folder
    folder = ImageFolder(root, labeled=False)
    assert len(folder) == 3 and folder.classes == [] and folder.targets.tolist() == [-1, -1, -1]
    X, y = load_image_folder(root, labeled=False, image_size=5)
    assert y is None and X.shape == (3, 1, 5, 5)


def test_mixed_sizes_need_image_size(tmp_path):
    write_png(tmp_path / "a" / "x.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "a" / "y.png", np.zeros((10, 9), np.uint8))
    with pytest.raises(DataError, match=r"x\.png' is 8x8.*y\.png' is 10x9.*image_size.*--image-size"):
        load_image_folder(tmp_path)
    X, _ = load_image_folder(tmp_path, image_size=(7, 5))
    assert X.shape == (2, 1, 7, 5)


def test_grey_and_rgb_mix_becomes_rgb_and_channels_converts(tmp_path):
    grey = RNG.integers(0, 256, size=(6, 6), dtype=np.uint8)
    rgb = RNG.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    write_png(tmp_path / "k" / "a.png", grey)
    write_png(tmp_path / "k" / "b.png", rgb)
    X, _ = load_image_folder(tmp_path)
    assert X.shape == (2, 3, 6, 6)
    for c in range(3):
        np.testing.assert_allclose(X[0, c], grey / 255.0, atol=1e-7)
    np.testing.assert_allclose(X[1], rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)
    X1, _ = load_image_folder(tmp_path, channels=1)
    np.testing.assert_allclose(X1[1, 0], luminance(rgb / 255.0, axis=2), atol=1e-6)
    item, _ = ImageFolder(tmp_path, channels=1)[1]
    np.testing.assert_allclose(item[0].numpy(), X1[1, 0], atol=1e-7)


def test_pil_modes(tmp_path):
    rgb = RNG.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(5, 5, 1), dtype=np.uint8)
    write_png(tmp_path / "rgba" / "a.png", np.concatenate([rgb, alpha], axis=2))
    X, _ = load_image_folder(tmp_path / "rgba", labeled=False)
    np.testing.assert_allclose(X[0], rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)

    grey_palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    grey_palette.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255] + [7, 8, 9] * 253)
    (tmp_path / "p").mkdir()
    grey_palette.save(tmp_path / "p" / "g.png")
    X, _ = load_image_folder(tmp_path / "p", labeled=False)
    np.testing.assert_allclose(X[0, 0], np.array([[0, 128], [255, 128]]) / 255.0, atol=1e-7)
    assert X.shape == (1, 1, 2, 2)  # unused colours in the palette do not make it RGB

    colour_palette = grey_palette.copy()
    colour_palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    colour_palette.save(tmp_path / "p" / "g.png")
    X, _ = load_image_folder(tmp_path / "p", labeled=False)
    assert X.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(X[0, :, 0, 1], [0.0, 1.0, 0.0])

    deep = np.array([[0, 1000], [65535, 30000]], dtype=np.uint16)
    (tmp_path / "d").mkdir()
    Image.fromarray(deep).save(tmp_path / "d" / "deep.png")
    X, _ = load_image_folder(tmp_path / "d", labeled=False)
    np.testing.assert_allclose(X[0, 0], deep / 65535.0, rtol=1e-6)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a directory"):
        load_image_folder(tmp_path / "file.png")

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no images found in .*\.png, \.jpg"):
        ImageFolder(empty, labeled=False)

    flat = tmp_path / "flat"
    write_png(flat / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"no class subfolders.*root/<class>/<image>.*labeled=False"):
        load_image_folder(flat)

    no_images_class = tmp_path / "classes"
    write_png(no_images_class / "a" / "x.png", np.zeros((4, 4), np.uint8))
    (no_images_class / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*b' holds no images"):
        ImageFolder(no_images_class)


def test_non_image_file_is_named_lazily_and_eagerly(tmp_path):
    root = tmp_path / "root"
    write_png(root / "a" / "good.png", np.zeros((4, 4), np.uint8))
    (root / "a" / "broken.png").write_bytes(b"this is text, not a PNG")
    folder = ImageFolder(root)  # construction only lists files
    assert len(folder) == 2
    with pytest.raises(DataError, match=r"broken\.png' is not an image"):
        folder[0]
    assert folder[1][0].shape == (1, 4, 4)
    with pytest.raises(DataError, match=r"broken\.png' is not an image"):
        load_image_folder(root)
    truncated = (root / "a" / "good.png").read_bytes()[:40]
    (root / "a" / "broken.png").write_bytes(truncated)
    with pytest.raises(DataError, match=r"broken\.png"):
        load_image_folder(root)


def test_loose_images_in_a_labeled_root_are_reported(labeled_folder):
    root, _ = labeled_folder
    write_png(root / "loose.png", np.zeros((8, 8), np.uint8))
    with pytest.warns(UserWarning, match=r"1 images directly in .* are ignored"):
        folder = ImageFolder(root)
    assert len(folder) == 3


def test_extensions_argument(labeled_folder):
    root, _ = labeled_folder
    assert len(ImageFolder(root, labeled=False, extensions=["PNG"])) == 3
    assert ".webp" in IMAGE_EXTENSIONS
    with pytest.raises(DataError, match=r"looked for files ending in \.jpg"):
        ImageFolder(root, labeled=False, extensions=(".jpg",))


# --------------------------------------------------------------------------------------------
# segmentation folders
# --------------------------------------------------------------------------------------------

@pytest.fixture
def seg_folder(tmp_path):
    images, masks = {}, {}
    for stem in ["s1", "s2"]:
        images[stem] = RNG.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        masks[stem] = RNG.integers(0, 4, size=(6, 8), dtype=np.uint8)
        write_png(tmp_path / "images" / f"{stem}.png", images[stem])
        write_png(tmp_path / "masks" / f"{stem}.png", masks[stem])
    # another extension for the image pairs by stem
    images["s0"] = RNG.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    masks["s0"] = np.full((6, 8), 255, np.uint8)
    Image.fromarray(images["s0"]).save(tmp_path / "images" / "s0.bmp")
    write_png(tmp_path / "masks" / "s0.png", masks["s0"])
    return tmp_path, images, masks


def test_load_segmentation_folder_round_trip(seg_folder):
    root, images, masks = seg_folder
    X, M = load_segmentation_folder(root / "images", root / "masks")
    assert X.dtype == np.float32 and X.shape == (3, 3, 6, 8)
    assert M.dtype == np.int64 and M.shape == (3, 6, 8)
    for i, stem in enumerate(["s0", "s1", "s2"]):
        np.testing.assert_allclose(X[i], images[stem].transpose(2, 0, 1) / 255.0, atol=1e-7)
        np.testing.assert_array_equal(M[i], masks[stem])


def test_segmentation_resize_uses_nearest_for_masks(seg_folder):
    root, images, masks = seg_folder
    X, M = load_segmentation_folder(root / "images", root / "masks", image_size=(12, 16), channels=1)
    assert X.shape == (3, 1, 12, 16) and M.shape == (3, 12, 16)
    np.testing.assert_array_equal(M[1], np.kron(masks["s1"], np.ones((2, 2), np.int64)))
    expected = resize_images(torch.from_numpy(luminance(images["s1"] / 255.0, axis=2)).float()[None, None],
                             (12, 16))
    np.testing.assert_allclose(X[1, 0], expected[0, 0].numpy(), atol=1e-6)


def test_segmentation_mask_modes(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    ids = np.array([[0, 1, 2, 3]] * 4, np.uint8)
    palette_mask = Image.fromarray(ids, mode="P")
    palette_mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756)
    (tmp_path / "masks").mkdir()
    palette_mask.save(tmp_path / "masks" / "a.png")
    _, M = load_segmentation_folder(tmp_path / "images", tmp_path / "masks")
    np.testing.assert_array_equal(M[0], ids)  # palette indices are the class ids, not the colours

    write_png(tmp_path / "masks" / "a.png", np.stack([ids] * 3, axis=2))  # grey stored as RGB
    _, M = load_segmentation_folder(tmp_path / "images", tmp_path / "masks")
    np.testing.assert_array_equal(M[0], ids)

    wide = (ids.astype(np.uint16) * 1000)
    Image.fromarray(wide).save(tmp_path / "masks" / "a.png")
    _, M = load_segmentation_folder(tmp_path / "images", tmp_path / "masks")
    np.testing.assert_array_equal(M[0], wide)


def test_segmentation_errors(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_png(images / "a.png", np.zeros((4, 4), np.uint8))
    write_png(images / "b.png", np.zeros((4, 4), np.uint8))
    write_png(masks / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"image '.*b\.png' has no mask .*'b\.png'"):
        load_segmentation_folder(images, masks)
    write_png(masks / "b.png", np.zeros((4, 4), np.uint8))
    write_png(masks / "c.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"mask '.*c\.png' has no image"):
        load_segmentation_folder(images, masks)
    (masks / "c.png").unlink()

    write_png(masks / "b.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(DataError, match=r"b\.png' is 4x4 but its mask '.*b\.png' is 5x6"):
        load_segmentation_folder(images, masks)

    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    write_png(masks / "b.png", colour)
    with pytest.raises(DataError, match=r"mask '.*b\.png' is a colour \(RGB\) image whose channels differ"):
        load_segmentation_folder(images, masks)

    (masks / "b.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "b.jpg")
    with pytest.raises(DataError, match=r"mask '.*b\.jpg' is a JPEG"):
        load_segmentation_folder(images, masks)
    write_png(masks / "b.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"two mask files share the name 'b'"):
        load_segmentation_folder(images, masks)
    (masks / "b.jpg").unlink()

    write_png(images / "b.png", np.zeros((6, 6), np.uint8))
    write_png(masks / "b.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(DataError, match=r"different sizes.*image_size"):
        load_segmentation_folder(images, masks)
    X, M = load_segmentation_folder(images, masks, image_size=5)
    assert X.shape == (2, 1, 5, 5) and M.shape == (2, 5, 5)

    with pytest.raises(DataError, match="masks folder '.*missing' does not exist"):
        load_segmentation_folder(images, tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# transforms and datasets
# --------------------------------------------------------------------------------------------

def _windows(array: torch.Tensor, size: tuple[int, int]):
    """Every crop of ``array`` (.., H, W) and its mirror image."""
    for top in range(array.shape[-2] - size[0] + 1):
        for left in range(array.shape[-1] - size[1] + 1):
            crop = array[..., top:top + size[0], left:left + size[1]]
            yield crop
            yield crop.flip(-1)


def test_joint_transform_keeps_image_and_mask_aligned():
    mask = torch.from_numpy(RNG.integers(0, 50, size=(7, 9)))
    image = torch.stack([mask.float(), -mask.float()])  # the image *is* the mask
    transform = JointTransform(crop_size=(4, 5), generator=torch.Generator().manual_seed(0))
    flips, tops, lefts = set(), set(), set()
    for _ in range(40):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (2, 4, 5) and out_mask.shape == (4, 5) and out_mask.dtype == torch.int64
        assert torch.equal(out_image[0], out_mask.float()) and torch.equal(out_image[1], -out_mask.float())
        matches = [i for i, w in enumerate(_windows(mask, (4, 5))) if torch.equal(w, out_mask)]
        assert matches, "the output is not a (possibly mirrored) crop of the input"
        flips.add(matches[0] % 2)
        top, left = divmod(matches[0] // 2, 9 - 5 + 1)
        tops.add(top)
        lefts.add(left)
    assert flips == {0, 1}  # both flipped and unflipped crops occur
    assert tops == set(range(4)) and lefts == set(range(5))  # every offset is drawn


def test_joint_transform_pads_with_ignore_index_and_zero():
    mask = torch.ones(3, 2, dtype=torch.int64)
    image = torch.ones(1, 3, 2)
    out_image, out_mask = JointTransform(crop_size=5, hflip=False, ignore_index=99)(image, mask)
    expected_mask = torch.full((5, 5), 99)
    expected_mask[:3, :2] = 1
    assert torch.equal(out_mask, expected_mask)
    assert torch.equal(out_image[0], (expected_mask == 1).float())


def test_joint_transform_is_reproducible_and_validates():
    image, mask = torch.rand(1, 8, 8), torch.from_numpy(RNG.integers(0, 3, size=(8, 8)))
    runs = []
    for _ in range(2):
        transform = JointTransform(crop_size=3, generator=torch.Generator().manual_seed(5))
        runs.append([transform(image, mask)[1] for _ in range(5)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    identity = JointTransform(hflip=False)
    assert torch.equal(identity(image, mask)[1], mask)
    with pytest.raises(DataError, match=r"same size.*\(1, 8, 8\) and \(7, 8\)"):
        identity(image, mask[:7])
    with pytest.raises(ConfigError, match="crop_size"):
        JointTransform(crop_size=0)


def test_segmentation_dataset():
    X = RNG.random((3, 1, 6, 6)).astype(np.float32)
    masks = RNG.integers(0, 4, size=(3, 6, 6))
    ds = SegmentationDataset(X, masks)
    assert len(ds) == 3
    image, mask = ds[1]
    np.testing.assert_array_equal(image.numpy(), X[1])
    np.testing.assert_array_equal(mask.numpy(), masks[1])
    cropped = SegmentationDataset(X, masks, transform=JointTransform(crop_size=4))
    images, batch_masks = next(iter(torch.utils.data.DataLoader(cropped, batch_size=3)))
    assert images.shape == (3, 1, 4, 4) and batch_masks.shape == (3, 4, 4)
    with pytest.raises(DataError, match="3 images but masks holds 2"):
        SegmentationDataset(X, masks[:2])
    with pytest.raises(DataError, match="6x6 but masks are 5x6"):
        SegmentationDataset(X, masks[:, :5])


def test_transformed_dataset():
    base = [(np.full((1, 4, 4), 255, np.uint8), "a"), (torch.zeros(3, 4, 4), "b")]
    p = Preprocess(image_size=(2, 2), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = TransformedDataset(base, p)
    assert len(ds) == 2
    x, y = ds[0]
    assert y == "a" and torch.equal(x, torch.ones(3, 2, 2))
    assert torch.equal(ds[1][0], -torch.ones(3, 2, 2))
    plain = TransformedDataset(base, None)[0][0]
    assert plain.dtype == torch.float32 and torch.equal(plain, torch.ones(1, 4, 4))
    with pytest.raises(DataError, match=r"items \(x, y\)"):
        TransformedDataset([torch.zeros(1, 2, 2)], p)[0]


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------

def test_save_image_round_trip(tmp_path):
    image = RNG.random((3, 5, 7))
    save_image(torch.from_numpy(image), tmp_path / "a.png")
    back = read_png(tmp_path / "a.png")
    np.testing.assert_array_equal(back, np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8))
    grey = RNG.integers(0, 256, size=(5, 7), dtype=np.uint8)
    save_image(grey[None], tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as stored:
        assert stored.mode == "L"
    np.testing.assert_array_equal(read_png(tmp_path / "g.png"), grey)
    hwc = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    save_image(hwc, tmp_path / "c.png")
    np.testing.assert_array_equal(read_png(tmp_path / "c.png"), hwc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png", "g.png"]  # no temp files


def test_save_image_errors(tmp_path):
    with pytest.raises(DataError, match=r"\[0, 1\].*normalisation"):
        save_image(np.full((4, 4), 1.5), tmp_path / "x.png")
    with pytest.raises(DataError, match="0..255"):
        save_image(np.full((4, 4), 300), tmp_path / "x.png")
    with pytest.raises(DataError, match="extension"):
        save_image(np.zeros((4, 4)), tmp_path / "x.unknown")
    save_image(np.zeros((4, 4)), tmp_path / "x.png")
    with pytest.raises(OutputExistsError):
        save_image(np.zeros((4, 4)), tmp_path / "x.png", overwrite=False)


def test_save_mask_round_trip_and_errors(tmp_path):
    mask = RNG.integers(0, 256, size=(6, 5))
    save_mask(mask, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as stored:
        assert stored.mode == "L"
        np.testing.assert_array_equal(np.asarray(stored), mask)
    _, M = load_segmentation_folder(*_pair_for(tmp_path, mask))
    np.testing.assert_array_equal(M[0], mask)
    with pytest.raises(DataError, match=r"0..255.*\[0, 256\]"):
        save_mask(np.array([[0, 256]]), tmp_path / "n.png")
    with pytest.raises(DataError, match=r"\[-1, 0\]"):
        save_mask(np.array([[0, -1]]), tmp_path / "n.png")
    with pytest.raises(DataError, match="lossy"):
        save_mask(mask, tmp_path / "m.jpg")
    with pytest.raises(DataError, match="non-integer"):
        save_mask(np.full((2, 2), 0.5), tmp_path / "n.png")
    assert not (tmp_path / "n.png").exists()


def _pair_for(tmp_path, mask):
    images, masks = tmp_path / "pi", tmp_path / "pm"
    write_png(images / "m.png", np.zeros(mask.shape, np.uint8))
    masks.mkdir()
    save_mask(torch.from_numpy(mask), masks / "m.png")
    return images, masks

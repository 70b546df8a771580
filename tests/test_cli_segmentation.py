"""``bt-transfer finetune --task segmentation``, ``predict --out-dir`` and ``evaluate --masks`` end to end.

Tiny folders written here: 12x12 grey PNGs whose brightness follows the class of each pixel (0
background, 1 and 2 rectangles), masks of those ids (with a few 255 "void" pixels), and a
``small_cnn`` (width 4) prior.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_folder, write_prior
from PIL import Image
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.metrics import mean_iou, per_class_iou, pixel_accuracy
from sklearn_bayes_transfer.modelfile import load_model, save_model
from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter

runner = CliRunner()
SEG_FAST = ["--task", "segmentation", "--min-steps", "150", "--batch-size", "2", "--quiet"]
NAMES = ["0", "1", "2", "3", "4", "sub/5"]  # one pair in a sub-folder: pairs and outputs keep relative paths


def make_pair(rng: np.random.Generator, size=(12, 12), void: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A grey image and its mask: two rectangles of classes 1 and 2 on a class-0 background."""
    h, w = size
    mask = np.zeros(size, np.uint8)
    for k in (1, 2):
        top, left = rng.integers(0, h - 5), rng.integers(0, w - 5)
        mask[top:top + rng.integers(5, 9), left:left + rng.integers(5, 9)] = k
    pixels = np.clip(np.choose(mask, [40, 140, 230]) + rng.normal(0, 8, size), 0, 255).astype(np.uint8)
    if void:
        mask[0, :3] = 255
    return pixels, mask


def write_pairs(root: Path, names=NAMES, *, seed: int = 0, size=(12, 12)) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        pixels, mask = make_pair(rng, size, void=i == 0)
        for folder, array in (("images", pixels), ("masks", mask)):
            path = root / folder / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    return root / "images", root / "masks"


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def read_folder(folder: Path, names=NAMES) -> np.ndarray:
    return np.stack([read_png(folder / f"{name}.png") for name in names])


def finetune(prior: Path, images: Path, masks: Path, out: Path, *extra: str):
    return runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(images), "--masks", str(masks),
                               "--out", str(out), *SEG_FAST, *extra])


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """One segmentation model fine-tuned through the CLI, from a prior that records no image size."""
    root = tmp_path_factory.mktemp("seg")
    prior = write_prior(root / "prior.pt", with_preprocess=False)
    images, masks = write_pairs(root / "train")
    test_images, test_masks = write_pairs(root / "test", seed=1)
    model = root / "seg.pt"
    result = finetune(prior, images, masks, model)
    assert result.exit_code == 0, result.output
    return {"root": root, "prior": prior, "images": images, "masks": masks, "test_images": test_images,
            "test_masks": test_masks, "model": model, "output": result.stdout}


def evaluate_json(model: Path, images: Path, masks: Path) -> dict:
    result = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(images), "--masks", str(masks),
                                 "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- the happy path ----------------------------------------------------------------------------------------
def test_finetune_writes_a_segmenter(seg):
    # The default step budget: the fewest epochs of 3 batches that make --min-steps 150 steps.
    assert "3 classes (0, 1, 2), 6 images, 50 epochs (150 steps)" in seg["output"] and "train mIoU" in seg["output"]
    estimator = load_model(seg["model"])
    assert isinstance(estimator, PriorRegularizedSegmenter)
    assert estimator.classes_.tolist() == [0, 1, 2] and estimator.ignore_index == 255
    assert torch.load(seg["model"], weights_only=True)["head"]["kind"] == "fcn"
    assert estimator.get_params()["max_epochs"] is None and estimator.get_params()["prior_scale"] == "auto"
    X = read_folder(seg["images"]).astype(np.float32) / 255
    truth = read_folder(seg["masks"])
    # It learned: predicting the background everywhere would score about 0.19.
    assert mean_iou(truth, estimator.predict(X), 3) > 0.35
    train_miou = float(re.search(r"train mIoU ([0-9.]+)", seg["output"]).group(1))
    assert 0.3 < train_miou <= 1.0


def test_predict_writes_masks_at_each_images_size(seg, tmp_path):
    odd_dir = tmp_path / "odd"
    odd_dir.mkdir()
    odd_pixels, _ = make_pair(np.random.default_rng(5), size=(13, 11))
    Image.fromarray(odd_pixels).save(odd_dir / "odd.png")
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--model", str(seg["model"]), str(seg["test_images"]),
                                 str(odd_dir / "odd.png"), "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote 7 masks to {out}" in result.stdout
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted([f"{name}.png" for name in NAMES] + ["odd.png"])

    estimator = load_model(seg["model"])
    X = read_folder(seg["test_images"]).astype(np.float32) / 255
    np.testing.assert_array_equal(read_folder(out), estimator.predict(X))
    odd = read_png(out / "odd.png")
    assert odd.shape == (13, 11)  # the input's own size: the model records none, the network is convolutional
    np.testing.assert_array_equal(odd, estimator.predict(odd_pixels[None].astype(np.float32) / 255)[0])


def test_evaluate_matches_metrics_on_the_predicted_masks(seg, tmp_path):
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--model", str(seg["model"]), str(seg["test_images"]),
                                 "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    predicted, truth = read_folder(out), read_folder(seg["test_masks"])
    assert (truth == 255).any()  # void pixels are left out below and by evaluate

    info = evaluate_json(seg["model"], seg["test_images"], seg["test_masks"])
    assert info["mean_iou"] == pytest.approx(mean_iou(truth, predicted, 3, ignore_index=255), abs=1e-12)
    assert info["pixel_accuracy"] == pytest.approx(pixel_accuracy(truth, predicted, 3, ignore_index=255), abs=1e-12)
    expected = per_class_iou(truth, predicted, 3, ignore_index=255)
    assert list(info["per_class_iou"]) == ["0", "1", "2"]
    np.testing.assert_allclose(list(info["per_class_iou"].values()), expected, atol=1e-12)
    assert info["n_images"] == 6 and info["classes"] == [0, 1, 2] and info["ignore_index"] == 255
    assert info["resized_to"] is None

    # The written masks are the model's predictions: scored against them, everything agrees.
    perfect = evaluate_json(seg["model"], seg["test_images"], out)
    assert perfect["mean_iou"] == 1.0 and perfect["pixel_accuracy"] == 1.0

    table = runner.invoke(app, ["evaluate", "--model", str(seg["model"]), "--data", str(seg["test_images"]),
                                "--masks", str(seg["test_masks"])])
    assert table.exit_code == 0, table.output
    assert "mean IoU" in table.stdout and f"{info['mean_iou']:.4f}" in table.stdout
    assert f"{info['per_class_iou']['2']:.4f}" in table.stdout


def test_absent_class_has_no_iou(seg, tmp_path):
    """A class in neither the masks nor the predictions: NaN IoU (null in JSON), left out of the mean."""
    ids = np.array([0, 5, 9])  # class ids that are not indices, so a label/index mix-up shows
    images, masks = write_pairs(tmp_path / "data", NAMES[:4], seed=2)
    for name in NAMES[:4]:
        mask = read_png(masks / f"{name}.png")
        Image.fromarray(np.where(mask == 255, 255, ids[np.minimum(mask, 2)]).astype(np.uint8)).save(
            masks / f"{name}.png")
    X = read_folder(images, NAMES[:4]).astype(np.float32) / 255
    truth = read_folder(masks, NAMES[:4])
    estimator = PriorRegularizedSegmenter(Prior.load(seg["prior"]), classes=[0, 5, 9, 200], max_epochs=2, lr=0.05,
                                          batch_size=2, verbose=0, random_state=0).fit(X, truth)
    with torch.no_grad():
        estimator.module_.head[-1].bias[3] = -1e4  # class 200 is never predicted
    model = save_model(estimator, tmp_path / "four.pt")
    predicted = estimator.predict(X)
    assert not (predicted == 200).any()

    info = evaluate_json(model, images, masks)
    index = {c: i for i, c in enumerate([0, 5, 9, 200])}
    t = np.vectorize(lambda v: index.get(int(v), 255))(truth)
    p = np.vectorize(lambda v: index[int(v)])(predicted)
    expected = per_class_iou(t, p, 4, ignore_index=255)
    assert math.isnan(expected[3]) and info["per_class_iou"]["200"] is None
    np.testing.assert_allclose([info["per_class_iou"][k] for k in ("0", "5", "9")], expected[:3], atol=1e-12)
    assert info["mean_iou"] == pytest.approx(mean_iou(t, p, 4, ignore_index=255), abs=1e-12)
    assert info["mean_iou"] == pytest.approx(np.nanmean(expected), abs=1e-12)

    table = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(images), "--masks", str(masks)])
    assert table.exit_code == 0 and "nan" in table.stdout


def test_segmentation_keeps_the_image_size_unless_told(tmp_path):
    """A prior recording 8x8 grey: a segmenter keeps its 12x12 images (fully convolutional) and the prior's
    normalisation; --image-size resizes."""
    prior = write_prior(tmp_path / "prior.pt")  # records 8x8 grey
    images, masks = write_pairs(tmp_path / "train")
    model = tmp_path / "seg.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(images), "--masks", str(masks),
                                 "--out", str(model), "--task", "segmentation", "--max-epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    estimator = load_model(model)
    recorded = Prior.load(prior).meta["preprocess"]
    assert estimator.preprocess_.image_size is None and estimator.input_shape_ == (1, 12, 12)
    assert list(estimator.preprocess_.mean) == recorded["mean"] and list(estimator.preprocess_.std) == recorded["std"]


def test_image_size_and_segmentation_options(tmp_path):
    """--image-size 8: training at 8x8, masks at the input size; deeplabv3, ignore index, validation."""
    prior = write_prior(tmp_path / "prior.pt")  # records 8x8 grey
    images, masks = write_pairs(tmp_path / "train")
    model = tmp_path / "seg.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(images), "--masks", str(masks),
                                 "--out", str(model), "--task", "segmentation", "--max-epochs", "2", "--lr", "0.05",
                                 "--batch-size", "4", "--head", "deeplabv3", "--ignore-index", "0",
                                 "--valid-fraction", "0.34", "--image-size", "8"])
    assert result.exit_code == 0, result.output
    assert "train_miou" in result.stdout and "valid_miou" in result.stdout  # the per-epoch table
    # 0 is ignored, so the void value 255 is a class like any other.
    assert "3 classes (1, 2, 255), 6 images" in result.stdout and "valid mIoU" in result.stdout
    estimator = load_model(model)
    assert estimator.classes_.tolist() == [1, 2, 255] and estimator.ignore_index == 0
    assert estimator.preprocess_.image_size == (8, 8)
    assert torch.load(model, weights_only=True)["head"]["kind"] == "deeplabv3"

    odd = tmp_path / "odd.png"
    Image.fromarray(make_pair(np.random.default_rng(3), size=(13, 11))[0]).save(odd)
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--model", str(model), str(odd), str(images / "1.png"),
                                 "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert read_png(out / "odd.png").shape == (13, 11) and read_png(out / "1.png").shape == (12, 12)
    assert set(np.unique(read_png(out / "odd.png"))) <= {1, 2, 255}

    # Images of two sizes are scored at the model's input size (masks resized by nearest neighbour).
    Image.open(odd).save(images / "odd.png")
    Image.fromarray(np.full((13, 11), 2, np.uint8)).save(masks / "odd.png")
    info = evaluate_json(model, images, masks)
    assert info["resized_to"] == [8, 8] and info["n_images"] == 7


# -- errors: one line, exit code 1 ---------------------------------------------------------------------------
@pytest.fixture
def pairs(tmp_path):
    images, masks = write_pairs(tmp_path / "data", NAMES[:3])
    return {"prior": write_prior(tmp_path / "prior.pt", with_preprocess=False), "images": images, "masks": masks,
            "out": tmp_path / "m.pt", "tmp": tmp_path}


def test_finetune_task_options(pairs):
    base = ["finetune", "--prior", str(pairs["prior"]), "--data", str(pairs["images"]), "--out", str(pairs["out"])]
    one_line_error(runner.invoke(app, [*base, *SEG_FAST]), "--task segmentation needs --masks")
    one_line_error(runner.invoke(app, [*base, "--masks", str(pairs["masks"])]), "--masks", "--task segmentation")
    one_line_error(runner.invoke(app, [*base, "--head", "deeplabv3", "--ignore-index", "3"]),
                   "--ignore-index, --head", "--task segmentation")
    one_line_error(runner.invoke(app, [*base, *SEG_FAST, "--masks", str(pairs["masks"]), "--valid-fraction", "0.9"]),
                   "--valid-fraction 0.9", "at least one image")
    assert not pairs["out"].exists()


def test_finetune_refuses_bad_masks(pairs):
    args = (pairs["prior"], pairs["images"], pairs["masks"], pairs["out"])
    image, mask = pairs["images"] / "1.png", pairs["masks"] / "1.png"
    saved = mask.read_bytes()

    mask.unlink()
    one_line_error(finetune(*args), str(image), "has no mask")
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(mask)
    one_line_error(finetune(*args), str(image), str(mask), "12x12", "12x10")
    grey = read_png(pairs["images"] / "1.png")
    Image.fromarray(np.stack([grey, grey // 2, grey], axis=-1), "RGB").save(mask)
    one_line_error(finetune(*args), str(mask), "colour")
    mask.write_bytes(saved)
    (pairs["images"] / "extra.png").write_bytes(image.read_bytes())
    one_line_error(finetune(*args), str(pairs["images"] / "extra.png"), "has no mask")
    assert not pairs["out"].exists()


@pytest.fixture(scope="module")
def classifier_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    prior = write_prior(root / "prior.pt")
    X = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32)
    clf = PriorRegularizedClassifier(Prior.load(prior), max_epochs=1, verbose=0).fit(X, np.array([0, 1] * 3))
    return {"model": save_model(clf, root / "clf.pt"), "data": write_folder(root / "data", 2)}


def test_predict_option_errors(seg, classifier_model, tmp_path):
    model, images = str(seg["model"]), str(seg["test_images"])
    out = tmp_path / "pred"
    one_line_error(runner.invoke(app, ["predict", "--model", model, images]), model, "--out-dir")
    one_line_error(runner.invoke(app, ["predict", "--model", model, images, "--out", str(tmp_path / "p.csv")]),
                   "--out writes a CSV", "--out-dir")
    one_line_error(runner.invoke(app, ["predict", "--model", model, images, "--out-dir", str(out), "--proba"]),
                   "--proba")
    clf = str(classifier_model["model"])
    one_line_error(runner.invoke(app, ["predict", "--model", clf, str(classifier_model["data"]), "--out-dir",
                                       str(out)]), clf, "PriorRegularizedClassifier", "--out-dir")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    one_line_error(runner.invoke(app, ["predict", "--model", model, images, "--out-dir", str(a_file)]),
                   str(a_file), "directory")
    assert not out.exists()


def test_predict_refuses_existing_masks_before_writing_any(seg, tmp_path):
    out = tmp_path / "pred"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "5.png").write_bytes(b"keep me")
    args = ["predict", "--model", str(seg["model"]), str(seg["test_images"]), "--out-dir", str(out)]
    one_line_error(runner.invoke(app, args), str(out / "sub" / "5.png"), "--force")
    assert [p.name for p in out.rglob("*.png")] == ["5.png"] and (out / "sub" / "5.png").read_bytes() == b"keep me"
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert len(list(out.rglob("*.png"))) == 6 and read_png(out / "sub" / "5.png").shape == (12, 12)

    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "0.png").write_bytes((seg["test_images"] / "1.png").read_bytes())
    one_line_error(runner.invoke(app, ["predict", "--model", str(seg["model"]), str(seg["test_images"] / "0.png"),
                                       str(twin / "0.png"), "--out-dir", str(tmp_path / "other")]),
                   str(seg["test_images"] / "0.png"), str(twin / "0.png"), "both write")
    assert not (tmp_path / "other").exists()


def test_evaluate_errors(seg, classifier_model, tmp_path):
    model = str(seg["model"])
    images, masks = write_pairs(tmp_path / "data", NAMES[:3])
    bad = read_png(masks / "2.png").copy()
    bad[5, 5] = 7
    Image.fromarray(bad).save(masks / "2.png")
    one_line_error(runner.invoke(app, ["evaluate", "--model", model, "--data", str(images), "--masks", str(masks)]),
                   str(images / "2.png"), "value 7", "[0, 1, 2]")
    (masks / "2.png").unlink()
    one_line_error(runner.invoke(app, ["evaluate", "--model", model, "--data", str(images), "--masks", str(masks)]),
                   str(images / "2.png"), "has no mask")
    one_line_error(runner.invoke(app, ["evaluate", "--model", model, "--data", str(images)]), model, "--masks")
    for extra in (["--bins", "5"], ["--reliability-diagram", str(tmp_path / "r.png")]):
        one_line_error(runner.invoke(app, ["evaluate", "--model", model, "--data", str(seg["test_images"]),
                                           "--masks", str(seg["test_masks"]), *extra]), extra[0], "calibration")
    clf = str(classifier_model["model"])
    one_line_error(runner.invoke(app, ["evaluate", "--model", clf, "--data", str(classifier_model["data"]),
                                       "--masks", str(masks)]), "--masks", "PriorRegularizedClassifier")
    # Images of two sizes, and a model that records no input size to bring them to.
    mixed_images, mixed_masks = write_pairs(tmp_path / "mixed", NAMES[:2])
    Image.fromarray(np.zeros((13, 11), np.uint8)).save(mixed_images / "odd.png")
    Image.fromarray(np.zeros((13, 11), np.uint8)).save(mixed_masks / "odd.png")
    one_line_error(runner.invoke(app, ["evaluate", "--model", model, "--data", str(mixed_images), "--masks",
                                       str(mixed_masks)]), str(mixed_images / "odd.png"), "different sizes")


def test_segmentation_fine_tune_resumes_from_its_checkpoint(tmp_path):
    prior = write_prior(tmp_path / "prior.pt", with_preprocess=False)
    images, masks = write_pairs(tmp_path / "train")
    short = ["--min-steps", "12", "--checkpoint-dir", str(tmp_path / "run")]
    assert finetune(prior, images, masks, tmp_path / "a.pt", *short).exit_code == 0
    # The finished fine-tune resumed: no epoch left, the same model.
    result = finetune(prior, images, masks, tmp_path / "b.pt", *short, "--resume")
    assert result.exit_code == 0, result.output
    X = read_folder(images).astype(np.float32) / 255
    np.testing.assert_array_equal(load_model(tmp_path / "b.pt").predict_proba(X[:, None]),
                                  load_model(tmp_path / "a.pt").predict_proba(X[:, None]))

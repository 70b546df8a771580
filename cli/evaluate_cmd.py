"""``bt-transfer evaluate``: accuracy and calibration of a model file on a labelled image folder, or mean
IoU, pixel accuracy and per-class IoU of a segmentation model on images and their masks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.table import Table

from sklearn_bayes_transfer.data import ImageFolder, load_segmentation_folder
from sklearn_bayes_transfer.exceptions import ConfigError, DataError
from sklearn_bayes_transfer.metrics import (
    IGNORE_TARGET,
    accuracy,
    brier_score,
    encode_masks,
    expected_calibration_error,
    iou_from_confusion,
    mean_iou_from_confusion,
    negative_log_likelihood,
    pixel_accuracy_from_confusion,
    reliability_diagram,
    segmentation_confusion_matrix,
)
from sklearn_bayes_transfer.modelfile import load_model
from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter

from ._app import app, check_output, console, handle_errors, resolve_device
from ._images import (
    MASK_CHUNK,
    check_classifier,
    collect_image_names,
    image_dataset,
    image_file_size,
    model_channels,
)

__all__ = ["evaluate"]

#: Equal-width confidence bins of the ECE when ``--bins`` is not given.
DEFAULT_BINS = 15


def _true_class_indices(folder_classes: list[str], targets: np.ndarray, model_classes: np.ndarray,
                       data: Path) -> np.ndarray:
    """Column of ``model_classes`` for every image, matching folder names to labels as text.

    Folder names are strings; a model trained in Python may have integer labels, so ``"3"``
    matches the label ``3``.
    """
    column = {str(label): i for i, label in enumerate(model_classes.tolist())}
    unknown = [name for name in folder_classes if name not in column]
    if unknown:
        raise DataError(f"class folder(s) {', '.join(repr(n) for n in unknown)} in '{data}' are not classes of the "
                        f"model (its classes: {', '.join(str(c) for c in model_classes.tolist())}); remove them "
                        "or evaluate a model trained on them")
    folder_to_column = np.asarray([column[name] for name in folder_classes], dtype=np.int64)
    return folder_to_column[targets]


def _scores(y: np.ndarray, proba: np.ndarray, bins: int) -> dict[str, float]:
    return {
        "accuracy": accuracy(y, proba.argmax(axis=1)),
        "nll": negative_log_likelihood(y, proba),
        "ece": expected_calibration_error(y, proba, n_bins=bins),
        "brier": brier_score(y, proba),
    }


def _print_table(info: dict[str, Any]) -> None:
    table = Table(title=f"{info['model']} on {info['data']}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    table.add_row("images", str(info["n_images"]))
    table.add_row("accuracy", f"{info['accuracy']:.4f}")
    table.add_row("NLL (nats)", f"{info['nll']:.4f}")
    table.add_row(f"ECE ({info['bins']} bins)", f"{info['ece']:.4f}")
    table.add_row("Brier score", f"{info['brier']:.4f}")
    if info["reliability_diagram"]:
        table.add_row("reliability diagram", info["reliability_diagram"])
    console.print(table)


def _evaluation_size(estimator: PriorRegularizedSegmenter, paths: list[Path], data: Path) -> tuple[int, int] | None:
    """``None`` (the images' own size, the masks as drawn) when all images share one size, else the
    model's input size, to which images (bilinear) and masks (nearest) are then resized."""
    sizes = [image_file_size(path) for path in paths]
    odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is None:
        return None
    preprocess = getattr(estimator, "preprocess_", None)
    if preprocess is None or preprocess.image_size is None:
        raise DataError(f"images in '{data}' have different sizes: '{paths[0]}' is {sizes[0][0]}x{sizes[0][1]} and "
                        f"'{paths[odd]}' is {sizes[odd][0]}x{sizes[odd][1]} (height x width), and the model records "
                        "no input size to resize them to; evaluate the images of each size separately")
    return preprocess.image_size


def _segmentation_scores(estimator: PriorRegularizedSegmenter, data: Path, masks: Path) -> dict[str, Any]:
    """Mean IoU, pixel accuracy and per-class IoU (NaN where a class is absent from both the truth
    and the prediction) of ``estimator`` on the images in ``data`` and their masks in ``masks``.

    Pixels whose mask value is the model's ``ignore_index`` are not counted; mask values outside
    the model's classes are refused, naming the image.
    """
    # load_segmentation_folder returns the pairs in the order of their names.
    entries = sorted(collect_image_names([data]), key=lambda entry: entry[1])
    paths = [path for path, _ in entries]
    size = _evaluation_size(estimator, paths, data)
    X, truth = load_segmentation_folder(data, masks, image_size=size, channels=model_channels(estimator))
    classes = np.asarray(estimator.classes_)
    ignore_index = estimator.ignore_index
    truth = encode_masks(truth, classes, ignore_index, where=lambda n: f"the mask of image '{paths[n]}' (in '{masks}')")
    predicted = encode_masks(np.concatenate([estimator.predict(X[start:start + MASK_CHUNK])
                                             for start in range(0, len(X), MASK_CHUNK)]), classes)
    cm = segmentation_confusion_matrix(truth, predicted, len(classes), ignore_index=IGNORE_TARGET)
    return {
        "data": str(data), "masks": str(masks), "n_images": len(X),
        "resized_to": None if size is None else list(size),
        "classes": classes.tolist(), "ignore_index": ignore_index,
        "mean_iou": mean_iou_from_confusion(cm),
        "pixel_accuracy": pixel_accuracy_from_confusion(cm),
        "per_class_iou": {str(c): float(v) for c, v in zip(classes.tolist(), iou_from_confusion(cm))},
    }


def _print_segmentation_table(info: dict[str, Any]) -> None:
    table = Table(title=f"{info['model']} on {info['data']} (masks: {info['masks']})", show_header=False,
                  title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    resized = info["resized_to"]
    table.add_row("images", str(info["n_images"]) + (f" (resized to {resized[0]}x{resized[1]})" if resized else ""))
    table.add_row("pixel accuracy", f"{info['pixel_accuracy']:.4f}")
    table.add_row("mean IoU", f"{info['mean_iou']:.4f}")
    for label, value in info["per_class_iou"].items():
        table.add_row(f"IoU of class {label}", "nan (absent)" if math.isnan(value) else f"{value:.4f}")
    console.print(table)


def _evaluate_segmenter(estimator: PriorRegularizedSegmenter, model: Path, data: Path, masks: Path | None,
                        bins: int | None, diagram: Path | None, as_json: bool) -> None:
    if masks is None:
        raise ConfigError(f"model file '{model}' holds a PriorRegularizedSegmenter: pass --masks DIR, the masks of "
                          "the images in --data (paired by name without extension)")
    calibration = [name for name, value in (("--bins", bins), ("--reliability-diagram", diagram)) if value is not None]
    if calibration:
        raise ConfigError(f"{' and '.join(calibration)} measure a classifier's calibration; model file '{model}' "
                          "holds a PriorRegularizedSegmenter, for which evaluate reports IoU: drop "
                          f"{'it' if len(calibration) == 1 else 'them'}")
    info = {"model": str(model), **_segmentation_scores(estimator, data, masks)}
    if as_json:
        # JSON has no NaN: a class without an IoU is null.
        per_class = {label: None if math.isnan(value) else value for label, value in info["per_class_iou"].items()}
        typer.echo(json.dumps({**info, "per_class_iou": per_class}, indent=2))
        return
    _print_segmentation_table(info)


@app.command("evaluate")
@handle_errors
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Model file written by finetune.")],
    data: Annotated[Path, typer.Option("--data", help="Test image folder: one subfolder per class "
                                       "(classification), or the images whose masks are in --masks (segmentation).")],
    masks: Annotated[Optional[Path], typer.Option(
        "--masks", help="(segmentation models) Folder of PNG masks of class ids, one per image in --data, paired "
                        "by name without extension.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    bins: Annotated[Optional[int], typer.Option(
        min=1, help=f"Equal-width confidence bins of the ECE (default: {DEFAULT_BINS}).")] = None,
    diagram: Annotated[Optional[Path], typer.Option(
        "--reliability-diagram", help="Also write a reliability diagram (PNG) to this file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite the reliability diagram if it exists.")] = False,
) -> None:
    """Report accuracy, negative log-likelihood, expected calibration error and Brier score; for a
    segmentation model (with --masks), mean IoU, pixel accuracy and the IoU of each class."""
    estimator = load_model(model, device=resolve_device(device))
    if isinstance(estimator, PriorRegularizedSegmenter):
        _evaluate_segmenter(estimator, model, data, masks, bins, diagram, as_json)
        return
    estimator = check_classifier(estimator, model)
    if masks is not None:
        raise ConfigError(f"--masks is for segmentation models; model file '{model}' holds a "
                          f"{type(estimator).__name__}, which takes the labels from the subfolder names of --data: "
                          "drop --masks")
    bins = DEFAULT_BINS if bins is None else bins
    check_output(diagram, force, inputs=(model,))
    folder = ImageFolder(data, labeled=True)
    classes = np.asarray(estimator.classes_)
    y = _true_class_indices(folder.classes, folder.targets, classes, data)
    proba = estimator.predict_proba(image_dataset(folder.paths, estimator))
    info: dict[str, Any] = {"model": str(model), "data": str(data), "n_images": len(y),
                            "classes": [str(c) for c in classes.tolist()], "bins": bins,
                            **_scores(y, proba, bins), "reliability_diagram": None}
    if diagram is not None:
        reliability_diagram(y, proba, diagram, n_bins=bins, title=f"{model.name} on {data.name}", overwrite=force)
        info["reliability_diagram"] = str(diagram)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    _print_table(info)

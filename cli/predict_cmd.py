"""``bt-transfer predict``: label image files and folders with a fine-tuned model file (a CSV of labels
for a classifier, one PNG mask per image for a segmenter)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from sklearn_bayes_transfer._io import atomic_write
from sklearn_bayes_transfer.data import save_mask
from sklearn_bayes_transfer.exceptions import ConfigError, DataError, OutputExistsError
from sklearn_bayes_transfer.modelfile import ModelFileError, load_model
from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter

from ._app import app, check_output, console, handle_errors, resolve_device
from ._images import (
    MASK_CHUNK,
    ImageFiles,
    check_classifier,
    collect_image_names,
    image_dataset,
    image_file_size,
    model_channels,
)

__all__ = ["predict"]


def _csv(paths: Sequence[Path], labels: np.ndarray, proba: np.ndarray | None, classes: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["path", "label"]
    if proba is not None:
        header += [f"p_{c}" for c in classes.tolist()]
    writer.writerow(header)
    for i, (path, label) in enumerate(zip(paths, labels.tolist())):
        row = [str(path), label]
        if proba is not None:
            row += [format(float(p), ".6g") for p in proba[i]]
        writer.writerow(row)
    return buffer.getvalue()


def _mask_destinations(entries: Sequence[tuple[Path, str]], out_dir: Path, force: bool) -> list[tuple[Path, Path]]:
    """``(image, out_dir/<name>.png)`` for each named image, checked before anything is written.

    An image listed twice is written once; two images that would write one file, or mask files
    that exist (without ``force``), are refused, so a refused run writes nothing.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out-dir '{out_dir}' is a file; give a directory (it is created if missing)")
    source_of: dict[Path, Path] = {}
    for path, name in entries:
        destination = out_dir / f"{name}.png"
        other = source_of.setdefault(destination, path)
        if other.resolve() != path.resolve():
            raise DataError(f"images '{other}' and '{path}' would both write the mask '{destination}'; rename one, "
                            "or name their folder instead (masks then keep the paths inside it)")
    for destination in source_of:
        if destination.is_dir():
            raise IsADirectoryError(f"cannot write the mask '{destination}': it is a directory")
    existing = [destination for destination in source_of if destination.exists()]
    if existing and not force:
        raise OutputExistsError(f"mask file '{existing[0]}' already exists ({len(existing)} of the {len(source_of)} "
                                "masks to write do); pass --force to replace them")
    return [(path, destination) for destination, path in source_of.items()]


def _check_mask_classes(estimator: PriorRegularizedSegmenter, path: Path) -> None:
    classes = np.asarray(estimator.classes_)
    if classes.dtype.kind not in "iu" or classes.min() < 0 or classes.max() > 255:
        raise ConfigError(f"model file '{path}' has class ids {classes.tolist()}, which do not fit an 8-bit PNG "
                          "mask (0..255); predict in Python instead (load_model(...).predict)")


def _predict_masks(estimator: PriorRegularizedSegmenter, paths: Sequence[Path]) -> list[np.ndarray]:
    """One mask ``(H, W)`` of class ids (``uint8``) per image, at the image's own size.

    Images are read at their own size and predicted a few at a time, images of one size
    together: the segmenter resizes them to its input size, if it records one, and brings its
    prediction back to theirs. Every file is checked to be an image before any is predicted.
    """
    sizes = [image_file_size(path) for path in paths]
    images = ImageFiles(paths, channels=model_channels(estimator), image_size=None)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    masks: list[np.ndarray] = [np.empty(0)] * len(paths)
    for indices in by_size.values():
        for start in range(0, len(indices), MASK_CHUNK):
            chunk = indices[start:start + MASK_CHUNK]
            batch = torch.stack([images[i][0] for i in chunk]).numpy()
            for index, mask in zip(chunk, estimator.predict(batch)):
                masks[index] = mask.astype(np.uint8)
    return masks


def _write_masks(estimator: PriorRegularizedSegmenter, images: Sequence[Path], out_dir: Path, force: bool) -> int:
    """Predict every image's mask, then write each (atomically) as ``out_dir/<name>.png``; the number written."""
    targets = _mask_destinations(collect_image_names(images), out_dir, force)
    masks = _predict_masks(estimator, [path for path, _ in targets])
    for (_, destination), mask in zip(targets, masks):
        destination.parent.mkdir(parents=True, exist_ok=True)
        save_mask(mask, destination, overwrite=force)
    return len(targets)


def _check_segmentation_options(path: Path, out: Path | None, out_dir: Path | None, proba: bool) -> Path:
    """The ``--out-dir`` of a segmentation model; the options that write a CSV of labels are refused."""
    if out is not None:
        raise ConfigError(f"--out writes a CSV of labels, but model file '{path}' holds a PriorRegularizedSegmenter, "
                          "which predicts a mask per image; pass --out-dir DIR to write one PNG mask per image")
    if proba:
        raise ConfigError(f"--proba adds class probabilities to a CSV of labels, but model file '{path}' holds a "
                          "PriorRegularizedSegmenter, which writes one PNG mask per image; drop --proba")
    if out_dir is None:
        raise ConfigError(f"model file '{path}' holds a PriorRegularizedSegmenter, which predicts a mask per image; "
                          "pass --out-dir DIR to write them as PNGs (same names as the images)")
    return out_dir


@app.command("predict")
@handle_errors
def predict(
    images: Annotated[list[Path], typer.Argument(
        metavar="IMAGES...", help="Image files, or folders searched recursively for images.")],
    model: Annotated[Path, typer.Option("--model", help="Model file written by finetune.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV file to write (default: print the CSV).")] = None,
    proba: Annotated[bool, typer.Option("--proba", help="Add one probability column per class.")] = False,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out-dir", help="(segmentation models) Folder to write one PNG mask of class ids per image into, named "
                          "as the image (images found in a folder keep their path inside it); created if missing.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT, or the masks in --out-dir, if they "
                                        "exist.")] = False,
) -> None:
    """Predict a label for every image (print or write CSV rows path,label[,p_<class>...]), or, with a
    segmentation model, a mask for every image (PNGs in --out-dir)."""
    estimator = load_model(model, device=resolve_device(device))
    if isinstance(estimator, PriorRegularizedSegmenter):
        out_dir = _check_segmentation_options(model, out, out_dir, proba)
        _check_mask_classes(estimator, model)
        written = _write_masks(estimator, images, out_dir, force)
        console.print(f"wrote {written} masks to {out_dir}", highlight=False, soft_wrap=True)
        return
    estimator = check_classifier(estimator, model)
    if out_dir is not None:
        raise ConfigError(f"--out-dir writes the masks of a segmentation model, but model file '{model}' holds a "
                          f"{type(estimator).__name__}, which predicts one label per image; use --out FILE for a "
                          "CSV of labels (or leave it out to print them)")
    check_output(out, force, inputs=(model,))
    # Files named on the command line, folders expanded recursively (sorted).
    paths = [path for path, _ in collect_image_names(images)]
    probabilities = estimator.predict_proba(image_dataset(paths, estimator))
    if not np.isfinite(probabilities).all():
        row = int(np.flatnonzero(~np.isfinite(probabilities).all(axis=1))[0])
        raise ModelFileError(f"model file '{model}' gives non-finite probabilities (first for '{paths[row]}'); its "
                             "weights cannot be used, nothing was written")
    classes = np.asarray(estimator.classes_)
    labels = classes[probabilities.argmax(axis=1)]
    text = _csv(paths, labels, probabilities if proba else None, classes)
    if out is None:
        typer.echo(text, nl=False)
        return
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=force)
    console.print(f"wrote {out}: {len(paths)} predictions", highlight=False, soft_wrap=True)

"""``bt-transfer predict``: label image files and folders with a fine-tuned model file."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer
from PIL import Image, UnidentifiedImageError

from sklearn_bayes_transfer._io import atomic_write
from sklearn_bayes_transfer.data import IMAGE_EXTENSIONS, ImageFolder, _load_image
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.exceptions import ConfigError, DataError, OutputExistsError
from sklearn_bayes_transfer.modelfile import load_model

from ._app import app, console, handle_errors, resolve_device

__all__ = ["ImageFiles", "check_output", "collect_images", "image_dataset", "load_classifier", "predict"]


def check_output(out: Path | None, force: bool) -> None:
    """Refuse an output file before any work: it exists (without ``--force``) or cannot be written there."""
    if out is None:
        return
    if out.exists() and not force:
        raise OutputExistsError(f"output file '{out}' already exists; pass --force to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"output '{out}' is a directory; give a file name")
    if not out.parent.exists():
        raise FileNotFoundError(f"cannot write '{out}': directory '{out.parent}' does not exist")


def collect_images(arguments: Sequence[Path]) -> list[Path]:
    """Image files named on the command line, with folders expanded recursively (sorted).

    A named file must carry an image extension; a folder must hold at least one image.
    """
    paths: list[Path] = []
    for arg in arguments:
        if not arg.exists():
            raise DataError(f"'{arg}' does not exist")
        if arg.is_dir():
            paths.extend(ImageFolder(arg, labeled=False).paths)
        elif arg.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(arg)
        else:
            raise DataError(f"'{arg}' is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it from the arguments")
    return paths


def load_classifier(path: Path, device: str) -> PriorRegularizedClassifier:
    """The model file's estimator, which must be a classifier (these commands print class labels)."""
    estimator = load_model(path, device=device)
    if not isinstance(estimator, PriorRegularizedClassifier):
        raise ConfigError(f"model file '{path}' holds a {type(estimator).__name__}; this command works with "
                          "classification models (PriorRegularizedClassifier)")
    return estimator


def _image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise DataError(f"'{path}' is not an image file Pillow can read; remove it or move it out of the "
                        "way") from None
    return height, width


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded lazily, one ``(image, 0)`` pair per file, in a common geometry.

    Parameters
    ----------
    paths : sequence of pathlib.Path
    channels : {1, 3} or None
        Convert every image to this many channels.
    image_size : (int, int) or None
        Resize every image to ``(H, W)``; ``None`` keeps each file's own size.
    """

    def __init__(self, paths: Sequence[Path], *, channels: int | None,
                 image_size: tuple[int, int] | None) -> None:
        self.paths = list(paths)
        self.channels = channels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _load_image(self.paths[index], self.channels, self.image_size), 0


def image_dataset(paths: Sequence[Path], estimator: Any) -> ImageFiles:
    """The files in the geometry ``estimator`` expects; every file is checked to be an image first.

    Images are resized to the model's recorded input size; a model without one needs images
    of a single size.
    """
    sizes = [_image_size(path) for path in paths]
    preprocess = getattr(estimator, "preprocess_", None)
    shape = getattr(estimator, "input_shape_", None)
    channels = preprocess.channels if preprocess is not None else (shape[0] if shape else None)
    size = preprocess.image_size if preprocess is not None else None
    if size is None:
        for path, hw in zip(paths, sizes):
            if hw != sizes[0]:
                raise DataError(f"images have different sizes: '{paths[0]}' is {sizes[0][0]}x{sizes[0][1]} and "
                                f"'{path}' is {hw[0]}x{hw[1]} (height x width), and the model records no input "
                                "size to resize them to; resize them to one size first")
    return ImageFiles(paths, channels=channels, image_size=size)


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


@app.command("predict")
@handle_errors
def predict(
    images: Annotated[list[Path], typer.Argument(
        metavar="IMAGES...", help="Image files, or folders searched recursively for images.")],
    model: Annotated[Path, typer.Option("--model", help="Model file written by finetune.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV file to write (default: print the CSV).")] = None,
    proba: Annotated[bool, typer.Option("--proba", help="Add one probability column per class.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Predict a label for every image; print or write CSV rows path,label[,p_<class>...]."""
    check_output(out, force)
    estimator = load_classifier(model, resolve_device(device))
    paths = collect_images(images)
    probabilities = estimator.predict_proba(image_dataset(paths, estimator))
    classes = np.asarray(estimator.classes_)
    labels = classes[probabilities.argmax(axis=1)]
    text = _csv(paths, labels, probabilities if proba else None, classes)
    if out is None:
        typer.echo(text, nl=False)
        return
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=force)
    console.print(f"wrote {out}: {len(paths)} predictions", highlight=False, soft_wrap=True)

"""Images a model is applied to, shared by ``predict`` and ``evaluate``: finding them on the command
line, reading them lazily in the model's geometry, and checking the model's kind."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.data import IMAGE_EXTENSIONS, ImageFolder, load_image
from sklearn_bayes_transfer.exceptions import ConfigError, DataError

__all__ = ["MASK_CHUNK", "ImageFiles", "check_classifier", "collect_image_names", "image_dataset", "image_file_size",
           "model_channels"]

#: Images per ``predict`` call of a segmenter: bounds the (n, classes, H, W) probabilities held at once.
MASK_CHUNK = 16


def collect_image_names(arguments: Sequence[Path]) -> list[tuple[Path, str]]:
    """Image files named on the command line, each with a name for what is written about it.

    A folder is searched recursively (sorted); its images are named by their path relative to it
    without extension (``images/cat/1.png`` -> ``cat/1``, the name by which
    :func:`~sklearn_bayes_transfer.data.load_segmentation_folder` pairs an image with its mask). A
    file named directly is named by its stem, and must carry an image extension; a folder must
    hold at least one image.
    """
    entries: list[tuple[Path, str]] = []
    for arg in arguments:
        if not arg.exists():
            raise DataError(f"'{arg}' does not exist")
        if arg.is_dir():
            entries.extend((path, path.relative_to(arg).with_suffix("").as_posix())
                           for path in ImageFolder(arg, labeled=False).paths)
        elif arg.suffix.lower() in IMAGE_EXTENSIONS:
            entries.append((arg, arg.stem))
        else:
            raise DataError(f"'{arg}' is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it from the arguments")
    return entries


def check_classifier(estimator: Any, path: Path) -> PriorRegularizedClassifier:
    """``estimator``, which must be a classifier (label CSVs and calibration are about classes)."""
    if not isinstance(estimator, PriorRegularizedClassifier):
        raise ConfigError(f"model file '{path}' holds a {type(estimator).__name__}; this command works with "
                          "classification models (PriorRegularizedClassifier)")
    return estimator


def image_file_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise DataError(f"image '{path}' is refused: {exc}; resize it") from None
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
        return load_image(self.paths[index], self.channels, self.image_size), 0


def model_channels(estimator: Any) -> int | None:
    """The number of channels the fitted ``estimator``'s network reads (``None``: unknown)."""
    preprocess = getattr(estimator, "preprocess_", None)
    shape = getattr(estimator, "input_shape_", None)
    return preprocess.channels if preprocess is not None else (shape[0] if shape else None)


def image_dataset(paths: Sequence[Path], estimator: Any) -> ImageFiles:
    """The files in the geometry ``estimator`` expects; every file is checked to be an image first.

    Images are resized to the model's recorded input size; a model without one needs images
    of a single size.
    """
    sizes = [image_file_size(path) for path in paths]
    preprocess = getattr(estimator, "preprocess_", None)
    channels = model_channels(estimator)
    size = preprocess.image_size if preprocess is not None else None
    if size is None:
        for path, hw in zip(paths, sizes):
            if hw != sizes[0]:
                raise DataError(f"images have different sizes: '{paths[0]}' is {sizes[0][0]}x{sizes[0][1]} and "
                                f"'{path}' is {hw[0]}x{hw[1]} (height x width), and the model records no input "
                                "size to resize them to; resize them to one size first")
    return ImageFiles(paths, channels=channels, image_size=size)

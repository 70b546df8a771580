"""``bt-transfer evaluate``: accuracy and calibration of a model file on a labelled image folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.table import Table

from sklearn_bayes_transfer.data import ImageFolder
from sklearn_bayes_transfer.exceptions import DataError
from sklearn_bayes_transfer.metrics import (
    accuracy,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
)

from ._app import app, console, handle_errors, resolve_device
from .predict_cmd import check_output, image_dataset, load_classifier

__all__ = ["evaluate", "true_class_indices"]


def true_class_indices(folder_classes: list[str], targets: np.ndarray, model_classes: np.ndarray,
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


@app.command("evaluate")
@handle_errors
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Model file written by finetune.")],
    data: Annotated[Path, typer.Option("--data", help="Test image folder with one subfolder per class.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    bins: Annotated[int, typer.Option(min=1, help="Equal-width confidence bins of the ECE.")] = 15,
    diagram: Annotated[Optional[Path], typer.Option(
        "--reliability-diagram", help="Also write a reliability diagram (PNG) to this file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite the reliability diagram if it exists.")] = False,
) -> None:
    """Report accuracy, negative log-likelihood, expected calibration error and Brier score."""
    check_output(diagram, force)
    estimator = load_classifier(model, resolve_device(device))
    folder = ImageFolder(data, labeled=True)
    classes = np.asarray(estimator.classes_)
    y = true_class_indices(folder.classes, folder.targets, classes, data)
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

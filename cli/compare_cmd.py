"""``bt-transfer compare``: standard fine-tuning and each prior, the same recipe and seeds, one table."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.table import Table
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.exceptions import ConfigError, DataError
from sklearn_bayes_transfer.metrics import (
    accuracy,
    comparison_chart,
    expected_calibration_error,
    negative_log_likelihood,
)
from sklearn_bayes_transfer.prior import Prior
from sklearn_bayes_transfer.tuning import FINETUNE_DEFAULT, default_param_grid, prefer_default

from ._app import app, check_output, console, handle_errors, resolve_device
from ._options import (
    RECIPE_DEFAULTS,
    AugmentOption,
    BatchNormOption,
    BatchSizeOption,
    LrOption,
    LrScheduleOption,
    MaxEpochsOption,
    MinStepsOption,
    MomentumOption,
    OptimizerOption,
    WarmupOption,
    load_geometry,
    parse_image_size,
    recipe_arguments,
)
from ._resume import refuse_several_processes

__all__ = ["compare"]


class ScaleMethod(str, Enum):
    """How each prior's scale is set: ``auto`` (finetune's default), ``evidence`` (one fit), ``cv``
    (tune's 3-fold grid, finetune's default kept unless clearly beaten)."""

    AUTO = "auto"
    EVIDENCE = "evidence"
    CV = "cv"


def _candidates(priors: list[Path], methods: list[ScaleMethod], standard: bool) -> list[tuple[str, Path, dict]]:
    """(row name, prior file, how to fit) for every candidate, standard fine-tuning first."""
    rows = []
    if standard:
        rows.append(("standard fine-tuning", priors[0], {"prior_structure": "none"}))
    for path in priors:
        for method in methods:
            rows.append((f"{path.name}, scale {method.value}", path, {"scale": method}))
    return rows


def _load_folders(prior: Prior, size: tuple[int, int] | None, data: Path, test: Path) -> tuple:
    """(preprocessing, training images and labels, test images and labels) in the prior's geometry."""
    preprocess, load_size, channels = load_geometry(prior, size)
    Xtr, ytr = load_image_folder(data, image_size=load_size, channels=channels)
    try:
        Xte, yte = load_image_folder(test, image_size=load_size or tuple(Xtr.shape[-2:]), channels=channels)
    except DataError as exc:
        raise DataError(f"--test: {exc}") from None
    unseen = sorted(set(yte.tolist()) - set(ytr.tolist()))
    if unseen:
        raise DataError(f"--test has classes that --data has not: {', '.join(map(str, unseen[:5]))}")
    return preprocess, Xtr, ytr, Xte, yte


def _fit(estimator: PriorRegularizedClassifier, how: dict, prior: Prior, X: np.ndarray, y: np.ndarray,
         seed: int, n_jobs: int) -> Any:
    method = how.get("scale")
    if method is None:
        return clone(estimator).set_params(**how).fit(X, y)
    if method is ScaleMethod.CV:
        # Every candidate fit is seeded: n_jobs spreads them over the cores without changing results.
        search = GridSearchCV(clone(estimator), default_param_grid(prior), error_score="raise", n_jobs=n_jobs,
                              cv=StratifiedKFold(3, shuffle=True, random_state=seed),
                              refit=prefer_default(FINETUNE_DEFAULT, prior))
        return search.fit(X, y)
    return clone(estimator).set_params(prior_scale=method.value).fit(X, y)


def _scores(model: Any, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    proba = model.predict_proba(X)
    classes = model.classes_
    return {"accuracy": accuracy(y, classes[proba.argmax(1)]),
            "nll": negative_log_likelihood(y, proba, classes=classes),
            "ece": expected_calibration_error(y, proba, classes=classes)}


def _pixel_baselines(train: Path, test: Path) -> list[dict[str, Any]]:
    Xtr, ytr = load_image_folder(train, channels=1)
    try:
        Xte, yte = load_image_folder(test, image_size=tuple(Xtr.shape[-2:]), channels=1)
    except DataError as exc:
        raise DataError(f"--test: {exc}") from None
    Xtr, Xte = Xtr.reshape(len(Xtr), -1), Xte.reshape(len(Xte), -1)
    rows = []
    for name, model in (("logistic regression (pixels)", LogisticRegression(max_iter=5000)),
                        ("1-NN (pixels)", KNeighborsClassifier(1))):
        start = time.perf_counter()
        model.fit(Xtr, ytr)
        rows.append({"name": name, "runs": [{**_scores(model, Xte, yte), "seconds": time.perf_counter() - start}]})
    return rows


def _summary(runs: list[dict[str, float]], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _plot(rows: list[dict[str, Any]], path: Path, force: bool) -> None:
    stats = [_summary(r["runs"], "accuracy") for r in rows]
    comparison_chart([r["name"] for r in rows], [m for m, _ in stats], [s for _, s in stats], path, overwrite=force)


@app.command("compare")
@handle_errors
def compare(
    data: Annotated[Path, typer.Option("--data", help="Training images: one subfolder per class.")],
    test: Annotated[Path, typer.Option("--test", help="Test images, the same classes as subfolders.")],
    prior: Annotated[list[Path], typer.Option("--prior", help="A prior file; repeat for several.")],
    scale: Annotated[list[ScaleMethod], typer.Option(
        "--scale", help="How each prior's scale is set (repeat for several rows per prior): auto = finetune's "
                        "default, evidence = chosen during one fit, cv = tune's cross-validated grid.")] = [
        ScaleMethod.AUTO],  # noqa: B006 - typer reads the default list, it is never mutated
    standard: Annotated[bool, typer.Option("--standard/--no-standard", help="Include standard fine-tuning "
                                           "(the first prior's backbone and mean, no prior term).")] = True,
    seeds: Annotated[int, typer.Option(min=1, help="Fits per candidate, seeded --random-state, +1, ...")] = 3,
    random_state: Annotated[int, typer.Option(help="The first seed.")] = 0,
    max_epochs: MaxEpochsOption = None,
    min_steps: MinStepsOption = RECIPE_DEFAULTS["min_steps"],
    lr: LrOption = RECIPE_DEFAULTS["lr"],
    batch_size: BatchSizeOption = RECIPE_DEFAULTS["batch_size"],
    optimizer: OptimizerOption = RECIPE_DEFAULTS["optimizer"],
    momentum: MomentumOption = None,
    lr_schedule: LrScheduleOption = RECIPE_DEFAULTS["lr_schedule"],
    warmup: WarmupOption = RECIPE_DEFAULTS["warmup"],
    augment: AugmentOption = RECIPE_DEFAULTS["augment"],
    batchnorm: BatchNormOption = RECIPE_DEFAULTS["batchnorm"],
    image_size: Annotated[Optional[str], typer.Option(
        help="Resize images to N or HxW pixels (default: the size recorded in each prior).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a bar chart of the accuracies as PNG "
                                                 "(needs matplotlib).")] = None,
    n_jobs: Annotated[int, typer.Option(help="Parallel fits of the --scale cv grid (GridSearchCV n_jobs).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --plot if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress spinner.")] = False,
) -> None:
    """Fine-tune standard and with each prior (the same recipe, budget and seeds), evaluate on --test, and print
    accuracy, NLL, ECE and fit time beside logistic regression and 1-NN on the pixels."""
    refuse_several_processes("compare")
    if not prior:
        raise ConfigError("compare needs at least one --prior")
    methods = list(dict.fromkeys(scale))
    recipe = recipe_arguments(max_epochs=max_epochs, min_steps=min_steps, lr=lr, batch_size=batch_size,
                              optimizer=optimizer, momentum=momentum, lr_schedule=lr_schedule, warmup=warmup,
                              augment=augment, batchnorm=batchnorm)
    check_output(plot, force)
    device = resolve_device(device)
    size = parse_image_size(image_size)
    priors = {path: Prior.load(path) for path in prior}
    loaded_data: dict[Path, tuple] = {}  # the folders as each prior's geometry reads them, once per prior
    rows = []
    candidates = _candidates(prior, methods, standard)
    status = f"fine-tuning {len(candidates)} candidate(s) x {seeds} seed(s) ..."
    with console.status(status, spinner="dots") if not quiet and not as_json else contextlib.nullcontext():
        for name, path, how in candidates:
            loaded = priors[path]
            if path not in loaded_data:
                loaded_data[path] = _load_folders(loaded, size, data, test)
            preprocess, Xtr, ytr, Xte, yte = loaded_data[path]
            runs = []
            for seed in range(random_state, random_state + seeds):
                estimator = PriorRegularizedClassifier(loaded, preprocess=preprocess, device=device, verbose=0,
                                                       random_state=seed, **recipe)
                start = time.perf_counter()
                model = _fit(estimator, how, loaded, Xtr, ytr, seed, n_jobs)
                runs.append({**_scores(model, Xte, yte), "seconds": time.perf_counter() - start, "seed": seed,
                             "prior_scale": getattr(getattr(model, "best_estimator_", model), "prior_scale_", None)})
            rows.append({"name": name, "prior": str(path), "runs": runs})
        rows += _pixel_baselines(data, test)
    if plot is not None:
        _plot(rows, plot, force)
    if as_json:
        typer.echo(json.dumps({"rows": rows}, indent=2))
        return
    table = Table(title=f"{data} -> {test}: test metrics, mean +- std over {seeds} seed(s)", title_justify="left")
    for column in ("candidate", "accuracy", "NLL", "ECE", "fit s"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in rows:
        cells = [f"{m:.3f} +- {s:.3f}" for m, s in (_summary(row["runs"], k) for k in ("accuracy", "nll", "ece"))]
        table.add_row(row["name"], *cells, f"{_summary(row['runs'], 'seconds')[0]:.1f}")
    console.print(table)
    if plot is not None:
        console.print(f"wrote {plot}", highlight=False)

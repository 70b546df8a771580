"""``bt-transfer tune``: cross-validated search over the prior scale (and standard fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.table import Table
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.metrics import SCORERS, get_scorer
from sklearn_bayes_transfer.modelfile import save_model
from sklearn_bayes_transfer.optim import OptimizerName, optimizer_arguments
from sklearn_bayes_transfer.prior import Prior, PriorStructure
from sklearn_bayes_transfer.tuning import DEFAULT_DECADES, default_param_grid, results_table

from ._app import app, check_output, console, handle_errors, resolve_device
from .finetune_cmd import _check_number, _preprocessing
from .fit_prior_cmd import parse_image_size

__all__ = ["tune", "parse_scales"]


def parse_scales(text: str | None) -> list[float] | None:
    """``"1e-2,1,1e2"`` -> ``[0.01, 1.0, 100.0]``; every value must be a finite number > 0."""
    if text is None:
        return None
    scales = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--prior-scale: {part.strip()!r} is not a number; give a comma-separated list "
                              "such as 1e-2,1,1e2") from None
        _check_number(value, "--prior-scale", low=0.0, low_open=True)
        scales.append(value)
    return scales


def _describe(params: dict) -> str:
    if params.get("prior_structure") == PriorStructure.NONE.value:
        return "standard fine-tuning (no prior)"
    return f"{params.get('prior_structure')}, scale {params.get('prior_scale'):.3g}"


@app.command("tune")
@handle_errors
def tune(
    prior: Annotated[Path, typer.Option("--prior", help="Prior file.")],
    data: Annotated[Path, typer.Option("--data", help="Image folder with one subfolder per class.")],
    prior_scale: Annotated[Optional[str], typer.Option(
        help="Comma-separated scales to try, e.g. 1e-2,1,1e2 (default: lambda_0 * 10**k for k in "
             f"{list(DEFAULT_DECADES)}, lambda_0 being the prior's reference scale).")] = None,
    structures: Annotated[str, typer.Option(
        help="Comma-separated prior structures searched with every scale (lowrank, diag, isotropic).")] = "lowrank",
    standard: Annotated[bool, typer.Option(
        "--standard/--no-standard", help="Include standard fine-tuning (no prior) as a candidate.")] = True,
    cv: Annotated[int, typer.Option(min=2, help="Cross-validation folds (stratified).")] = 3,
    scoring: Annotated[str, typer.Option(help=f"Selection score: {', '.join(SCORERS)}.")] = "accuracy",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the best candidate, refitted on all images, "
                                                "as a model file.")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per fit.")] = 20,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.01,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    optimizer: Annotated[OptimizerName, typer.Option(help="sgd, adam or fop.")] = OptimizerName.SGD,
    momentum: Annotated[float, typer.Option(help="Momentum of sgd and fop.")] = 0.9,
    image_size: Annotated[Optional[str], typer.Option(help="Resize images to N or HxW pixels.")] = None,
    n_jobs: Annotated[int, typer.Option(help="Parallel fits (GridSearchCV n_jobs).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (folds, initialisation, shuffling).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result table as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Grid-search the prior scale by cross-validation; print every candidate's mean and spread."""
    scales = parse_scales(prior_scale)
    scorer = get_scorer(scoring)
    _check_number(lr, "--lr", low=0.0, low_open=True)
    if out is not None:
        check_output(out, force)
    device = resolve_device(device)
    prior_obj = Prior.load(prior)
    wanted = [s.strip() for s in structures.split(",") if s.strip()]
    grid = default_param_grid(prior_obj, scales=scales, structures=wanted, include_none=standard)
    preprocess, load_size, channels = _preprocessing(prior_obj, parse_image_size(image_size))
    X, y = load_image_folder(data, image_size=load_size, channels=channels)
    labels, counts = np.unique(y, return_counts=True)
    if counts.min() < cv:
        raise ConfigError(f"--cv {cv} needs at least {cv} images of every class, but class {labels[counts.argmin()]!r} "
                          f"has {counts.min()}; lower --cv or add images")
    estimator = PriorRegularizedClassifier(prior_obj, preprocess=preprocess, lr=lr, max_epochs=epochs,
                                           batch_size=batch_size, device=device, verbose=0,
                                           iterator_train__shuffle=True,
                                           **optimizer_arguments(optimizer, momentum=momentum))
    search = GridSearchCV(estimator, grid, cv=StratifiedKFold(cv, shuffle=True, random_state=seed),
                          scoring=scorer, n_jobs=n_jobs, refit=out is not None, error_score="raise")
    n_candidates = sum(len(g.get("prior_scale", [None])) * len(g["prior_structure"]) for g in grid)
    torch.manual_seed(seed)
    with console.status(f"fitting {n_candidates} candidates x {cv} folds on {len(y)} images ...", spinner="dots"):
        search.fit(X, y)
    rows = results_table(search.cv_results_)
    if as_json:
        typer.echo(json.dumps({"scoring": scoring, "reference_scale": prior_obj.reference_scale(), "results": rows},
                              indent=2))
    else:
        table = Table(title=f"{cv}-fold cross-validated {scoring} (reference scale lambda_0 = "
                            f"{prior_obj.reference_scale():.3g})", title_justify="left")
        for column in ("rank", "candidate", "mean", "std", "fit s"):
            table.add_column(column, justify="left" if column == "candidate" else "right")
        for row in rows:
            table.add_row(str(row["rank"]), _describe(row["params"]), f"{row['mean']:.4f}", f"{row['std']:.4f}",
                          f"{row['fit_time']:.1f}")
        console.print(table)
        console.print(f"best: {_describe(search.best_params_)}", highlight=False)
    if out is not None:
        save_model(search.best_estimator_, out, overwrite=force)
        console.print(f"wrote {out} (best candidate refitted on all {len(y)} images)", highlight=False)

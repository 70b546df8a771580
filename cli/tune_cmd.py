"""``bt-transfer tune``: cross-validated search over the prior scale (and standard fine-tuning),
beside logistic regression on the pixels; or the scale chosen by the Laplace evidence in one fit."""

from __future__ import annotations

import contextlib
import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import joblib
import numpy as np
import typer
from rich.table import Table
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score

from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.metrics import SCORERS, get_scorer
from sklearn_bayes_transfer.modelfile import save_model
from sklearn_bayes_transfer.prior import Prior, PriorStructure
from sklearn_bayes_transfer.tuning import (
    DEFAULT_DECADES,
    FINETUNE_DEFAULT,
    default_param_grid,
    prefer_default,
    results_table,
)

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
    check_options,
    load_geometry,
    parse_image_size,
    recipe_arguments,
)
from ._resume import refuse_several_processes

__all__ = ["tune"]


class TuneMethod(str, Enum):
    """How ``tune`` chooses the prior scale.

    - ``"cv"``: a cross-validated grid of scales (and structures, and standard fine-tuning);
    - ``"evidence"``: one fit per structure on all images with ``prior_scale="evidence"``, the
      structure of largest log evidence chosen.
    """

    CV = "cv"
    EVIDENCE = "evidence"


#: The row of the pixel baseline in the result table.
PIXEL_BASELINE = "logistic regression (pixels)"


def _parse_scales(text: str | None) -> list[float] | None:
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
        check_options(prior_scale=value)
        scales.append(value)
    return scales


def _parse_structures(text: str) -> list[str]:
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    allowed = [s.value for s in PriorStructure if s is not PriorStructure.NONE]
    bad = [s for s in wanted if s not in allowed]
    if bad or not wanted:
        raise ConfigError(f"--structures: {', '.join(map(repr, bad)) or 'nothing given'} is not valid; give a "
                          f"comma-separated list of {', '.join(allowed)} (standard fine-tuning is --standard)")
    return wanted


def _describe(params: dict) -> str:
    if params.get("prior_structure") == PriorStructure.NONE.value:
        return "standard fine-tuning (no prior)"
    return f"{params.get('prior_structure')}, scale {params.get('prior_scale'):.3g}"


def _pixel_baseline(X: np.ndarray, y: np.ndarray, folds: StratifiedKFold, scoring: str) -> dict:
    """Logistic regression on the raw pixels, cross-validated on the same folds as the candidates."""
    flat = X.reshape(len(X), -1)
    scores = cross_val_score(LogisticRegression(max_iter=2000), flat, y, cv=folds, scoring=get_scorer(scoring))
    return {"name": PIXEL_BASELINE, "mean": float(np.mean(scores)), "std": float(np.std(scores))}


@app.command("tune")
@handle_errors
def tune(
    prior: Annotated[Path, typer.Option("--prior", help="Prior file.")],
    data: Annotated[Path, typer.Option("--data", help="Image folder with one subfolder per class.")],
    method: Annotated[TuneMethod, typer.Option(
        help="cv: cross-validated grid of prior scales; evidence: one fit per structure, the scale re-estimated "
             "during it by maximising the Laplace evidence (no grid, no folds; --standard does not apply).")
    ] = TuneMethod.CV,
    prior_scale: Annotated[Optional[str], typer.Option(
        help="Comma-separated scales to try, e.g. 1e-2,1,1e2 (default: lambda_0 * 10**k for k in "
             f"{list(DEFAULT_DECADES)}, lambda_0 being the prior's reference scale). With --method evidence: "
             "the lowest and highest bound the search (default lambda_0 * 10**-3 to 10**9).")] = None,
    structures: Annotated[str, typer.Option(
        help="Comma-separated prior structures searched with every scale (lowrank, diag, isotropic).")] = "lowrank",
    standard: Annotated[bool, typer.Option(
        "--standard/--no-standard", help="Include standard fine-tuning (no prior) as a candidate.")] = True,
    cv: Annotated[int, typer.Option(min=2, help="Cross-validation folds (stratified).")] = 3,
    scoring: Annotated[str, typer.Option(help=f"Selection score: {', '.join(SCORERS)}.")] = "accuracy",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the best candidate, refitted on all images, "
                                                "as a model file.")] = None,
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
        help="Resize images to N or HxW pixels (default: the size recorded in the prior).")] = None,
    n_jobs: Annotated[int, typer.Option(help="Parallel fits on this machine (GridSearchCV n_jobs).")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Address of a Dask scheduler (tcp://host:8786) to run the fits on its workers instead; they need the "
             "prior file at the same path (it travels by reference) and sklearn-bayes-transfer[distributed].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    random_state: Annotated[int, typer.Option(help="Random seed (folds, initialisation, shuffling).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result table as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress spinner.")] = False,
) -> None:
    """Grid-search the prior scale by cross-validation with finetune's recipe; print every candidate's mean and
    spread beside logistic regression on the pixels. finetune's default candidate is kept unless another beats it
    by more than one standard error of the fold-by-fold difference."""
    refuse_several_processes("tune")
    scales = _parse_scales(prior_scale)
    wanted = _parse_structures(structures)
    get_scorer(scoring)
    recipe = recipe_arguments(max_epochs=max_epochs, min_steps=min_steps, lr=lr, batch_size=batch_size,
                              optimizer=optimizer, momentum=momentum, lr_schedule=lr_schedule, warmup=warmup,
                              augment=augment, batchnorm=batchnorm)
    if out is not None:
        check_output(out, force, inputs=(prior,))
    if method is TuneMethod.EVIDENCE and scales is not None and len(scales) < 2:
        raise ConfigError("--prior-scale with --method evidence gives the bounds of the search: at least two values, "
                          "e.g. 1e-2,1e8")
    device = resolve_device(device)
    prior_obj = Prior.load(prior)
    grid = default_param_grid(prior_obj, scales=scales, structures=wanted, include_none=standard)
    preprocess, load_size, channels = load_geometry(prior_obj, parse_image_size(image_size))
    X, y = load_image_folder(data, image_size=load_size, channels=channels)
    # Seeded per fit, so every candidate trains the same way whatever the order or --n-jobs.
    estimator = PriorRegularizedClassifier(prior_obj, preprocess=preprocess, device=device, verbose=0,
                                           random_state=random_state, **recipe)
    if method is TuneMethod.EVIDENCE:
        bounds = (min(scales), max(scales)) if scales else None
        _tune_by_evidence(estimator, wanted, bounds, X, y, out=out, force=force, as_json=as_json, quiet=quiet)
        return
    labels, counts = np.unique(y, return_counts=True)
    if counts.min() < cv:
        raise ConfigError(f"--cv {cv} needs at least {cv} images of every class, but class {str(labels[counts.argmin()])!r} "
                          f"has {int(counts.min())}; lower --cv or add images")
    folds = StratifiedKFold(cv, shuffle=True, random_state=random_state)
    # finetune's default candidate stays unless another beats it beyond the folds' noise.
    choose = prefer_default(FINETUNE_DEFAULT, prior_obj)
    search = GridSearchCV(estimator, grid, cv=folds, scoring=get_scorer(scoring), n_jobs=n_jobs,
                          refit=choose if out is not None else False, error_score="raise")
    n_candidates = sum(len(g.get("prior_scale", [None])) * len(g["prior_structure"]) for g in grid)
    status = f"fitting {n_candidates} candidates x {cv} folds on {len(y)} images ..."
    with console.status(status, spinner="dots") if not quiet and not as_json else contextlib.nullcontext(), \
            _dask_backend(scheduler, search):
        search.fit(X, y)
        baseline = _pixel_baseline(X, y, folds, scoring)
    rows = results_table(search.cv_results_)
    chosen = search.cv_results_["params"][choose(search.cv_results_)]
    for row in rows:
        row["chosen"] = row["params"] == chosen
    why = ("finetune's default: no candidate beat it by more than one standard error of the fold-by-fold difference"
           if chosen != rows[0]["params"] else "the best mean")
    if as_json:
        typer.echo(json.dumps({"scoring": scoring, "reference_scale": prior_obj.reference_scale(), "results": rows,
                               "chosen": chosen, "baselines": [baseline]}, indent=2))
    else:
        table = Table(title=f"{cv}-fold cross-validated {scoring} (reference scale lambda_0 = "
                            f"{prior_obj.reference_scale():.3g})", title_justify="left")
        for column in ("rank", "candidate", "mean", "std", "fit s", "chosen"):
            table.add_column(column, justify="left" if column == "candidate" else "right")
        for row in rows:
            table.add_row(str(row["rank"]), _describe(row["params"]), f"{row['mean']:.4f}", f"{row['std']:.4f}",
                          f"{row['fit_time']:.1f}", "*" if row["chosen"] else "")
        table.add_row("", baseline["name"], f"{baseline['mean']:.4f}", f"{baseline['std']:.4f}", "", "")
        console.print(table)
        console.print(f"chosen: {_describe(chosen)} ({why})", highlight=False)
    if out is not None:
        save_model(search.best_estimator_, out, overwrite=force)
        if not as_json:
            console.print(f"wrote {out} (best candidate refitted on all {len(y)} images)", highlight=False)


def _tune_by_evidence(estimator: PriorRegularizedClassifier, structures: list[str],
                      bounds: tuple[float, float] | None, X: np.ndarray, y: np.ndarray, *, out: Path | None,
                      force: bool, as_json: bool, quiet: bool) -> None:
    """One fit per structure with ``prior_scale="evidence"``; the largest final log evidence wins."""
    rows, fitted = [], []
    status = f"fitting {len(structures)} structure(s) with the evidence-chosen scale on {len(y)} images ..."
    with console.status(status, spinner="dots") if not quiet and not as_json else contextlib.nullcontext():
        for structure in structures:
            model = clone(estimator).set_params(prior_structure=structure, prior_scale="evidence",
                                                prior_scale_bounds=bounds)
            start = time.perf_counter()
            model.fit(X, y)
            trace = getattr(model, "evidence_trace_", [])
            rows.append({"params": {"prior_structure": structure, "prior_scale": float(model.prior_scale_)},
                         "log_evidence": trace[-1]["log_evidence"] if trace else float("nan"),
                         "fit_time": time.perf_counter() - start, "trace": trace})
            fitted.append(model)
    best = int(np.nanargmax([row["log_evidence"] for row in rows])) if rows else 0
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    chosen = rows[best]["params"]
    if as_json:
        typer.echo(json.dumps({"method": "evidence", "results": rows, "chosen": chosen}, indent=2))
    else:
        table = Table(title="prior scale by the Laplace evidence (one fit each, on all images)", title_justify="left")
        for column in ("candidate", "log evidence", "fit s", "chosen"):
            table.add_column(column, justify="left" if column == "candidate" else "right")
        for row in rows:
            table.add_row(_describe(row["params"]), f"{row['log_evidence']:.2f}", f"{row['fit_time']:.1f}",
                          "*" if row["chosen"] else "")
        console.print(table)
        console.print(f"chosen: {_describe(chosen)} (the largest log evidence)", highlight=False)
    if out is not None:
        save_model(fitted[best], out, overwrite=force)
        if not as_json:
            console.print(f"wrote {out} (the chosen fit, on all {len(y)} images)", highlight=False)


@contextlib.contextmanager
def _dask_backend(address: str | None, search: GridSearchCV):
    """Run the search's fits on a Dask cluster (``--scheduler``), or do nothing without an address."""
    if address is None:
        yield
        return
    try:
        from dask.distributed import Client
    except ImportError:
        raise ConfigError("--scheduler needs Dask: pip install 'sklearn-bayes-transfer[distributed]'") from None
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"--scheduler {address}: no Dask scheduler answers there ({str(exc)[:120]}); start one "
                          "(dask scheduler) or check the address") from None
    search.set_params(n_jobs=-1)
    try:
        with joblib.parallel_backend("dask"):
            yield
    finally:
        client.close()

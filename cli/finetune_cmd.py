"""``bt-transfer finetune``: fine-tune on a folder of labelled images with a prior; write a model file."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer
from skorch.callbacks import EpochScoring, ProgressBar
from skorch.dataset import ValidSplit

from sklearn_bayes_transfer.bayes import Inference
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier, index_accuracy
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.modelfile import save_model
from sklearn_bayes_transfer.prior import Prior, PriorStructure

from ._app import app, console, handle_errors, resolve_device
from .fit_prior_cmd import parse_image_size
from .predict_cmd import check_output

__all__ = ["OptimizerName", "finetune"]


class OptimizerName(str, Enum):
    """The optimizer ``finetune`` trains with.

    - ``"sgd"``: :class:`torch.optim.SGD` with ``--momentum``; the prior's stiff diagonal part
      is then applied as an exact proximal step, stable for every ``--prior-scale``;
    - ``"adam"``: :class:`torch.optim.Adam` (the whole prior term goes through the gradient);
    - ``"fop"``: :class:`sklearn_bayes_transfer.optim.FOP`, SGD with learned first-order
      preconditioning, with ``--momentum``.
    """

    SGD = "sgd"
    ADAM = "adam"
    FOP = "fop"


def _optimizer(name: OptimizerName, momentum: float) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its skorch ``optimizer__`` arguments."""
    if name is OptimizerName.ADAM:
        return torch.optim.Adam, {}
    if name is OptimizerName.FOP:
        # Imported here so the other optimizers do not depend on it.
        from sklearn_bayes_transfer.optim import FOP

        return FOP, {"optimizer__momentum": momentum}
    return torch.optim.SGD, {"optimizer__momentum": momentum}


def _check_number(value: float, option: str, *, low: float, high: float = math.inf, low_open: bool = False,
                  high_open: bool = False) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        bounds = f"{'>' if low_open else '>='} {low:g}"
        if math.isfinite(high):
            bounds += f" and {'<' if high_open else '<='} {high:g}"
        raise ConfigError(f"{option} must be a finite number {bounds}, got {value:g}")


def _check_options(prior_scale: float, prior_eps: float, head_weight_decay: float, lr: float, momentum: float,
                   valid_fraction: float) -> None:
    """Refuse bad numbers by their option names, before anything is loaded."""
    _check_number(prior_scale, "--prior-scale", low=0.0, low_open=True)
    _check_number(prior_eps, "--prior-eps", low=0.0)
    _check_number(head_weight_decay, "--head-weight-decay", low=0.0)
    _check_number(lr, "--lr", low=0.0, low_open=True)
    _check_number(momentum, "--momentum", low=0.0, high=1.0, high_open=True)
    _check_number(valid_fraction, "--valid-fraction", low=0.0, high=1.0, high_open=True)


def _preprocessing(prior: Prior, size: int | tuple[int, int] | None) -> tuple[Any, int | tuple[int, int] | None,
                                                                             int | None]:
    """``(estimator preprocess, size to load images at, channels to load them with)``.

    Images are loaded at ``--image-size`` when given, else at the prior's recorded size, so that
    folders of mixed sizes work whenever the prior says what its backbone saw.
    """
    recorded = prior.meta.get("preprocess") or None
    if recorded is None:
        return "auto", size, None
    if size is None:
        return "auto", recorded.get("image_size"), recorded.get("channels")
    pair = [size, size] if isinstance(size, int) else list(size)
    return {**recorded, "image_size": pair}, size, recorded.get("channels")


def _check_split_sizes(y: np.ndarray, fraction: float) -> None:
    """A stratified split needs at least one example of every class on each side."""
    n, n_classes = len(y), len(np.unique(y))
    n_valid = math.ceil(fraction * n)
    if n_valid < n_classes or n - n_valid < n_classes:
        raise ConfigError(f"--valid-fraction {fraction:g} of {n} images gives {n_valid} validation and {n - n_valid} "
                          f"training images, but a stratified split needs at least {n_classes} (one per class) on "
                          "each side; choose another fraction or train on all images (--valid-fraction 0)")


def _classifier(prior: Prior, *, preprocess: Any, split: ValidSplit | None, optimizer: OptimizerName,
                momentum: float, quiet: bool, **params: Any) -> PriorRegularizedClassifier:
    optimizer_cls, optimizer_args = _optimizer(optimizer, momentum)
    callbacks: list[tuple[str, Any]] = [
        ("train_accuracy", EpochScoring(index_accuracy, on_train=True, name="train_acc", lower_is_better=False)),
    ]
    if not quiet:
        callbacks.append(("progress", ProgressBar(postfix_keys=["train_loss"])))
    return PriorRegularizedClassifier(
        prior, preprocess=preprocess, train_split=split, optimizer=optimizer_cls, callbacks=callbacks,
        iterator_train__shuffle=True, verbose=0 if quiet else 1,
        **optimizer_args, **params)


def _summary(estimator: PriorRegularizedClassifier, out: Path, n_images: int) -> str:
    last = estimator.history[-1]
    classes = ", ".join(str(c) for c in estimator.classes_)
    text = (f"wrote {out}: {len(estimator.classes_)} classes ({classes}), {n_images} images, {len(estimator.history)} "
            f"epochs; last epoch: train loss {last['task_loss']:.4g} + prior term {last['prior_nll']:.4g}, "
            f"train accuracy {last['train_acc']:.3f}")
    if "valid_loss" in last:
        text += f"; valid loss {last['valid_loss']:.4g}, valid accuracy {last['valid_acc']:.3f}"
    return text


@app.command("finetune")
@handle_errors
def finetune(
    prior: Annotated[Path, typer.Option("--prior", help="Prior file (from fit-prior, convert-official or "
                                        "Prior.save).")],
    data: Annotated[Path, typer.Option("--data", help="Image folder with one subfolder per class.")],
    out: Annotated[Path, typer.Option("--out", help="Model file to write (read by predict and evaluate).")],
    prior_scale: Annotated[float, typer.Option(help="lambda > 0: scales the prior covariance; 1 is the posterior "
                                               "as learned. Search it on a log grid (see `inspect`).")] = 1.0,
    prior_eps: Annotated[float, typer.Option(help="Jitter >= 0 added to the prior covariance's diagonal.")] = 0.0,
    prior_structure: Annotated[PriorStructure, typer.Option(
        help="Which part of the prior covariance to use; 'none' is standard fine-tuning.")] = PriorStructure.LOWRANK,
    head_weight_decay: Annotated[float, typer.Option(
        help="Precision of the zero-mean Gaussian prior on the new classification head.")] = 1.0,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 20,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.01,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    optimizer: Annotated[OptimizerName, typer.Option(help="sgd (stable for every prior scale), adam, or fop "
                                                     "(SGD with learned preconditioning).")] = OptimizerName.SGD,
    momentum: Annotated[Optional[float], typer.Option(
        help="Momentum of sgd and fop (default: 0.9, or 0 with --inference sgld, which needs plain SGD).")] = None,
    inference: Annotated[Inference, typer.Option(
        help="map: predict with the fitted weights; swag / sgld: average predictions over posterior samples "
             "collected over the second half of training (SWAG, or Langevin dynamics with --optimizer sgd "
             "and no momentum).")] = Inference.MAP,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Posterior samples to average with "
                                         "--inference swag or sgld.")] = 20,
    valid_fraction: Annotated[float, typer.Option(
        help="Hold out this fraction (stratified) to report validation metrics; 0 trains on all images.")] = 0.0,
    image_size: Annotated[Optional[str], typer.Option(
        help="Resize images to N or HxW pixels (default: the size recorded in the prior).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (head initialisation, shuffling, split).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-epoch log or progress bar.")] = False,
) -> None:
    """Fine-tune the prior's backbone with a new head on labelled images; save a model file."""
    if momentum is None:
        momentum = 0.0 if inference is Inference.SGLD else 0.9
    _check_options(prior_scale, prior_eps, head_weight_decay, lr, momentum, valid_fraction)
    check_output(out, force)  # before training, not after minutes of it
    size = parse_image_size(image_size)
    device = resolve_device(device)
    prior_obj = Prior.load(prior)
    preprocess, load_size, channels = _preprocessing(prior_obj, size)
    X, y = load_image_folder(data, image_size=load_size, channels=channels)
    split = None
    if valid_fraction > 0:
        _check_split_sizes(y, valid_fraction)
        split = ValidSplit(valid_fraction, stratified=True, random_state=seed)
    estimator = _classifier(
        prior_obj, preprocess=preprocess, split=split, optimizer=optimizer, momentum=momentum, quiet=quiet,
        prior_scale=prior_scale, prior_eps=prior_eps, prior_structure=prior_structure.value,
        head_weight_decay=head_weight_decay, lr=lr, max_epochs=epochs, batch_size=batch_size, device=device,
        inference=inference.value, n_samples=samples, random_state=seed)
    torch.manual_seed(seed)
    estimator.fit(X, y)
    save_model(estimator, out, overwrite=force)
    console.print(_summary(estimator, out, len(y)), highlight=False, soft_wrap=True)

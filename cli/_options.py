"""Options and checks that several commands share: the fine-tuning recipe, image sizes, numbers.

The recipe's defaults are the estimators' (:mod:`sklearn_bayes_transfer.recipe`), so ``finetune``,
``tune`` and the Python API train the same way unless told otherwise.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from sklearn_bayes_transfer._validation import Interval, Real, check_params
from sklearn_bayes_transfer.augment import Augment
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.optim import OptimizerName, optimizer_arguments
from sklearn_bayes_transfer.prior import Prior
from sklearn_bayes_transfer.recipe import (
    AUTO_SCALE_DECADES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MIN_STEPS,
    DEFAULT_MOMENTUM,
    DEFAULT_WARMUP,
    BatchNormUpdate,
    LRSchedule,
)
from sklearn_bayes_transfer.sampling import Inference
from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter

__all__ = [
    "AugmentOption",
    "BatchNormOption",
    "BatchSizeOption",
    "LrOption",
    "LrScheduleOption",
    "MaxEpochsOption",
    "MinStepsOption",
    "MomentumOption",
    "OptimizerOption",
    "WarmupOption",
    "check_options",
    "load_geometry",
    "parse_image_size",
    "parse_backbone_kwargs",
    "parse_prior_scale",
    "recipe_arguments",
]

MaxEpochsOption = Annotated[Optional[int], typer.Option(
    "--max-epochs", min=1, show_default=False,
    help="Training epochs (default: the fewest that make --min-steps optimizer steps).")]
MinStepsOption = Annotated[int, typer.Option(
    "--min-steps", min=1, help="Step budget when --max-epochs is not given.")]
LrOption = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
OptimizerOption = Annotated[OptimizerName, typer.Option(
    "--optimizer", help="sgd (the prior then acts through an exact proximal step, stable for every prior scale), "
                        "adam, or fop (SGD with learned preconditioning).")]
MomentumOption = Annotated[Optional[float], typer.Option(
    "--momentum", show_default=False,
    help=f"Momentum of sgd and fop (default: {DEFAULT_MOMENTUM:g}, or 0 with --inference sgld).")]
LrScheduleOption = Annotated[LRSchedule, typer.Option(
    "--lr-schedule", help="cosine: linear warm-up then cosine decay; constant: --lr throughout.")]
WarmupOption = Annotated[float, typer.Option("--warmup", help="Fraction of the steps spent warming up.")]
AugmentOption = Annotated[Augment, typer.Option(
    "--augment", help="Augmentation of training images: light (small shifts, zooms, rotations; no flips), "
                      "light-flip (the same with left-right flips) or none.")]
BatchNormOption = Annotated[BatchNormUpdate, typer.Option(
    "--batchnorm", help="recompute: BatchNorm statistics recomputed over the training images at the end; "
                        "running: PyTorch's running averages.")]

#: The defaults of the options above, for the commands' signatures.
RECIPE_DEFAULTS: dict[str, Any] = {
    "lr": DEFAULT_LR, "batch_size": DEFAULT_BATCH_SIZE, "min_steps": DEFAULT_MIN_STEPS, "warmup": DEFAULT_WARMUP,
    "lr_schedule": LRSchedule.COSINE, "augment": Augment.LIGHT, "batchnorm": BatchNormUpdate.RECOMPUTE,
    "optimizer": OptimizerName.SGD,
}


#: The command line's own constraints: stricter than the estimators' (a zero learning rate trains
#: nothing), or for options the estimators do not have.
_CLI_CONSTRAINTS: dict[str, list[Any]] = {
    "lr": [Interval(Real, 0, None, closed="neither")],
    "momentum": [Interval(Real, 0, 1, closed="left")],
    "valid_fraction": [Interval(Real, 0, 1, closed="left")],
    "prior_scale": [Interval(Real, 0, None, closed="neither")],
}


def check_options(**values: Any) -> None:
    """Check option values with the estimators' constraints (and the command line's own), naming
    each by its flag: ``check_options(lr=0)`` fails with ``--lr 0 is not valid; expected ...``."""
    constraints = {**PriorRegularizedSegmenter._all_parameter_constraints(),
                   **PriorRegularizedClassifier._all_parameter_constraints(), **_CLI_CONSTRAINTS}
    check_params(values, {k: constraints[k] for k in values}, names={k: "--" + k.replace("_", "-") for k in values})


def parse_prior_scale(text: str, option: str = "--prior-scale") -> float | str:
    """``"auto"``, ``"evidence"`` or a finite number > 0, from the command line."""
    if text.strip().lower() in ("auto", "evidence"):
        return text.strip().lower()
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{option}: {text.strip()!r} is neither a number, 'auto' (lambda_0 * "
                          f"10**{AUTO_SCALE_DECADES}, lambda_0 being the prior's reference scale) nor 'evidence' "
                          "(chosen during the fit by the Laplace evidence)") from None
    check_options(prior_scale=value)
    return value


def parse_image_size(text: Optional[str]) -> int | tuple[int, int] | None:
    """``"32"`` -> 32, ``"28x32"`` -> (28, 32) (height x width), ``None`` -> None."""
    if text is None:
        return None
    parts = text.lower().replace(" ", "").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise typer.BadParameter(f"{text!r} is not an image size; use N (square) or HxW, e.g. 32 or 28x32",
                                 param_hint="--image-size")
    return values[0] if len(values) == 1 else (values[0], values[1])


def recipe_arguments(*, max_epochs: int | None, min_steps: int, lr: float, batch_size: int,
                     optimizer: OptimizerName, momentum: float | None, lr_schedule: LRSchedule, warmup: float,
                     augment: Augment, batchnorm: BatchNormUpdate,
                     inference: Inference = Inference.MAP) -> dict[str, Any]:
    """Estimator keyword arguments for the recipe options, checked by their option names."""
    if momentum is None:
        momentum = 0.0 if inference is Inference.SGLD else DEFAULT_MOMENTUM
    check_options(lr=lr, momentum=momentum, warmup=warmup)
    return {"max_epochs": max_epochs, "min_steps": min_steps, "lr": lr, "batch_size": batch_size,
            "lr_schedule": lr_schedule.value, "warmup": warmup, "augment": augment.value,
            "batchnorm": batchnorm.value, **optimizer_arguments(optimizer, momentum=momentum)}


def load_geometry(prior: Prior, size: int | tuple[int, int] | None, *, resize_to_prior: bool = True
                  ) -> tuple[Any, int | tuple[int, int] | None, int | None]:
    """``(estimator preprocess, size to load images at, channels to load them with)``.

    Images are loaded at ``--image-size`` when given, else (``resize_to_prior``, classification) at
    the prior's recorded size, so folders of mixed sizes work whenever the prior says what its
    backbone saw; segmentation keeps the images' own size unless ``--image-size`` is given.
    """
    recorded = prior.meta.get("preprocess") or None
    if recorded is None:
        return "auto", size, None
    if size is None:
        return "auto", recorded.get("image_size") if resize_to_prior else None, recorded.get("channels")
    pair = [size, size] if isinstance(size, int) else list(size)
    return {**recorded, "image_size": pair}, size, recorded.get("channels")


def parse_backbone_kwargs(text: Optional[str]) -> dict[str, Any] | None:
    """``--backbone-kwargs``: a JSON object, or ``None`` when not given."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--backbone-kwargs must be a JSON object such as '{{\"width\": 8}}': {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--backbone-kwargs must be a JSON object such as '{{\"width\": 8}}', got {text!r}")
    return value

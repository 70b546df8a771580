"""``bt-transfer finetune``: fine-tune with a prior on labelled images (a class per image, or a mask
per image with ``--task segmentation``); write a model file."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from skorch.callbacks import EarlyStopping, EpochScoring, ProgressBar
from skorch.dataset import ValidSplit

from sklearn_bayes_transfer.checkpoint import FitCheckpoint
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier, index_accuracy
from sklearn_bayes_transfer.data import load_image_folder, load_segmentation_folder
from sklearn_bayes_transfer.distributed import is_main_process
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.modelfile import save_model
from sklearn_bayes_transfer.prior import Prior, PriorStructure
from sklearn_bayes_transfer.sampling import Inference
from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter, SegmentationHead

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
    parse_prior_scale,
    recipe_arguments,
)
from ._resume import (
    CheckpointDirOption,
    ForceOption,
    ResumeOption,
    check_checkpoint_options,
    interrupted,
)

__all__ = ["finetune"]

#: ``--ignore-index`` when not given: the "void" value of Pascal VOC-style masks.
DEFAULT_IGNORE_INDEX = 255


class Task(str, Enum):
    """What ``finetune`` learns from the images in ``--data``.

    - ``"classification"``: one label per image, the name of its class subfolder
      (:class:`~sklearn_bayes_transfer.PriorRegularizedClassifier`);
    - ``"segmentation"``: one class id per pixel, from the PNG mask of the same name in
      ``--masks`` (:class:`~sklearn_bayes_transfer.segmenter.PriorRegularizedSegmenter`).
    """

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


def _check_options(prior_eps: float, head_weight_decay: float, valid_fraction: float,
                   early_stopping: int | None) -> None:
    """Refuse bad numbers and combinations by their option names, before anything is loaded."""
    check_options(prior_eps=prior_eps, head_weight_decay=head_weight_decay, valid_fraction=valid_fraction)
    if early_stopping is not None and valid_fraction == 0:
        raise ConfigError("--early-stopping watches the validation loss: hold out images with --valid-fraction "
                          "(e.g. 0.2)")


def _check_task_options(task: Task, masks: Path | None, ignore_index: int | None,
                        head: SegmentationHead | None) -> None:
    """Refuse, by name, options the task does not use, and a segmentation run without masks."""
    if task is Task.SEGMENTATION:
        if masks is None:
            raise ConfigError("--task segmentation needs --masks DIR: a folder of PNG masks of class ids, one per "
                              "image in --data, with the image's name")
        return
    given = [name for name, value in (("--masks", masks), ("--ignore-index", ignore_index), ("--head", head))
             if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to --task segmentation; "
                          "a classification folder takes its labels from its subfolder names: drop "
                          f"{'it' if len(given) == 1 else 'them'} or pass --task segmentation")


def _load_data(task: Task, data: Path, masks: Path | None, size: int | tuple[int, int] | None,
               channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Images and their targets: class names (classification) or masks of class ids (segmentation)."""
    if task is Task.SEGMENTATION:
        # predict writes masks as 8-bit PNGs: class ids beyond 255 are refused now, not after training.
        return load_segmentation_folder(data, masks, image_size=size, channels=channels, max_id=255)
    return load_image_folder(data, image_size=size, channels=channels)


def _check_split_sizes(y: np.ndarray, fraction: float, task: Task = Task.CLASSIFICATION) -> None:
    """A split needs training and validation images; a stratified one, every class on each side."""
    n = len(y)
    n_valid = math.ceil(fraction * n)
    if task is Task.CLASSIFICATION:
        need = len(np.unique(y))
        rule = f"a stratified split needs at least {need} (one per class)"
    else:
        need, rule = 1, "a split needs at least one image"
    if n_valid < need or n - n_valid < need:
        raise ConfigError(f"--valid-fraction {fraction:g} of {n} images gives {n_valid} validation and {n - n_valid} "
                          f"training images, but {rule} on each side; choose another fraction or train on all "
                          "images (--valid-fraction 0)")


def _split(task: Task, y: np.ndarray, fraction: float, seed: int) -> ValidSplit | None:
    if fraction == 0:
        return None
    _check_split_sizes(y, fraction, task)
    # Masks have no single label per image to stratify on.
    return ValidSplit(fraction, stratified=task is Task.CLASSIFICATION, random_state=seed)


def _shared_kwargs(*, preprocess: Any, split: ValidSplit | None, quiet: bool, early_stopping: int | None,
                   scores: list[tuple[str, Any]], checkpoint: FitCheckpoint | None = None,
                   **params: Any) -> dict[str, Any]:
    """Keyword arguments both estimators take: preprocessing, split, logging, hyperparameters.

    ``scores`` are the task's per-epoch metric callbacks.
    """
    callbacks = list(scores)
    if early_stopping is not None:
        callbacks.append(("early_stopping", EarlyStopping(patience=early_stopping, load_best=True)))
    if not quiet:
        callbacks.append(("progress", ProgressBar(postfix_keys=["train_loss"])))
    if checkpoint is not None:
        callbacks.append(("checkpoint", checkpoint))  # after the others: it saves what they left
    return {"preprocess": preprocess, "train_split": split, "callbacks": callbacks, "verbose": 0 if quiet else 1,
            **params}


def _estimator(task: Task, prior: Prior, *, ignore_index: int | None, head: SegmentationHead | None,
               split: ValidSplit | None, **options: Any) -> PriorRegularizedClassifier | PriorRegularizedSegmenter:
    """The task's estimator; ``options`` are those of :func:`_shared_kwargs`."""
    if task is Task.SEGMENTATION:
        # The segmenter logs train_miou (and valid_miou) itself.
        return PriorRegularizedSegmenter(
            prior, ignore_index=DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index,
            head=(head or SegmentationHead.FCN).value, **_shared_kwargs(split=split, scores=[], **options))
    # The validation accuracy is a default callback of skorch's classifier.
    scores = [("train_accuracy", EpochScoring(index_accuracy, on_train=True, name="train_acc",
                                              lower_is_better=False))]
    return PriorRegularizedClassifier(prior, **_shared_kwargs(split=split, scores=scores, **options))


#: History key suffix and printed name of each task's per-epoch metric.
_METRIC = {Task.CLASSIFICATION: ("acc", "accuracy"), Task.SEGMENTATION: ("miou", "mIoU")}


def _summary(estimator: PriorRegularizedClassifier | PriorRegularizedSegmenter, out: Path, n_images: int,
             task: Task = Task.CLASSIFICATION) -> str:
    key, name = _METRIC[task]
    last = estimator.history[-1]
    classes = ", ".join(str(c) for c in estimator.classes_)
    plan = estimator.training_plan_
    scale = estimator.prior_scale_
    prior = "no prior" if scale is None else f"prior scale {scale:.3g}"
    if scale is not None and getattr(estimator, "evidence_trace_", None):
        prior += f" (by evidence, log evidence {estimator.evidence_trace_[-1]['log_evidence']:.1f})"
    text = (f"wrote {out}: {len(estimator.classes_)} classes ({classes}), {n_images} images, {len(estimator.history)} "
            f"epochs ({len(estimator.history) * plan.steps_per_epoch} steps), {prior}; last epoch: train loss "
            f"{last['task_loss']:.4g} + prior term {last['prior_nll']:.4g}, train {name} {last[f'train_{key}']:.3f}")
    if "valid_loss" in last:
        text += f"; valid loss {last['valid_loss']:.4g}, valid {name} {last[f'valid_{key}']:.3f}"
    return text


@app.command("finetune")
@handle_errors
def finetune(
    prior: Annotated[Path, typer.Option("--prior", help="Prior file (from fit-prior, convert-official or "
                                        "Prior.save).")],
    data: Annotated[Path, typer.Option("--data", help="Image folder: one subfolder per class (classification), "
                                       "or the images whose masks are in --masks (segmentation).")],
    out: Annotated[Path, typer.Option("--out", help="Model file to write (read by predict and evaluate).")],
    task: Annotated[Task, typer.Option(help="classification: a label per image, from its subfolder; "
                                       "segmentation: a class id per pixel, from --masks.")] = Task.CLASSIFICATION,
    masks: Annotated[Optional[Path], typer.Option(
        "--masks", help="(segmentation) Folder of PNG masks of class ids, one per image in --data, paired by name "
                        "without extension (sub-folders by relative path).")] = None,
    ignore_index: Annotated[Optional[int], typer.Option(
        help=f"(segmentation) Mask value of pixels to leave out of the loss and the metrics "
             f"(default: {DEFAULT_IGNORE_INDEX}).", show_default=False)] = None,
    head: Annotated[Optional[SegmentationHead], typer.Option(
        help="(segmentation) The new head: fcn (default), or deeplabv3 with atrous spatial pyramid pooling.",
        show_default=False)] = None,
    prior_scale: Annotated[str, typer.Option(
        help="lambda > 0 scaling the prior covariance; auto: lambda_0 * 1e3, lambda_0 being the prior's reference "
             "scale (see `inspect`); evidence: re-estimated during the fit by maximising the Laplace evidence of "
             "the training data. 1 is the posterior as learned, which pins the backbone; `tune` searches "
             "it.")] = "auto",
    prior_eps: Annotated[float, typer.Option(help="Jitter >= 0 added to the prior covariance's diagonal.")] = 0.0,
    prior_structure: Annotated[PriorStructure, typer.Option(
        help="Which part of the prior covariance to use; 'none' is standard fine-tuning.")] = PriorStructure.LOWRANK,
    head_weight_decay: Annotated[float, typer.Option(
        help="Precision of the zero-mean Gaussian prior on the new head.")] = 1.0,
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
    inference: Annotated[Inference, typer.Option(
        help="map: predict with the fitted weights; swag / sgld: average predictions over posterior samples "
             "collected over the second half of training (SWAG, or Langevin dynamics with --optimizer sgd "
             "and no momentum); laplace: over draws from the Laplace posterior at the fitted weights "
             "(see docs/evidence.md for its limits).")] = Inference.MAP,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Posterior samples to average with "
                                         "--inference swag, sgld or laplace.")] = 20,
    valid_fraction: Annotated[float, typer.Option(
        help="Hold out this fraction (stratified by class for classification) to report validation metrics; "
             "0 trains on all images.")] = 0.0,
    early_stopping: Annotated[Optional[int], typer.Option(
        min=1, show_default=False, help="Stop when the validation loss has not improved for this many epochs and "
                                        "keep the best weights (needs --valid-fraction).")] = None,
    image_size: Annotated[Optional[str], typer.Option(
        help="Resize images to N or HxW pixels (default: classification, the size recorded in the prior; "
             "segmentation, each image's own size).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    random_state: Annotated[int, typer.Option(help="Random seed (head initialisation, shuffling, split).")] = 0,
    checkpoint_dir: CheckpointDirOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-epoch log or progress bar.")] = False,
) -> None:
    """Fine-tune the prior's backbone with a new head on labelled images or masks; save a model file."""
    scale = parse_prior_scale(prior_scale)
    _check_options(prior_eps, head_weight_decay, valid_fraction, early_stopping)
    recipe = recipe_arguments(max_epochs=max_epochs, min_steps=min_steps, lr=lr, batch_size=batch_size,
                              optimizer=optimizer, momentum=momentum, lr_schedule=lr_schedule, warmup=warmup,
                              augment=augment, batchnorm=batchnorm, inference=inference)
    _check_task_options(task, masks, ignore_index, head)
    check_output(out, force, inputs=(prior,))  # before training, not after minutes of it
    check_checkpoint_options(checkpoint_dir, resume, force)
    checkpoint = FitCheckpoint(checkpoint_dir, resume=resume) if checkpoint_dir is not None else None
    size = parse_image_size(image_size)
    device = resolve_device(device)
    prior_obj = Prior.load(prior)
    preprocess, load_size, channels = load_geometry(prior_obj, size,
                                                    resize_to_prior=task is Task.CLASSIFICATION)
    X, y = _load_data(task, data, masks, load_size, channels)
    split = _split(task, y, valid_fraction, random_state)
    estimator = _estimator(
        task, prior_obj, ignore_index=ignore_index, head=head, preprocess=preprocess, split=split, quiet=quiet,
        early_stopping=early_stopping, prior_scale=scale, prior_eps=prior_eps,
        prior_structure=prior_structure.value, head_weight_decay=head_weight_decay, device=device,
        inference=inference.value, n_samples=samples, random_state=random_state, checkpoint=checkpoint, **recipe)
    try:
        estimator.fit(X, y)
    except KeyboardInterrupt:
        if checkpoint_dir is None:
            raise
        interrupted(out, checkpoint_dir)
    if not is_main_process():
        return  # launched with several processes: the main one writes the model and reports
    save_model(estimator, out, overwrite=force)
    console.print(_summary(estimator, out, len(y), task), highlight=False, soft_wrap=True)

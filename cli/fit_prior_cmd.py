"""``bt-transfer fit-prior``: learn a SWAG prior on a folder of source images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sklearn_bayes_transfer.distributed import is_main_process
from sklearn_bayes_transfer.fitter import PriorFitter, SourceTask
from sklearn_bayes_transfer.optim import OptimizerName

from ._app import app, check_output, console, handle_errors, resolve_device
from ._options import parse_backbone_kwargs, parse_image_size
from ._resume import (
    CheckpointDirOption,
    ForceOption,
    ResumeOption,
    check_checkpoint_options,
    interrupted,
)

__all__ = ["fit_prior"]


@app.command("fit-prior")
@handle_errors
def fit_prior(
    data: Annotated[Path, typer.Option("--data", help="Image folder: one subfolder per class (supervised); "
                                       "for simclr any images below it, labelled or not.")],
    out: Annotated[Path, typer.Option("--out", help="Prior file to write.")],
    task: Annotated[SourceTask, typer.Option("--task", help="Source task.")] = SourceTask.SUPERVISED,
    backbone: Annotated[str, typer.Option(help="Registered backbone: resnet18, resnet34, resnet50, "
                                          "small_cnn, ...")] = "resnet18",
    backbone_kwargs: Annotated[Optional[str], typer.Option(
        help="Backbone arguments as JSON, e.g. '{\"width\": 8}'. in_channels and small_input are "
             "inferred from the images when not given.")] = None,
    max_epochs: Annotated[int, typer.Option(min=1, help="Training epochs, SWAG collection included.")] = 30,
    swag_start: Annotated[Optional[int], typer.Option(
        min=0, help="Epochs before SWAG collection starts (default: half of --max-epochs).")] = None,
    rank: Annotated[int, typer.Option(help="Rank K of the low-rank covariance (>= 2).")] = 10,
    collect_every: Annotated[int, typer.Option(min=1, help="Collect a SWAG snapshot every N epochs.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate before collection.")] = 0.05,
    optimizer: Annotated[OptimizerName, typer.Option(help="sgd, adam or fop (SGD with learned "
                                                     "preconditioning).")] = OptimizerName.SGD,
    swag_lr: Annotated[float, typer.Option(help="Learning rate during SWAG collection.")] = 0.01,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    image_size: Annotated[Optional[str], typer.Option(
        help="Resize images to N or HxW pixels (required when the images differ in size).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    random_state: Annotated[int, typer.Option(help="Random seed.")] = 0,
    checkpoint_dir: CheckpointDirOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-epoch log or progress bar.")] = False,
) -> None:
    """Train a backbone on source images, collect a SWAG posterior and save it as a prior file."""
    check_output(out, force)  # before training, not after minutes of it
    check_checkpoint_options(checkpoint_dir, resume, force)
    fitter = PriorFitter(
        backbone=backbone, backbone_kwargs=parse_backbone_kwargs(backbone_kwargs), source_task=task,
        max_epochs=max_epochs, swag_start=swag_start, rank=rank, collect_every=collect_every, lr=lr, optimizer=optimizer.value,
        swag_lr=swag_lr, batch_size=batch_size, image_size=parse_image_size(image_size),
        device=resolve_device(device), random_state=random_state, verbose=0 if quiet else 1,
        checkpoint_dir=checkpoint_dir, resume=resume,
    )
    try:
        fitter.fit(str(data))
    except KeyboardInterrupt:
        if checkpoint_dir is None:
            raise
        interrupted(out, checkpoint_dir)
    fitter.save_prior(out, overwrite=force)
    if not is_main_process():
        return  # launched with several processes: the main one wrote the file and reports it
    prior = fitter.prior_
    meta = prior.meta
    console.print(
        f"wrote {out}: {meta['backbone']} ({meta['source_task']}), D = {prior.n_params:,}, K = {prior.rank}, "
        f"{meta['n_snapshots']} snapshots from {meta['n_source_examples']} images, "
        f"final train loss {meta['final_train_loss']:.4g}",
        highlight=False,
    )

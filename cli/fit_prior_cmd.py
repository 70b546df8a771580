"""``bt-transfer fit-prior``: learn a SWAG prior on a folder of source images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sklearn_bayes_transfer.checkpoint import prepare_checkpoint_dir
from sklearn_bayes_transfer.distributed import is_main_process
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.fitter import PriorFitter, SourceTask
from sklearn_bayes_transfer.optim import OptimizerName

from ._app import app, check_output, console, fail, handle_errors, resolve_device
from ._options import parse_backbone_kwargs, parse_image_size

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
    backbone_kwargs: Annotated[str | None, typer.Option(
        help="Backbone arguments as JSON, e.g. '{\"width\": 8}'. in_channels and small_input are "
             "inferred from the images when not given.")] = None,
    max_epochs: Annotated[int, typer.Option(min=1, help="Training epochs, SWAG collection included.")] = 30,
    swag_start: Annotated[int | None, typer.Option(
        min=0, help="Epochs before SWAG collection starts (default: half of --max-epochs).")] = None,
    rank: Annotated[int, typer.Option(help="Rank K of the low-rank covariance (>= 2).")] = 10,
    collect_every: Annotated[int, typer.Option(min=1, help="Collect a SWAG snapshot every N epochs.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate before collection.")] = 0.05,
    optimizer: Annotated[OptimizerName, typer.Option(help="sgd, adam or fop (SGD with learned "
                                                     "preconditioning).")] = OptimizerName.SGD,
    swag_lr: Annotated[float, typer.Option(help="Learning rate during SWAG collection.")] = 0.01,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    image_size: Annotated[str | None, typer.Option(
        help="Resize images to N or HxW pixels (required when the images differ in size).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    random_state: Annotated[int, typer.Option(help="Random seed.")] = 0,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Save a checkpoint there after every epoch; a killed run continues with --resume, losing at "
             "most one epoch.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run checkpointed in --checkpoint-dir "
                                         "(same options; a fresh start if it holds none).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists (and start over a checkpoint "
                                        "in --checkpoint-dir unless --resume).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-epoch log or progress bar.")] = False,
) -> None:
    """Train a backbone on source images, collect a SWAG posterior and save it as a prior file."""
    check_output(out, force)  # before training, not after minutes of it
    if resume and checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir: the directory of the run to continue")
    if checkpoint_dir is not None:
        prepare_checkpoint_dir(checkpoint_dir, resume=resume, restart=force)
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
        fail(f"interrupted; {out} not written, the checkpoint in '{checkpoint_dir}' keeps the finished epochs: "
             "rerun with --resume to continue", code=130)
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

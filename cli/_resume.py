"""Runs that last: ``--checkpoint-dir`` / ``--resume`` of ``fit-prior`` and ``finetune``, and launches with
several processes (which ``tune`` and ``compare`` refuse)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from sklearn_bayes_transfer.checkpoint import prepare_checkpoint_dir
from sklearn_bayes_transfer.distributed import launched_processes
from sklearn_bayes_transfer.exceptions import ConfigError

from ._app import fail

__all__ = ["CheckpointDirOption", "ForceOption", "ResumeOption", "check_checkpoint_options", "interrupted",
           "refuse_several_processes"]

CheckpointDirOption = Annotated[Optional[Path], typer.Option(
    help="Save a checkpoint there after every epoch; a killed run continues with --resume, losing at most one "
         "epoch.")]
ResumeOption = Annotated[bool, typer.Option(
    "--resume", help="Continue the run checkpointed in --checkpoint-dir (same options; a fresh start if it holds "
                     "none).")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Overwrite OUT if it exists (and start over a checkpoint in --checkpoint-dir unless --resume).")]


def check_checkpoint_options(checkpoint_dir: Path | None, resume: bool, force: bool) -> None:
    """Refuse unusable checkpoint options before any work (``--force`` deletes an old checkpoint)."""
    if resume and checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir: the directory of the run to continue")
    if checkpoint_dir is not None:
        prepare_checkpoint_dir(checkpoint_dir, resume=resume, restart=force)


def interrupted(out: Path, checkpoint_dir: Path) -> NoReturn:
    """Ctrl-C with checkpoints: say what is kept and how to go on, exit 130."""
    fail(f"interrupted; {out} not written, the checkpoint in '{checkpoint_dir}' keeps the finished epochs: "
         "rerun with --resume to continue", code=130)
    raise AssertionError("unreachable")  # fail() raises typer.Exit


def refuse_several_processes(command: str) -> None:
    """``tune`` and ``compare`` run many fits of their own: one process (their fits may use --n-jobs)."""
    processes = launched_processes()
    if processes > 1:
        raise ConfigError(f"{command} was launched with {processes} processes (WORLD_SIZE), but it runs in one; "
                          "launch fit-prior or finetune with torchrun / accelerate launch, and run "
                          f"{command} without them (--n-jobs runs its fits in parallel)")

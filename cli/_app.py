"""The Typer application object and the helpers every command shares.

Commands live one per module and register themselves on :data:`app`; they stay thin: parse,
call the library, print, exit. Library errors become one-line messages and exit code 1.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from sklearn_bayes_transfer import __version__
from sklearn_bayes_transfer._device import resolve_device as _resolve_device
from sklearn_bayes_transfer._io import check_output_path
from sklearn_bayes_transfer.exceptions import BayesTransferError, OutputExistsError

__all__ = ["app", "console", "err_console", "handle_errors", "fail", "resolve_device", "check_output"]

app = typer.Typer(
    name="bt-transfer",
    help="Bayesian transfer learning with informative priors: fit a prior on a source task, "
    "then fine-tune with it on a downstream task.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    """Print ``message`` as one line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library errors (and file-system errors) into one-line messages and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (BayesTransferError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError) as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted; nothing written", code=130)

    return wrapper  # type: ignore[return-value]


def check_output(out: Path | None, force: bool, *, inputs: tuple[Path | None, ...] = ()) -> None:
    """Refuse an output file before any work: it exists (without ``--force``), is not a regular
    file, cannot be written there, or is one of the command's ``inputs``."""
    if out is None:
        return
    check_output_path(out, overwrite=force)
    for source in inputs:
        if source is not None and out.exists() and source.exists() and os.path.samefile(out, source):
            raise OutputExistsError(f"output '{out}' is the input file '{source}'; write to another file")


def resolve_device(device: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked as the library checks it."""
    return _resolve_device(device, "--device")


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"bt-transfer (sklearn-bayes-transfer) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Show the version and exit.",
                                 callback=_version_callback, is_eager=True),
) -> None:
    """Bayesian transfer learning with informative priors."""

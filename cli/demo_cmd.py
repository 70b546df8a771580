"""``bt-transfer demo``: the embedded default job (digits 0-4 -> 5-9), no data to download."""

from __future__ import annotations

import json
import statistics
import time
from typing import Annotated

import typer
from rich.table import Table

from sklearn_bayes_transfer.demo import digits_transfer_demo, fit_digits_prior
from sklearn_bayes_transfer.recipe import DEFAULT_MIN_STEPS

from ._app import app, console, handle_errors
from ._options import MaxEpochsOption, MinStepsOption

__all__ = ["demo"]


@app.command("demo")
@handle_errors
def demo(
    labels_per_class: Annotated[int, typer.Option(min=1, max=100, help="Training labels per target class.")] = 10,
    seeds: Annotated[int, typer.Option(min=1, help="Number of few-shot draws (seeds 0..N-1); 3 gives a steadier comparison.")] = 1,
    max_epochs: MaxEpochsOption = None,
    min_steps: MinStepsOption = DEFAULT_MIN_STEPS,
    source_epochs: Annotated[int, typer.Option(min=2, help="Epochs of prior fitting on digits 0-4.")] = 20,
    width: Annotated[int, typer.Option(min=1, help="Channels of the small CNN's first layer.")] = 16,
    rank: Annotated[int, typer.Option(min=2, help="Rank K of the prior's low-rank covariance.")] = 10,
    cv: Annotated[int, typer.Option(min=2, help="Folds of the prior-scale search.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Fit a prior on digits 0-4, fine-tune on 5-9 with few labels: standard vs learned prior vs logistic
    regression on the pixels."""
    start = time.perf_counter()
    with console.status("fitting a SWAG prior on digits 0-4 ...", spinner="dots"):
        prior = fit_digits_prior(max_epochs=source_epochs, width=width, rank=rank)
    with console.status("fine-tuning on digits 5-9 ...", spinner="dots"):
        rows = digits_transfer_demo(labels_per_class=labels_per_class, seeds=range(seeds), max_epochs=max_epochs,
                                    min_steps=min_steps, prior=prior, tune_cv=cv)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"digits 0-4 -> 5-9, {labels_per_class} labels per class; accuracy on the other "
                        "target images", title_justify="left")
    for column in ("seed", "variant", "accuracy", "chosen by CV"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["seed"]), row["variant"], f"{row['accuracy']:.3f}", row.get("chosen", ""))
    console.print(table)
    for variant in dict.fromkeys(row["variant"] for row in rows):
        scores = [row["accuracy"] for row in rows if row["variant"] == variant]
        spread = f" +- {statistics.stdev(scores):.3f}" if len(scores) > 1 else ""
        console.print(f"{variant}: mean accuracy {statistics.mean(scores):.3f}{spread} over {len(scores)} seed(s)",
                      highlight=False)
    console.print(f"prior: {prior!r}, reference scale {prior.reference_scale():.3g}; "
                  f"{time.perf_counter() - start:.0f} s in all", highlight=False)

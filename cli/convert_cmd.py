"""``bt-transfer convert`` (between the two file formats of priors and model files) and ``convert-official`` (import a prior
released with the paper's code)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from sklearn_bayes_transfer.modelfile import MODEL_FORMAT_NAME, convert_model
from sklearn_bayes_transfer.prior import FactorNormalization, Prior

from ._app import app, check_output, console, handle_errors

__all__ = ["convert", "convert_official"]


@app.command("convert")
@handle_errors
def convert(
    prior: Annotated[Path, typer.Argument(help="Prior or model file, in either format (read by content).")],
    out: Annotated[Path, typer.Argument(help="File to write: safetensors for a name ending in .safetensors, "
                                        "else a torch file.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Convert a prior (or a fine-tuned model file) between the torch and the safetensors file formats."""
    check_output(out, force, inputs=(prior,))
    kind = "safetensors" if str(out).endswith(".safetensors") else "torch"
    payload = Prior.read_payload(prior)  # read once; its format says which kind of file it is
    if isinstance(payload, dict) and payload.get("format") == MODEL_FORMAT_NAME:
        convert_model(prior, out, overwrite=force)
        console.print(f"wrote {out} ({kind}): the model file {prior}, same content", highlight=False)
        return
    loaded = Prior.from_dict(payload, source=str(prior))
    loaded.save(out, overwrite=force)
    console.print(f"wrote {out} ({kind}): D = {loaded.n_params:,}, K = {loaded.rank}, digest {loaded.digest()[:12]}",
                  highlight=False)


@app.command("convert-official")
@handle_errors
def convert_official(
    prefix: Annotated[str, typer.Argument(help="Shared prefix of <prefix>_model.pt, _mean.pt, _variance.pt "
                                          "and _covmat.pt (hsouri/BayesianTransferLearning).")],
    out: Annotated[Path, typer.Argument(help="Prior file to write.")],
    factor_normalization: Annotated[FactorNormalization, typer.Option(
        help="How the covmat rows are scaled; 'auto' detects raw vs sqrt(K-1)-normalised rows.")] =
        FactorNormalization.AUTO,
    backbone: Annotated[str, typer.Option(help="Registered backbone name the state_dict belongs to.")] = "resnet50",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Convert the official four-file prior format into one prior file (format version 1)."""
    check_output(out, force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prior = Prior.from_official(prefix, factor_normalization=factor_normalization, backbone=backbone)
    for w in caught:
        console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False)
    info = prior.meta["import"]
    how = "detected" if info["detected"] else "given"
    console.print(f"factor rows {how} as [bold]{info['factor_normalization']}[/bold] "
                  f"(median sum(covmat**2)/variance = {info['row_sq_sum_over_variance_median']:.3g}, K = {prior.rank}); "
                  f"mean matches the model file: {info['mean_matches_model']}", highlight=False)
    prior.save(out, overwrite=force)
    console.print(f"wrote {out}: D = {prior.n_params:,}, K = {prior.rank}")

"""``bt-transfer inspect``: what a prior file or a model file holds, without loading it into memory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sklearn_bayes_transfer._io import check_input_file
from sklearn_bayes_transfer.checkpoint import CHECKPOINT_FORMAT, checkpoint_summary
from sklearn_bayes_transfer.exceptions import PriorFormatError
from sklearn_bayes_transfer.modelfile import MODEL_FORMAT_NAME, model_summary
from sklearn_bayes_transfer.prior import Prior

from ._app import app, console, handle_errors

__all__ = ["inspect"]


def _prior_summary(prior: Prior, path: Path) -> dict[str, Any]:
    """The facts ``inspect`` reports, as plain python (the ``--json`` payload)."""
    meta = prior.meta
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "backbone": meta.get("backbone"),
        "backbone_kwargs": meta.get("backbone_kwargs", {}),
        "n_params": prior.n_params,
        "rank": prior.rank,
        "n_tensors": len(prior.names),
        "factor_dtype": str(prior.factor_dtype).replace("torch.", ""),
        "n_buffers": len(prior.buffers),
        "variance": prior.variance_stats(),
        "reference_scale": prior.reference_scale(),
        "meta": meta,
    }


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``: JSON has no Infinity or NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


@app.command("inspect")
@handle_errors
def inspect(
    prior_path: Annotated[Path, typer.Argument(metavar="FILE", help="Prior file written by fit-prior, "
                                               "convert-official or Prior.save, a model file written by "
                                               "finetune, or a checkpoint (--checkpoint-dir).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check a prior's content against the digest stored when "
                                         "it was saved (reads the whole file).")] = False,
) -> None:
    """Show a prior's backbone, size, variance statistics and reference scale lambda_0, a model's
    estimator, prior scale (with the evidence trace of --prior-scale evidence) and posterior samples, or a
    checkpoint's progress and settings."""
    check_input_file(prior_path, "file", PriorFormatError)  # it may be a prior, a model or a checkpoint
    payload = Prior.read_payload(prior_path)
    if isinstance(payload, dict) and payload.get("format") == MODEL_FORMAT_NAME:
        _print_model(model_summary(prior_path), as_json)
        return
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        _print_checkpoint(checkpoint_summary(prior_path), as_json)
        return
    prior = Prior.from_dict(payload, source=str(prior_path), verify=verify)
    info = _prior_summary(prior, prior_path)
    info["digest"] = ("none stored (an older file)" if not isinstance(payload, dict) or "digest" not in payload
                      else "verified" if verify else "not checked (--verify checks it)")
    if as_json:
        # A prior whose variances are all 0 has lambda_0 = inf: printed as null, so the output parses.
        typer.echo(json.dumps(_finite_or_none(info), indent=2, default=str, allow_nan=False))
        return
    var = info["variance"]
    table = Table(title=f"prior {prior_path}", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    rows = [
        ("backbone", f"{info['backbone']} {info['backbone_kwargs'] or ''}".strip()),
        ("parameters D", f"{info['n_params']:,} in {info['n_tensors']} tensors"),
        ("rank K", str(info["rank"])),
        ("factor dtype", info["factor_dtype"]),
        ("size on disk", f"{info['size_bytes'] / 2**20:.2f} MiB"),
        ("buffers", str(info["n_buffers"])),
        ("content digest", info["digest"]),
    ]
    if var:
        clamp_note = "" if var["clamp_known"] else " (at the minimum; var_clamp not recorded)"
        rows += [
            ("variance min / median / max", f"{var['min']:.3g} / {var['median']:.3g} / {var['max']:.3g}"),
            ("fraction at clamp", f"{var['fraction_at_clamp']:.1%}{clamp_note}"),
        ]
    rows.append(("reference scale lambda_0", f"{info['reference_scale']:.3g}  (grid: lambda_0 * 10**k)"))
    meta = info["meta"]
    for key in ("method", "source_task", "n_snapshots", "preprocess", "created", "library_version", "import"):
        if key in meta:
            rows.append((key, json.dumps(meta[key]) if isinstance(meta[key], (dict, list)) else str(meta[key])))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _print_checkpoint(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(_finite_or_none(info), indent=2, default=str, allow_nan=False))
        return
    table = Table(title=f"checkpoint {info['file']}", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    last = info["last_epoch"]
    table.add_row("epochs done", str(info["epochs_done"]))
    for key in ("train_loss", "task_loss", "prior_nll", "prior_scale", "swag_snapshots", "valid_loss"):
        if key in last:
            table.add_row(f"last epoch: {key}", f"{last[key]:.4g}" if isinstance(last[key], float) else str(last[key]))
    for key, value in info["settings"].items():
        table.add_row(f"setting {key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    table.add_row("library_version", str(info["library_version"]))
    console.print(table)
    console.print("continue it with the same command and options plus --resume", highlight=False)


def _print_model(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(_finite_or_none(info), indent=2, default=str, allow_nan=False))
        return
    hyper, fitted = info["hyperparameters"], info["fitted"]
    backbone = info["backbone"] or {}
    table = Table(title=f"model {info['file']}", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    classes = info["classes"]
    rows = [
        ("estimator", info["estimator"]),
        ("backbone", f"{backbone.get('backbone')} {backbone.get('backbone_kwargs') or ''}".strip()),
        ("parameters", f"{info['n_params']:,}"),
        ("classes", "-" if classes is None else f"{len(classes)}: {', '.join(map(str, classes[:10]))}"
                                                + (" ..." if len(classes) > 10 else "")),
        ("training examples N", str(fitted.get("n_train", "-"))),
        ("prior structure", str(hyper.get("prior_structure", "-"))),
    ]
    scale = fitted.get("prior_scale")
    rows.append(("prior scale", "-" if scale is None else f"{scale:.4g}  (prior_scale={hyper.get('prior_scale')!r})"))
    for entry in fitted.get("evidence_trace") or []:
        rows.append((f"  evidence at step {entry['step']}",
                     f"prior scale {entry['prior_scale']:.4g}, log evidence {entry['log_evidence']:.2f}"))
    rows.append(("inference", f"{hyper.get('inference', 'map')}"
                 + (f", {info['n_samples']} posterior samples" if info["n_samples"] else "")))
    meta = info["meta"] or {}
    for key in ("created", "library_version"):
        if key in meta:
            rows.append((key, str(meta[key])))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)

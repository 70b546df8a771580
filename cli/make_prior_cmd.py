"""``bt-transfer make-prior``: an isotropic prior around given weights (the L2-SP baseline), no source fit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.prior import IMAGENET_PREPROCESS, Prior

from ._app import app, check_output, console, handle_errors
from ._options import parse_backbone_kwargs

__all__ = ["make_prior"]


@app.command("make-prior")
@handle_errors
def make_prior(
    backbone: Annotated[str, typer.Option(help="Registered backbone (resnet18/34/50, small_cnn) or timm:<model>.")],
    variance: Annotated[float, typer.Option(help="The prior's variance, the same for every weight (> 0); "
                                            "finetune's prior scale multiplies it.")],
    out: Annotated[Path, typer.Option("--out", help="Prior file to write (.safetensors for safetensors).")],
    weights: Annotated[Optional[str], typer.Option(
        help="The centre: a state-dict file, a torchvision weights name (IMAGENET1K_V2) or, for timm:<model>, "
             "'pretrained' or a pretrained tag (default: the backbone's random initialisation).")] = None,
    backbone_kwargs: Annotated[Optional[str], typer.Option(
        help="JSON object of backbone arguments, e.g. '{\"in_channels\": 1, \"small_input\": true}'.")] = None,
    imagenet: Annotated[bool, typer.Option(
        "--imagenet/--no-imagenet", help="Record ImageNet preprocessing (224 x 224 RGB, ImageNet mean and std) for "
                                         "finetune to apply; use it with ImageNet weights.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Write an isotropic prior N(weights, variance * I) over a backbone: L2-SP in one command."""
    if not math.isfinite(variance) or variance <= 0:
        raise ConfigError(f"--variance {variance} is not valid; expected a finite number > 0")
    check_output(out, force)
    kwargs = parse_backbone_kwargs(backbone_kwargs) or {}
    if weights is not None:
        kwargs["weights"] = weights
    module = get_backbone(backbone, **kwargs)
    meta = {"weights": weights}
    if imagenet:
        meta["preprocess"] = dict(IMAGENET_PREPROCESS)
    prior = Prior.from_module(module, variance=float(variance), meta=meta)
    prior.save(out, overwrite=force)
    console.print(f"wrote {out}: isotropic prior over {backbone}, D = {prior.n_params:,}, variance {variance:g}, "
                  f"centred on {weights or 'a random initialisation'}", highlight=False, soft_wrap=True)

"""timm models as backbones: ``get_backbone("timm:<model name>", ...)`` (the optional extra ``[timm]``).

Any timm model that gives pooled features with ``num_classes=0`` works: ResNets, ConvNeXt,
EfficientNet, ViT / DeiT and the rest. The arguments mean what they mean for the built-in
backbones, and the others go to ``timm.create_model`` (``img_size``, ``patch_size``, ``depth``,
``drop_path_rate``, ...), so a prior file records them and rebuilds the same network:

- ``in_channels``: timm's ``in_chans``;
- ``small_input``: for transformers (models with a ``patch_embed``: ViT, DeiT, ...), 32 x 32 images
  in patches of 4 unless ``img_size`` is given; convolutional models read any size as they are;
- ``weights``: ``"pretrained"`` (timm's default pretrained tag) or a tag such as ``"a1_in1k"``,
  downloaded from the Hugging Face Hub by timm (with its checks) when online; or the path of a
  local state-dict file (offline). Not recorded in prior files: a prior's mean replaces them.

``forward_features`` gives the last feature maps of convolutional models, for segmentation; a
transformer's token sequence is refused there with a message saying so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import safe_torch_load
from ._validation import mismatch_report
from .exceptions import ConfigError

__all__ = ["TIMM_PREFIX", "TimmBackbone", "build_timm_backbone"]

#: Backbone names of this form build timm models.
TIMM_PREFIX = "timm:"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError("timm backbones need the optional dependency timm: pip install "
                          "'sklearn-bayes-transfer[timm]' (or pip install timm)") from None
    return timm


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``forward`` gives its pooled features.

    Attributes
    ----------
    model : nn.Module
        The timm model (``num_classes=0``); parameter names start with ``model.``.
    feature_dim : int
        ``model.num_features``.
    """

    def __init__(self, model: nn.Module, model_name: str) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.feature_dim = int(model.num_features)
        self.feature_channels = self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature maps ``(N, C, h, w)`` (convolutional models only)."""
        maps = self.model.forward_features(x)
        if maps.dim() != 4:
            raise ConfigError(f"timm model {self.model_name!r} gives features of shape {tuple(maps.shape)} (a token "
                              "sequence), not feature maps (N, C, h, w); segmentation needs a convolutional backbone "
                              "(timm:resnet18, timm:convnext_atto, ...)")
        return maps


def build_timm_backbone(model_name: str, *, in_channels: int = 3, small_input: bool = False,
                        weights: str | os.PathLike | None = None, **timm_kwargs: Any) -> TimmBackbone:
    """The timm model ``model_name`` as a backbone (see the module docstring).

    Examples
    --------
    >>> net = build_timm_backbone("resnet18", in_channels=1)         # doctest: +SKIP
    >>> net(torch.zeros(2, 1, 32, 32)).shape                         # doctest: +SKIP
    torch.Size([2, 512])
    """
    timm = _timm()
    if not timm.is_model(model_name):
        raise ConfigError(f"timm has no model {model_name!r}; list them with timm.list_models('*pattern*')")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels={in_channels!r} is not valid; expected a positive integer (1 or 3)")
    kwargs = dict(timm_kwargs)
    pretrained, tag, path = _weights(weights)
    name = f"{model_name}.{tag}" if tag else model_name
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels, **kwargs)
        if small_input and hasattr(model, "patch_embed") and "img_size" not in kwargs:
            # A transformer's patches and positions are sized for its image size: set up for 32 x 32.
            kwargs.update(img_size=32, patch_size=kwargs.get("patch_size", 4))
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm model {model_name!r} does not accept these arguments: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise ConfigError(f"could not get the pretrained weights of timm model {name!r} ({str(exc)[:150]}); "
                              "offline, download them on a connected machine (timm.create_model(..., "
                              "pretrained=True) fills the Hugging Face cache, which you can copy to "
                              f"{_hub_cache()}) or save model.state_dict() to a file and pass weights=<that file>") \
                from None
        raise ConfigError(f"timm could not build {model_name!r}: {str(exc)[:200]}") from None
    if path is not None:
        _load_state_file(model, path, model_name)
    return TimmBackbone(model, model_name)


def _weights(weights: Any) -> tuple[bool, str | None, Path | None]:
    """(download?, pretrained tag, local file) from ``weights``."""
    if weights is None:
        return False, None, None
    if isinstance(weights, (str, os.PathLike)) and (os.sep in str(weights) or Path(weights).suffix
                                                     or Path(weights).exists()):
        return False, None, Path(weights)
    if weights in (True, "pretrained"):
        return True, None, None
    if isinstance(weights, str) and weights:
        return True, weights, None
    raise ConfigError(f"weights={weights!r} is not valid for a timm backbone; expected 'pretrained', a pretrained "
                      "tag such as 'a1_in1k', or the path of a state-dict file")


def _load_state_file(model: nn.Module, path: Path, model_name: str) -> None:
    state = safe_torch_load(path, what="backbone weights file", error=ConfigError)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone weights file '{path}' must hold a state_dict (a dict of tensors)")
    expected = model.state_dict()
    # A file saved from a model with its classifier has head tensors the backbone does not.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(("head", "fc", "classifier"))}
    report = mismatch_report({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in state.items()},
                             expected_name="model", found_name="file")
    if report is not None:
        raise ConfigError(f"backbone weights file '{path}' does not fit timm model {model_name!r}: tensors {report}")
    model.load_state_dict(state, strict=True)


def _hub_cache() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")

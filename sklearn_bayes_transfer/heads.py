"""Segmentation heads and the network they make with a backbone: per-class logits from the
backbone's last feature maps, upsampled to the input size."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_choice
from .backbones import BackboneWithHead

__all__ = ["DeepLabV3Head", "FCNHead", "SegmentationHead", "SegmentationModel", "build_segmentation_head",
           "resize_logits"]


class SegmentationHead(str, Enum):
    """Which head turns backbone feature maps into per-class logits.

    - ``"fcn"``: a 3x3 convolution, BatchNorm, ReLU, dropout and a 1x1 classifier
      (the head of fully convolutional networks, Long et al. 2015);
    - ``"deeplabv3"``: atrous spatial pyramid pooling (a 1x1 branch, 3x3 branches at dilations
      2, 4 and 6, and an image-pooling branch) before the classifier (Chen et al. 2017). The
      dilations suit the small feature maps (4-32 pixels a side) of small images or stride-32
      backbones.
    """

    FCN = "fcn"
    DEEPLABV3 = "deeplabv3"


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Sequential):
    """``conv3x3 - BatchNorm - ReLU - Dropout - conv1x1``: features ``(N, in, h, w)`` to logits.

    Parameters
    ----------
    in_channels : int
        Channels of the backbone's feature maps.
    n_classes : int
    dropout : float, default=0.1

    Examples
    --------
    >>> import torch
    >>> FCNHead(16, 3)(torch.zeros(2, 16, 5, 4)).shape
    torch.Size([2, 3, 5, 4])
    """

    def __init__(self, in_channels: int, n_classes: int, dropout: float = 0.1) -> None:
        mid = max(in_channels // 4, 8)
        super().__init__(
            _conv_bn_relu(in_channels, mid),
            nn.Dropout(dropout),
            nn.Conv2d(mid, n_classes, kernel_size=1),
        )
        self.in_channels, self.n_classes = in_channels, n_classes


class _ImagePooling(nn.Module):
    """ASPP's image-level branch: global average, 1x1 convolution, broadcast back.

    No BatchNorm here: on a 1x1 map it would fail for a training batch of one image.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class DeepLabV3Head(nn.Module):
    """Atrous spatial pyramid pooling, a 3x3 refinement and a 1x1 classifier.

    Parameters
    ----------
    in_channels : int
        Channels of the backbone's feature maps.
    n_classes : int
    rates : tuple of int, default=(2, 4, 6)
        Dilations of the 3x3 ASPP branches.
    dropout : float, default=0.1

    Examples
    --------
    >>> import torch
    >>> DeepLabV3Head(16, 3)(torch.zeros(2, 16, 5, 4)).shape
    torch.Size([2, 3, 5, 4])
    """

    def __init__(self, in_channels: int, n_classes: int, rates: tuple[int, ...] = (2, 4, 6),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_channels, self.n_classes = in_channels, n_classes
        mid = min(256, max(in_channels // 2, 8))
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, mid, kernel_size=1)]
            + [_conv_bn_relu(in_channels, mid, dilation=r) for r in rates]
            + [_ImagePooling(in_channels, mid)]
        )
        self.project = nn.Sequential(_conv_bn_relu(mid * len(self.branches), mid, kernel_size=1), nn.Dropout(dropout))
        self.refine = _conv_bn_relu(mid, mid)
        self.classifier = nn.Conv2d(mid, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(torch.cat([branch(x) for branch in self.branches], dim=1))
        return self.classifier(self.refine(x))


def build_segmentation_head(kind: SegmentationHead | str, in_channels: int, n_classes: int) -> nn.Module:
    """The head called ``kind`` (see :class:`SegmentationHead`) for ``in_channels`` feature maps.

    Examples
    --------
    >>> type(build_segmentation_head("fcn", 16, 3)).__name__
    'FCNHead'
    """
    kind = check_choice(SegmentationHead, kind, "head")
    if kind is SegmentationHead.FCN:
        return FCNHead(in_channels, n_classes)
    return DeepLabV3Head(in_channels, n_classes)


class SegmentationModel(BackboneWithHead):
    """``head(backbone.forward_features(x))`` upsampled bilinearly to ``x``'s height and width.

    A :class:`~sklearn_bayes_transfer.backbones.BackboneWithHead` whose head reads the
    backbone's feature maps instead of its pooled features: the backbone stays the ``backbone``
    child, so a prior fitted on the bare backbone binds to ``backbone.*`` and everything else is
    the head.

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer.backbones import get_backbone
    >>> net = SegmentationModel(get_backbone("small_cnn", width=4), FCNHead(16, 3))
    >>> net(torch.zeros(2, 1, 13, 11)).shape
    torch.Size([2, 3, 13, 11])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone.forward_features(x))
        return resize_logits(logits, tuple(x.shape[-2:]))


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``(N, C, h, w)`` upsampled bilinearly to ``size`` (unchanged if already that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

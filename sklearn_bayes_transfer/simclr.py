"""SimCLR self-supervision (Chen et al., ICML 2020): the NT-Xent loss, random views of an image,
and a dataset of view pairs. :class:`~sklearn_bayes_transfer.fitter.PriorFitter` trains with them for
``source_task="simclr"``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .exceptions import ConfigError

__all__ = ["NTXentLoss", "SimCLRAugment", "TwoViewDataset", "nt_xent_loss"]


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy), averaged over all ``2B`` anchors.

    Each of the ``2B`` projections is an anchor whose positive is the other view of the same
    image and whose negatives are the other ``2B - 2`` projections; similarities are cosines
    divided by ``temperature`` (Chen et al., 2020).

    Examples
    --------
    >>> import torch
    >>> z = torch.randn(4, 8)
    >>> float(nt_xent_loss(z, z, temperature=0.1)) < float(nt_xent_loss(z, torch.randn(4, 8), temperature=0.1))
    True
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ConfigError(f"nt_xent_loss needs two (B, P) projections of one shape, got {tuple(z1.shape)} "
                          f"and {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, positives)


class NTXentLoss(nn.Module):
    """:func:`nt_xent_loss` as a skorch criterion: ``y_pred`` is ``(B, 2, P)``, ``y_true`` is ignored.

    Examples
    --------
    >>> import torch
    >>> NTXentLoss(temperature=0.5)(torch.randn(3, 2, 4)).shape
    torch.Size([])
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, y_pred: torch.Tensor, y_true: Any = None) -> torch.Tensor:
        return nt_xent_loss(y_pred[:, 0], y_pred[:, 1], self.temperature)


class SimCLRAugment:
    """Random view of one normalised image ``(C, H, W)``, for any ``C`` and any size.

    A random resized crop (area ``scale`` of the image, resized back to the input size), an
    optional horizontal flip, then additive Gaussian noise of standard deviation ``noise`` (in
    normalised units). Colour jitter is left out on purpose: it is meaningless for grey images
    and would need un-normalised pixels.

    Examples
    --------
    >>> import torch
    >>> SimCLRAugment(noise=0.1)(torch.zeros(1, 8, 8)).shape
    torch.Size([1, 8, 8])
    """

    def __init__(self, scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True, noise: float = 0.1) -> None:
        self.scale = tuple(scale)
        self.hflip = hflip
        self.noise = noise

        self._pipelines: dict[tuple[int, int], v2.Compose] = {}

    def _pipeline(self, size: tuple[int, int]) -> v2.Compose:
        if size not in self._pipelines:
            transforms: list[Any] = [v2.RandomResizedCrop(size, scale=self.scale, antialias=True)]
            if self.hflip:
                transforms.append(v2.RandomHorizontalFlip())
            self._pipelines[size] = v2.Compose(transforms)
        return self._pipelines[size]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        view = self._pipeline((int(image.shape[-2]), int(image.shape[-1])))(image)
        if self.noise:
            view = view + self.noise * torch.randn_like(view)
        return view


class TwoViewDataset(Dataset):
    """Items ``(stack([augment(x), augment(x)]), 0)`` for the images ``x`` of ``dataset``.

    Examples
    --------
    >>> import torch
    >>> base = torch.utils.data.TensorDataset(torch.zeros(5, 1, 8, 8))
    >>> TwoViewDataset(base, SimCLRAugment())[0][0].shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(self, dataset: Dataset, augment: SimCLRAugment) -> None:
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[index]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return torch.stack([self.augment(x), self.augment(x)]), 0

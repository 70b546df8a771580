"""Label-preserving augmentation of training batches (images, and masks for segmentation).

The estimators augment each training batch in ``train_step``, after preprocessing and batching,
so a built-in augmentation costs one ``grid_sample`` per batch on the batch's device instead of
a Python call per image. ``augment`` takes a name (:class:`Augment`) or a callable applied to each
image (classification) or each ``(image, mask)`` pair (segmentation); see
:func:`augment_batch`. Validation batches and prediction are never augmented.

``"light"`` (the default of both estimators) is a small random affine map per image: a shift of
up to 1/16 of each side (at least one pixel: on an 8 x 8 image a half-pixel shift only blurs), a
zoom of 0.9-1.1 and a rotation of up to 10 degrees, with the edge pixels repeated where the map
looks outside the image (zeros would not be background once
images are normalised). It keeps digits, letters and text readable, so it has no flips;
``"light-flip"`` adds left-right flips for data where they preserve the label (photos of objects,
microscopy). Measured by ``benchmarks/transfer_panel.py``: on MNIST-family few-shot tasks it is
worth 5-20 points of accuracy; see ``docs/recipe.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F

from ._validation import check_choice
from .exceptions import ConfigError

__all__ = ["Augment", "LIGHT_ROTATION", "LIGHT_SCALE", "LIGHT_SHIFT", "augment_batch", "check_augment", "random_affine"]

#: The ``"light"`` augmentation: largest shift (fraction of each side), zoom and rotation (degrees).
LIGHT_SHIFT = 1.0 / 16.0
LIGHT_SCALE = 0.1
LIGHT_ROTATION = 10.0


class Augment(str, Enum):
    """Built-in augmentation of training batches.

    - ``"none"``: the images as they are;
    - ``"light"``: a random shift (up to 1/16 of each side, at least one pixel), zoom (0.9-1.1)
      and rotation (up to 10 degrees) per image, edges repeated; no flips, so digits and text
      keep their meaning;
    - ``"light-flip"``: ``"light"`` plus a left-right flip with probability 1/2.
    """

    NONE = "none"
    LIGHT = "light"
    LIGHT_FLIP = "light-flip"


def random_affine(images: torch.Tensor, masks: torch.Tensor | None = None, *, max_shift: float = LIGHT_SHIFT,
                  min_shift_pixels: float = 1.0, max_scale: float = LIGHT_SCALE, max_rotation: float = LIGHT_ROTATION,
                  hflip: bool = False, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one random affine map per image to ``images`` ``(N, C, H, W)`` (and ``masks`` ``(N, H, W)``).

    Images are resampled bilinearly, masks with nearest neighbours (class ids stay class ids),
    both with the edge pixels repeated outside the image. Shifts are uniform in
    ``[-s, s]`` of each side with ``s = max(max_shift, min_shift_pixels / side)``, zooms in
    ``[1 - max_scale, 1 + max_scale]``, rotations in ``[-max_rotation, max_rotation]`` degrees.

    Examples
    --------
    >>> import torch
    >>> images, masks = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4, 8, 8))
    >>> out, out_masks = random_affine(images, masks, generator=torch.Generator().manual_seed(0))
    >>> out.shape, out_masks.shape, set(out_masks.unique().tolist()) <= {0, 1, 2}
    (torch.Size([4, 1, 8, 8]), torch.Size([4, 8, 8]), True)
    """
    n = images.shape[0]
    device, dtype = images.device, images.dtype if images.is_floating_point() else torch.float32

    def uniform(high: float) -> torch.Tensor:
        # Drawn on the CPU: the same generator gives the same maps on every device.
        return (torch.rand(n, generator=generator).to(device, dtype) * 2 - 1) * high

    zoom = 1 + uniform(max_scale)
    angle = uniform(max_rotation * math.pi / 180)
    # affine_grid maps output to input coordinates in [-1, 1]: dividing by the zoom enlarges.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    height, width = images.shape[-2:]
    shift_x, shift_y = (max(float(max_shift), min_shift_pixels / side) for side in (width, height))
    # Shifts in affine_grid's [-1, 1] coordinates: twice the fraction of the side.
    theta = torch.stack([torch.stack([cos, -sin, 2 * uniform(shift_x)], 1),
                         torch.stack([sin, cos, 2 * uniform(shift_y)], 1)], 1)
    if hflip:
        flip = torch.rand(n, generator=generator).to(device) < 0.5
        theta[flip, :, 0] = -theta[flip, :, 0]
    grid = F.affine_grid(theta, [n, 1, *images.shape[-2:]], align_corners=False)
    out = F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if masks is None:
        return out.to(images.dtype), None
    # Class ids (and the ignore marker) are small integers: exact in floating point.
    warped = F.grid_sample(masks[:, None].to(dtype), grid, mode="nearest", padding_mode="border",
                           align_corners=False)
    return out.to(images.dtype), warped[:, 0].round().to(masks.dtype)


def check_augment(augment: Any, argument: str = "augment") -> Augment | Callable:
    """``augment`` as an :class:`Augment` member, or the callable itself; a clear error otherwise."""
    if augment is None:
        return Augment.NONE
    if callable(augment) and not isinstance(augment, str):
        return augment
    if not isinstance(augment, str):
        raise ConfigError(f"{argument} must be one of {', '.join(repr(a.value) for a in Augment)}, or a callable; "
                          f"got {type(augment).__name__}")
    return check_choice(Augment, augment, argument)


def augment_batch(augment: Augment | Callable, images: torch.Tensor, masks: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment one training batch.

    A built-in :class:`Augment` transforms the whole batch at once (:func:`random_affine`). A
    callable is applied to each item: ``augment(image)`` for classification, ``augment(image,
    mask)`` returning a pair for segmentation (for example a torchvision transform, or a
    :class:`~sklearn_bayes_transfer.data.JointTransform`).

    Examples
    --------
    >>> import torch
    >>> augment_batch(Augment.NONE, torch.zeros(2, 1, 4, 4))[0].shape
    torch.Size([2, 1, 4, 4])
    >>> augment_batch(lambda image: image + 1, torch.zeros(2, 1, 4, 4))[0].sum().item()
    32.0
    """
    if isinstance(augment, Augment):
        if augment is Augment.NONE:
            return images, masks
        return random_affine(images, masks, hflip=augment is Augment.LIGHT_FLIP)
    if masks is None:
        return torch.stack([augment(image) for image in images]), None
    pairs = [augment(image, mask) for image, mask in zip(images, masks)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

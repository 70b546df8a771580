"""Backbone registry: a name and plain keyword arguments rebuild the same feature extractor.

A backbone maps images ``(N, C, H, W)`` to pooled features ``(N, feature_dim)`` and exposes its
last feature maps through ``forward_features`` (``(N, feature_channels, h, w)``, for
segmentation). Every backbone built here remembers how it was built (``backbone_name`` and
``backbone_kwargs``), which is what a prior file records so that downstream code can rebuild
the module from the prior alone.

The torchvision ResNets subclass :class:`torchvision.models.ResNet` with ``fc = Identity``, so
their parameter names are exactly torchvision's (``conv1.weight``, ``layer1.0.bn1.bias``, ...)
and torchvision state dicts, including the paper's official priors, map onto them by name.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ._io import safe_torch_load
from ._validation import mismatch_report, plain
from .exceptions import ConfigError
from .timm_backbones import TIMM_PREFIX, build_timm_backbone

__all__ = [
    "BackboneWithHead",
    "ResNetBackbone",
    "SmallCNN",
    "backbone_arguments",
    "backbone_from_meta",
    "backbone_meta",
    "feature_dim_of",
    "get_backbone",
    "list_backbones",
    "register_backbone",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ResNetBackbone(ResNet):
    """A torchvision ResNet without its classifier: ``forward`` returns pooled features.

    Parameters
    ----------
    block : type
        :class:`~torchvision.models.resnet.BasicBlock` or ``Bottleneck``.
    layers : list of int
        Blocks per stage (``[2, 2, 2, 2]`` for ResNet-18).
    in_channels : int, default=3
        Channels of the input images (1 for grey images).
    small_input : bool, default=False
        Use a stem for 28-64 pixel inputs: ``conv1`` becomes a 3x3 convolution with stride 1 and
        the max-pooling is removed, so small images are not downsampled 4x before the first stage.
    zero_init_residual : bool, default=False
        As in torchvision: start each residual branch's last BatchNorm at zero.

    Attributes
    ----------
    feature_dim : int
        Size of the pooled feature vector (512 for ResNet-18/34, 2048 for ResNet-50).
    feature_channels : int
        Channels of the maps returned by :meth:`forward_features` (equal to ``feature_dim``).

    Examples
    --------
    >>> import torch
    >>> from torchvision.models.resnet import BasicBlock
    >>> net = ResNetBackbone(BasicBlock, [1, 1, 1, 1], in_channels=1, small_input=True)
    >>> net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 512])
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        in_channels: int = 3,
        small_input: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same initialisation torchvision gives every other convolution.
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = int(self.fc.in_features)
        self.feature_channels = self.feature_dim
        self.fc = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps of the last stage, shape ``(N, feature_channels, h, w)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features, shape ``(N, feature_dim)``."""
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


class SmallCNN(nn.Module):
    """A small convolutional backbone for fast runs and tests.

    ``depth`` blocks of 3x3 convolution, BatchNorm and ReLU; the channel count doubles and the
    resolution halves (stride 2) from the second block on; global average pooling at the end.

    Parameters
    ----------
    in_channels : int, default=1
        Channels of the input images.
    width : int, default=16
        Channels of the first block.
    depth : int, default=3
        Number of blocks.

    Attributes
    ----------
    feature_dim, feature_channels : int
        ``width * 2 ** (depth - 1)``.

    Examples
    --------
    >>> import torch
    >>> net = SmallCNN(in_channels=1, width=4)
    >>> sum(p.numel() for p in net.parameters())
    1532
    >>> net(torch.zeros(3, 1, 8, 8)).shape
    torch.Size([3, 16])
    """

    def __init__(self, in_channels: int = 1, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2 ** i
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.feature_channels = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps of the last block, shape ``(N, feature_channels, h, w)``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features, shape ``(N, feature_dim)``."""
        return torch.flatten(self.pool(self.features(x)), 1)


class BackboneWithHead(nn.Module):
    """``head(backbone(x))``: a backbone and a task head (a classifier, SimCLR's projector).

    Priors cover the ``backbone`` child only; everything else is head. A 5-D input
    ``(B, V, C, H, W)`` of ``V`` views per example (SimCLR) gives ``(B, V, P)``.

    Examples
    --------
    >>> model = BackboneWithHead(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> model(torch.zeros(3, 1, 2, 2)).shape, model(torch.zeros(3, 2, 1, 2, 2)).shape
    (torch.Size([3, 2]), torch.Size([3, 2, 2]))
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            b, v = x.shape[:2]
            return self.head(self.backbone(x.flatten(0, 1))).view(b, v, -1)
        return self.head(self.backbone(x))


# -- registry -------------------------------------------------------------------------------------
def register_backbone(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder`` available as ``get_backbone(name, **kwargs)``.

    The builder takes keyword arguments of plain python types (they are stored in prior files)
    and returns an ``nn.Module`` whose ``forward`` gives ``(N, feature_dim)`` features and which
    has an integer ``feature_dim`` attribute.

    Raises
    ------
    ConfigError
        If ``name`` is already registered (names identify backbones inside prior files, so one
        name must always mean one architecture) or ``builder`` is not callable.

    Examples
    --------
    >>> from torch import nn
    >>> def tiny(in_channels=1):
    ...     net = nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ...     net.feature_dim = 4
    ...     return net
    >>> register_backbone("doc_tiny", tiny)
    >>> get_backbone("doc_tiny").feature_dim
    4
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"backbone name must be a non-empty string, got {name!r}")
    if not callable(builder):
        raise ConfigError(f"builder for backbone {name!r} must be callable, got {type(builder).__name__}")
    if name in _REGISTRY:
        raise ConfigError(f"a backbone named {name!r} is already registered; choose another name "
                          f"(registered: {', '.join(list_backbones())})")
    _REGISTRY[name] = builder


def _builder(name: str) -> Callable[..., nn.Module] | None:
    """The builder behind ``name``: registered, or ``timm:<model>`` (built by timm), else ``None``."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        model_name = name[len(TIMM_PREFIX):]

        def build(in_channels: int = 3, small_input: bool = False, weights: Any = None, **kwargs: Any) -> nn.Module:
            return build_timm_backbone(model_name, in_channels=in_channels, small_input=small_input,
                                       weights=weights, **kwargs)

        return build
    return _REGISTRY.get(name) if isinstance(name, str) else None


def list_backbones() -> list[str]:
    """Names accepted by :func:`get_backbone`, sorted (besides ``timm:<any timm model>``).

    Examples
    --------
    >>> {"resnet18", "resnet50", "small_cnn"} <= set(list_backbones())
    True
    """
    return sorted(_REGISTRY)


def backbone_arguments(name: str) -> tuple[str, ...]:
    """Keyword arguments the backbone ``name`` names (a builder with ``**kwargs`` takes others too).

    Examples
    --------
    >>> backbone_arguments("small_cnn")
    ('in_channels', 'width', 'depth')
    >>> backbone_arguments("timm:resnet18")
    ('in_channels', 'small_input', 'weights')
    """
    params = _builder_parameters(name)
    return tuple(n for n, p in params.items() if p.kind is not p.VAR_KEYWORD)


def _builder_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    builder = _builder(name)
    if builder is None:
        raise ConfigError(f"unknown backbone {name!r}; registered backbones are {', '.join(list_backbones())} "
                          "(and timm:<model name>)")
    try:
        return inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}


def get_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name`` with keyword arguments ``kwargs``.

    The returned module carries ``backbone_name`` and ``backbone_kwargs`` (plain python), from
    which :func:`backbone_from_meta` rebuilds the same architecture. A ``weights`` path, where a
    builder accepts one, is not recorded: a prior's mean replaces those weights anyway.

    Raises
    ------
    ConfigError
        For an unknown name, unknown or non-plain keyword arguments, or a builder that does not
        return a module with an integer ``feature_dim``.

    Examples
    --------
    >>> net = get_backbone("resnet18", in_channels=1, small_input=True)
    >>> net.backbone_name, net.backbone_kwargs, net.feature_dim
    ('resnet18', {'in_channels': 1, 'small_input': True}, 512)
    """
    builder = _builder(name)
    if builder is None:
        raise ConfigError(f"unknown backbone {name!r}; registered backbones are {', '.join(list_backbones())} "
                          "and timm:<model name> (or pass an nn.Module, or register one with register_backbone)")
    kwargs = _checked_kwargs(name, kwargs)
    module = builder(**kwargs)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"builder of backbone {name!r} returned {type(module).__name__}, expected an nn.Module")
    if not isinstance(getattr(module, "feature_dim", None), int):
        raise ConfigError(f"backbone {name!r} has no integer 'feature_dim' attribute; its builder must set "
                          "module.feature_dim to the size of the features forward() returns")
    module.backbone_name = name
    module.backbone_kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    return module


def backbone_meta(module: nn.Module) -> dict[str, Any] | None:
    """``{"backbone": name, "backbone_kwargs": {...}}`` for a registered backbone, else ``None``.

    ``None`` means the module cannot be rebuilt from a name (a user's own ``nn.Module``): a prior
    fitted on it can still be saved, but downstream code must be given the module itself.

    Examples
    --------
    >>> backbone_meta(get_backbone("small_cnn", width=4))
    {'backbone': 'small_cnn', 'backbone_kwargs': {'width': 4}}
    >>> backbone_meta(torch.nn.Linear(2, 2)) is None
    True
    """
    name = getattr(module, "backbone_name", None)
    if _builder(name) is None:
        return None
    kwargs = dict(getattr(module, "backbone_kwargs", None) or {})
    return {"backbone": name, "backbone_kwargs": kwargs}


def backbone_from_meta(meta: Mapping[str, Any]) -> nn.Module:
    """Rebuild the backbone described by a prior's ``meta`` (``backbone``, ``backbone_kwargs``).

    Raises
    ------
    ConfigError
        If the backbone is not registered (for example a prior fitted on a user's own module):
        the message says to pass the module explicitly.

    Examples
    --------
    >>> net = backbone_from_meta({"backbone": "small_cnn", "backbone_kwargs": {"width": 4}})
    >>> net.feature_dim
    16
    """
    name = meta.get("backbone")
    if _builder(name) is None:
        raise ConfigError(f"the prior's backbone {name!r} is not a registered backbone, so it cannot be rebuilt "
                          f"from the prior alone; pass the nn.Module it was fitted on (registered: "
                          f"{', '.join(list_backbones())})")
    return get_backbone(name, **dict(meta.get("backbone_kwargs") or {}))


def feature_dim_of(module: nn.Module, example: torch.Tensor | None = None) -> int:
    """The feature size of ``module``: its ``feature_dim`` attribute, else measured on ``example``.

    Examples
    --------
    >>> feature_dim_of(torch.nn.Flatten(), torch.zeros(1, 2, 3, 3))
    18
    """
    dim = getattr(module, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    if example is None:
        raise ConfigError(f"{type(module).__name__} has no 'feature_dim' attribute; set it to the size of the "
                          "features its forward() returns")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(example[:2])
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"backbone {type(module).__name__} must return (N, feature_dim) features, got {shape}; "
                          "pool its feature maps (for example with nn.AdaptiveAvgPool2d(1) and nn.Flatten())")
    return int(out.shape[1])


def _checked_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments as plain python (numpy and torch scalars become numbers), checked against the builder."""
    checked = {}
    for key, value in kwargs.items():
        if key == "weights":
            checked[key] = value
            continue
        try:
            checked[key] = plain(value, key)
        except ConfigError:
            raise ConfigError(f"backbone argument {key}={value!r} is a {type(value).__name__}; backbone arguments "
                              "are stored in prior files and must be plain python (str, int, float, bool, None, "
                              "lists and dicts of them)") from None
    params = _builder_parameters(name)
    accepted = backbone_arguments(name)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [] if open_ended else sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"backbone {name!r} does not accept {', '.join(unknown)}; "
                          f"its arguments are {', '.join(accepted) or '(none)'}")
    return checked


# -- torchvision ResNets ------------------------------------------------------------------------
def _check_in_channels(in_channels: Any) -> int:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels={in_channels!r} is not valid; expected a positive integer (1 or 3)")
    return in_channels


def _torchvision_state(weights: str, name: str) -> dict[str, torch.Tensor]:
    """A torchvision weights name (``"IMAGENET1K_V2"``, ``"DEFAULT"``) through torchvision's own download."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    try:
        entry = enum[weights]
    except KeyError:
        raise ConfigError(f"weights={weights!r} is neither a file nor a torchvision weights name for {name} "
                          f"(those are {', '.join(enum.__members__)})") from None
    try:
        return entry.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(entry.url))
        raise ConfigError(f"could not get torchvision's {enum.__name__}.{weights} ({str(exc)[:120]}); offline, "
                          f"download {entry.url} and put it at {target}, or pass weights=<path of the file>") \
            from None


def _load_torchvision_weights(module: ResNetBackbone, path: str | os.PathLike, name: str) -> None:
    if isinstance(path, str) and not os.path.exists(path) and os.sep not in path and not os.path.splitext(path)[1]:
        state = _torchvision_state(path, name)
    else:
        state = safe_torch_load(path, what="backbone weights file", error=ConfigError)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone weights file '{path}' must hold a state_dict (a dict of tensors)")
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith("fc."):
            cleaned[key] = value
    expected = {k: v.shape for k, v in module.state_dict().items()}
    report = mismatch_report(expected, {k: v.shape for k, v in cleaned.items()}, expected_name="model",
                             found_name="file")
    if report is not None:
        hint = ""
        if "conv1.weight" in cleaned and tuple(cleaned["conv1.weight"].shape) != tuple(expected["conv1.weight"]):
            hint = (" (conv1 differs: was the file made with another in_channels or stem? torchvision's "
                    "ImageNet weights need in_channels=3, small_input=False)")
        raise ConfigError(f"backbone weights file '{path}' does not fit {name}: tensors {report}{hint}")
    module.load_state_dict(cleaned, strict=True)


def _resnet_builder(name: str, block: type[BasicBlock] | type[Bottleneck],
                    layers: list[int]) -> Callable[..., nn.Module]:
    def build(in_channels: int = 3, small_input: bool = False,
              weights: str | os.PathLike | None = None) -> nn.Module:
        module = ResNetBackbone(block, layers, in_channels=_check_in_channels(in_channels),
                                small_input=bool(small_input))
        if weights is not None:
            _load_torchvision_weights(module, weights, name)
        return module

    build.__name__ = f"build_{name}"
    build.__doc__ = (f"torchvision {name} backbone (random init, or ``weights``: a torchvision state dict file "
                     "or a torchvision weights name such as 'IMAGENET1K_V1').")
    return build


def _small_cnn(in_channels: int = 1, width: int = 16, depth: int = 3) -> nn.Module:
    _check_in_channels(in_channels)
    for arg, value in (("width", width), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"small_cnn {arg}={value!r} is not valid; expected a positive integer")
    return SmallCNN(in_channels=in_channels, width=width, depth=depth)


register_backbone("resnet18", _resnet_builder("resnet18", BasicBlock, [2, 2, 2, 2]))
register_backbone("resnet34", _resnet_builder("resnet34", BasicBlock, [3, 4, 6, 3]))
register_backbone("resnet50", _resnet_builder("resnet50", Bottleneck, [3, 4, 6, 3]))
register_backbone("small_cnn", _small_cnn)

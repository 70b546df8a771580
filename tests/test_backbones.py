"""Backbone registry: torchvision-compatible ResNets, the small CNN, metadata round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from sklearn_bayes_transfer import backbones
from sklearn_bayes_transfer.backbones import (
    ResNetBackbone,
    SmallCNN,
    backbone_from_meta,
    backbone_meta,
    feature_dim_of,
    get_backbone,
    list_backbones,
    register_backbone,
)
from sklearn_bayes_transfer.exceptions import ConfigError


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test disappear after it."""
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))


@pytest.fixture(scope="module")
def torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18()


def test_builtin_names_are_registered() -> None:
    assert {"resnet18", "resnet34", "resnet50", "small_cnn"} <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


def test_resnet18_parameter_names_and_shapes_are_torchvisions(torchvision_resnet18: nn.Module) -> None:
    ours = get_backbone("resnet18")
    theirs = {n: tuple(p.shape) for n, p in torchvision_resnet18.named_parameters() if not n.startswith("fc.")}
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == list(theirs.items())
    theirs_buffers = [n for n, _ in torchvision_resnet18.named_buffers()]
    assert [n for n, _ in ours.named_buffers()] == theirs_buffers
    assert isinstance(ours, torchvision.models.ResNet) and isinstance(ours.fc, nn.Identity)
    assert ours.feature_dim == ours.feature_channels == 512


def test_resnet50_feature_dim() -> None:
    net = get_backbone("resnet50", in_channels=1, small_input=True)
    assert net.feature_dim == 2048
    # Element count of torchvision's ResNet-50 without fc (2048*1000 + 1000), minus the 3->1 and
    # 7x7 -> 3x3 change of conv1: 64*3*7*7 = 9408 replaced by 64*1*3*3 = 576.
    assert sum(p.numel() for p in net.parameters()) == 23_508_032 - 9408 + 576


def test_forward_is_average_pool_of_forward_features() -> None:
    torch.manual_seed(0)
    net = get_backbone("resnet18", in_channels=3).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = net.forward_features(x)
    assert maps.shape == (2, 512, 2, 2)
    torch.testing.assert_close(net(x), maps.mean(dim=(2, 3)))


def test_small_input_stem() -> None:
    net = get_backbone("resnet18", in_channels=1, small_input=True).eval()
    assert tuple(net.conv1.weight.shape) == (64, 1, 3, 3)
    assert net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    # 32x32 in, three stride-2 stages: 4x4 maps (the ImageNet stem would give 1x1).
    assert net.forward_features(torch.zeros(1, 1, 32, 32)).shape == (1, 512, 4, 4)
    default = get_backbone("resnet18", in_channels=1).eval()
    assert tuple(default.conv1.weight.shape) == (64, 1, 7, 7)
    assert default.forward_features(torch.zeros(1, 1, 32, 32)).shape == (1, 512, 1, 1)


def test_weights_file_loads_torchvision_state_dict(tmp_path, torchvision_resnet18: nn.Module) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision_resnet18.state_dict(), path)  # fc.* included, as torchvision ships it
    net = get_backbone("resnet18", weights=str(path))
    theirs = dict(torchvision_resnet18.state_dict())
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0)
    assert "weights" not in net.backbone_kwargs
    x = torch.randn(2, 3, 32, 32)
    reference = nn.Sequential(*list(torchvision_resnet18.children())[:-1], nn.Flatten()).eval()
    torch.testing.assert_close(net.eval()(x), reference(x))


def test_weights_file_mismatch_is_refused(tmp_path, torchvision_resnet18: nn.Module) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision_resnet18.state_dict(), path)
    with pytest.raises(ConfigError, match=r"conv1\.weight.*in_channels"):
        get_backbone("resnet18", in_channels=1, weights=path)
    with pytest.raises(ConfigError, match="missing: "):
        get_backbone("resnet34", weights=path)
    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ConfigError, match="state_dict"):
        get_backbone("resnet18", weights=junk)
    with pytest.raises(ConfigError, match="does not exist"):
        get_backbone("resnet18", weights=tmp_path / "absent.pth")


def test_small_cnn_is_tiny_and_pools() -> None:
    net = get_backbone("small_cnn", in_channels=1, width=4)
    assert isinstance(net, SmallCNN)
    # conv 1->4 (36) + bn (8), conv 4->8 (288) + bn (16), conv 8->16 (1152) + bn (32)
    assert sum(p.numel() for p in net.parameters()) == 36 + 8 + 288 + 16 + 1152 + 32
    x = torch.randn(5, 1, 8, 8)
    maps = net.eval().forward_features(x)
    assert maps.shape == (5, 16, 2, 2) and net.feature_channels == 16
    torch.testing.assert_close(net(x), maps.mean(dim=(2, 3)))
    rgb = get_backbone("small_cnn", in_channels=3, width=2, depth=2)
    assert rgb(torch.zeros(2, 3, 28, 28)).shape == (2, 4)


def test_meta_round_trip_rebuilds_the_architecture() -> None:
    net = get_backbone("small_cnn", in_channels=3, width=4, depth=2)
    meta = backbone_meta(net)
    assert meta == {"backbone": "small_cnn", "backbone_kwargs": {"in_channels": 3, "width": 4, "depth": 2}}
    rebuilt = backbone_from_meta(meta)
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in net.named_parameters()]
    resnet = backbone_from_meta({"backbone": "resnet18", "backbone_kwargs": {"in_channels": 1, "small_input": True}})
    assert isinstance(resnet, ResNetBackbone) and isinstance(resnet.maxpool, nn.Identity)


def test_user_modules_have_no_meta_and_cannot_be_rebuilt() -> None:
    assert backbone_meta(nn.Linear(2, 2)) is None
    with pytest.raises(ConfigError, match="pass the nn.Module"):
        backbone_from_meta({"backbone": "MyNet", "backbone_kwargs": {}})


def test_unknown_names_and_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'.*resnet18"):
        get_backbone("resnet19")
    with pytest.raises(ConfigError, match="does not accept depth"):
        get_backbone("resnet18", depth=3)
    with pytest.raises(ConfigError, match="in_channels"):
        get_backbone("resnet18", in_channels=0)
    with pytest.raises(ConfigError, match="plain python"):
        get_backbone("small_cnn", width=torch.tensor([4, 4]))
    # Scalars from numpy or torch are numbers: stored (and rebuilt) as python ints.
    assert get_backbone("small_cnn", width=np.int64(4)).backbone_kwargs == {"width": 4}
    with pytest.raises(ConfigError, match="width"):
        get_backbone("small_cnn", width=0)


def test_register_refuses_duplicates(isolated_registry: None) -> None:
    def tiny(in_channels: int = 1) -> nn.Module:
        net = nn.Sequential(nn.Conv2d(in_channels, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.feature_dim = 3
        return net

    register_backbone("tiny_test", tiny)
    assert "tiny_test" in list_backbones()
    net = get_backbone("tiny_test", in_channels=2)
    assert backbone_meta(net) == {"backbone": "tiny_test", "backbone_kwargs": {"in_channels": 2}}
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone("tiny_test", tiny)
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone("resnet18", tiny)
    with pytest.raises(ConfigError, match="callable"):
        register_backbone("not_callable", 3)


def test_builder_without_feature_dim_is_refused(isolated_registry: None) -> None:
    register_backbone("no_dim", lambda: nn.Flatten())
    with pytest.raises(ConfigError, match="feature_dim"):
        get_backbone("no_dim")


def test_feature_dim_of_measures_user_modules() -> None:
    assert feature_dim_of(get_backbone("small_cnn", width=4)) == 16
    user = nn.Sequential(nn.Conv2d(1, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert feature_dim_of(user, torch.zeros(4, 1, 8, 8)) == 6
    with pytest.raises(ConfigError, match=r"\(N, feature_dim\)"):
        feature_dim_of(nn.Conv2d(1, 6, 3), torch.zeros(4, 1, 8, 8))
    with pytest.raises(ConfigError, match="feature_dim"):
        feature_dim_of(user)

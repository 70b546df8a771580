"""timm backbones (random init, no download) through fit-prior -> finetune -> predict, pretrained
weights by name or file, and ``make-prior``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line_error, write_folder
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import ConfigError, Prior
from sklearn_bayes_transfer.backbones import backbone_arguments, backbone_meta, get_backbone
from sklearn_bayes_transfer.modelfile import load_model

timm = pytest.importorskip("timm")
runner = CliRunner()


@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_efficientnet"])
def test_timm_backbones_through_the_command_line(tmp_path, name):
    data = write_folder(tmp_path / "imgs", 4, size=(16, 16))
    prior, model = tmp_path / "prior.safetensors", tmp_path / "model.pt"
    result = runner.invoke(app, ["fit-prior", "--data", str(data), "--out", str(prior), "--backbone", name,
                                 "--max-epochs", "4", "--rank", "2", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    loaded = Prior.load(prior)
    assert loaded.meta["backbone"] == name and loaded.rank == 2
    assert all(n.startswith("model.") for n in loaded.names)
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out", str(model),
                                 "--max-epochs", "2", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", "--model", str(model), str(data)])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1 + 12  # header + one row per image (3 classes x 4)
    info = json.loads(runner.invoke(app, ["inspect", str(model), "--json"]).stdout)
    assert info["backbone"]["backbone"] == name


def test_timm_arguments_are_recorded_and_rebuilt():
    net = get_backbone("timm:test_vit", in_channels=1, small_input=True, depth=1)
    meta = backbone_meta(net)
    assert meta == {"backbone": "timm:test_vit", "backbone_kwargs": {"in_channels": 1, "small_input": True,
                                                                      "depth": 1}}
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, net.feature_dim)
    assert backbone_arguments("timm:test_vit") == ("in_channels", "small_input", "weights")
    with pytest.raises(ConfigError, match="token sequence"):
        net.forward_features(torch.zeros(2, 1, 32, 32))
    cnn = get_backbone("timm:test_efficientnet", in_channels=1)
    assert cnn.forward_features(torch.zeros(2, 1, 32, 32)).dim() == 4


@pytest.mark.parametrize(("name", "kwargs", "needle"), [
    ("timm:no_such_model", {}, "timm has no model 'no_such_model'"),
    ("timm:test_vit", {"bogus": 1}, "does not accept"),
    ("timm:test_vit", {"weights": 3}, "weights=3"),
    ("resnet18", {"weights": "IMAGENET9K"}, "IMAGENET1K_V1"),
])
def test_bad_timm_and_weight_arguments_are_named(name, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        get_backbone(name, **kwargs)


def test_weights_from_a_local_file(tmp_path):
    source = get_backbone("timm:test_efficientnet", in_channels=1)
    path = tmp_path / "weights.pt"
    torch.save(source.model.state_dict(), path)
    net = get_backbone("timm:test_efficientnet", in_channels=1, weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))
    assert "weights" not in backbone_meta(net)["backbone_kwargs"]  # the prior's mean replaces them anyway
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        get_backbone("timm:test_efficientnet", in_channels=1, weights=str(tmp_path / "other.pt"))


def test_torchvision_weights_by_name_offline_say_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    from torchvision.models import ResNet18_Weights
    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(ConfigError) as info:
        get_backbone("resnet18", weights="IMAGENET1K_V1")
    message = str(info.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message


def test_make_prior_builds_an_isotropic_prior_around_given_weights(tmp_path):
    source = get_backbone("resnet18", in_channels=3)
    weights = tmp_path / "resnet18.pt"
    torch.save({"state_dict": {**source.state_dict(), "fc.weight": torch.zeros(10, 512)}}, weights)
    out = tmp_path / "l2sp.safetensors"
    result = runner.invoke(app, ["make-prior", "--backbone", "resnet18", "--weights", str(weights), "--variance",
                                 "1e-4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    prior = Prior.load(out)
    expected = torch.cat([p.detach().reshape(-1) for p in source.parameters()])
    assert torch.equal(prior.mean, expected) and prior.rank == 0
    assert torch.all(prior.variance == 1e-4)
    assert prior.meta["method"] == "isotropic" and prior.meta["backbone"] == "resnet18"
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert info["rank"] == 0 and info["meta"]["weights"] == str(weights)
    one_line_error(runner.invoke(app, ["make-prior", "--backbone", "resnet18", "--variance", "-1", "--out",
                                       str(tmp_path / "x.pt")]), "--variance")
    one_line_error(runner.invoke(app, ["make-prior", "--backbone", "resnet18", "--weights", str(tmp_path / "no.pt"),
                                       "--variance", "1", "--out", str(tmp_path / "y.pt")]), "no.pt")


def test_compare_prints_one_table_with_the_baselines(tmp_path):
    data = write_folder(tmp_path / "train", 4, size=(8, 8))
    test = write_folder(tmp_path / "test", 3, size=(8, 8), seed=1)
    priors = []
    for width in (4, 8):
        priors.append(Prior.from_module(get_backbone("small_cnn", width=width), variance=0.01)
                      .save(tmp_path / f"p{width}.pt"))
    plot = tmp_path / "chart.png"
    args = ["compare", "--data", str(data), "--test", str(test), "--prior", str(priors[0]), "--prior", str(priors[1]),
            "--scale", "auto", "--scale", "evidence", "--seeds", "2", "--max-epochs", "2", "--batch-size", "4",
            "--json", "--plot", str(plot)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    names = [r["name"] for r in rows]
    assert names == ["standard fine-tuning", "p4.pt, scale auto", "p4.pt, scale evidence", "p8.pt, scale auto",
                     "p8.pt, scale evidence", "logistic regression (pixels)", "1-NN (pixels)"]
    assert all(len(r["runs"]) == 2 for r in rows[:5]) and [r["seed"] for r in rows[1]["runs"]] == [0, 1]
    for row in rows:
        for run in row["runs"]:
            assert 0 <= run["accuracy"] <= 1 and run["nll"] >= 0 and 0 <= run["ece"] <= 1
    assert rows[0]["runs"][0]["prior_scale"] is None and rows[2]["runs"][0]["prior_scale"] > 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    one_line_error(runner.invoke(app, args), "--force")  # the plot exists now
    one_line_error(runner.invoke(app, ["compare", "--data", str(data), "--test", str(tmp_path / "none"),
                                       "--prior", str(priors[0])]), "none")

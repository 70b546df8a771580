"""PriorFitter on sklearn's digits with a small CNN: supervised and SimCLR, export, errors."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

from sklearn_bayes_transfer import Prior, _io
from sklearn_bayes_transfer.backbones import (
    BackboneWithHead,
    backbone_from_meta,
    get_backbone,
)
from sklearn_bayes_transfer.data import (
    ImageFolder,
    Preprocess,
    prepare_images,
    save_image,
)
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.exceptions import (
    ConfigError,
    DataError,
    TrainingDivergedError,
)
from sklearn_bayes_transfer.fitter import PriorFitter
from sklearn_bayes_transfer.simclr import (
    NTXentLoss,
    SimCLRAugment,
    TwoViewDataset,
    nt_xent_loss,
)
from sklearn_bayes_transfer.swag import SwagCallback, SwagCollector

FAST = dict(backbone="small_cnn", backbone_kwargs={"width": 4}, max_epochs=3, swag_start=1, rank=2,
            batch_size=64, lr=0.1, swag_lr=0.05)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits_images()
    return X[:400], y[:400]


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.fixture(scope="module")
def supervised_fit(digits):
    """One supervised fit whose SWAG snapshots are recorded as they are collected."""
    X, y = digits
    recorded: list[torch.Tensor] = []
    original = SwagCollector.collect

    def recording(self, params=None):
        recorded.append(torch.cat([p.detach().reshape(-1).double() for p in self._params]))
        return original(self, params)

    torch.manual_seed(123)
    initial = get_backbone("small_cnn", in_channels=1, width=4)
    initial_weights = _flat(initial).clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SwagCollector, "collect", recording)
        fitter = PriorFitter(**{**FAST, "backbone": initial, "backbone_kwargs": None, "max_epochs": 4,
                                "rank": 3}).fit(X, y)
    # The user's module must come back untouched (fit trains a copy).
    torch.testing.assert_close(_flat(initial), initial_weights, rtol=0, atol=0)
    return fitter, initial, torch.stack(recorded)


# -- SimCLR pieces ------------------------------------------------------------------------------------
def test_nt_xent_matches_a_naive_loop() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    t = 0.3
    views = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = len(views)
    total = 0.0
    for i in range(n):
        positive = (i + 5) % n
        sims = {j: float(views[i] @ views[j]) / t for j in range(n) if j != i}
        total += -(sims[positive] - math.log(sum(math.exp(s) for s in sims.values())))
    assert float(nt_xent_loss(z1, z2, temperature=t)) == pytest.approx(total / n, rel=1e-5)
    assert float(NTXentLoss(t)(torch.stack([z1, z2], dim=1), None)) == pytest.approx(total / n, rel=1e-5)


def test_nt_xent_gradient_flows_and_rejects_bad_shapes() -> None:
    z = torch.randn(4, 3, requires_grad=True)
    nt_xent_loss(z, z.flip(0)).backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    with pytest.raises(ConfigError):
        nt_xent_loss(torch.zeros(4, 3), torch.zeros(3, 3))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (3, 13, 17), (1, 40, 32)])
def test_augment_keeps_shape_and_varies(shape) -> None:
    torch.manual_seed(0)
    image = torch.randn(shape)
    augment = SimCLRAugment(noise=0.0)
    views = [augment(image) for _ in range(6)]
    assert all(v.shape == image.shape for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])
    pair, target = TwoViewDataset(torch.utils.data.TensorDataset(image[None]), augment)[0]
    assert pair.shape == (2, *shape) and target == 0


def test_source_model_handles_view_batches() -> None:
    model = BackboneWithHead(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(5, 2, 1, 2, 2)
    torch.testing.assert_close(model(x)[:, 1], model(x[:, 1]))


# -- supervised fit -----------------------------------------------------------------------------------
def test_supervised_fit_exports_a_loadable_prior(supervised_fit, tmp_path) -> None:
    fitter, initial, _ = supervised_fit
    prior = fitter.prior_
    names = [n for n, _ in initial.named_parameters()]
    assert prior.names == tuple(names) and prior.rank == 3
    assert prior.factor.shape == (3, sum(p.numel() for p in initial.parameters()))
    # The mean moved away from the initial weights (the fixture checks the module is untouched).
    assert float((prior.mean - _flat(initial)).abs().max()) > 1e-2
    meta = prior.meta
    assert meta["backbone"] == "small_cnn" and meta["backbone_kwargs"] == {"in_channels": 1, "width": 4}
    assert meta["source_task"] == "supervised" and meta["method"] == "swag"
    assert meta["n_snapshots"] == 3 and meta["rank"] == 3  # epochs 1, 2, 3 of 0..3
    assert meta["swag_start"] == 1 and meta["max_epochs"] == 4 and meta["classes"] == [str(c) for c in range(10)]
    assert Preprocess.from_meta(meta["preprocess"]) == fitter.preprocess_
    path = fitter.save_prior(tmp_path / "digits.pt")
    loaded = Prior.load(path)
    torch.testing.assert_close(loaded.mean, prior.mean)
    torch.testing.assert_close(loaded.factor, prior.factor)
    assert loaded.meta == meta
    assert list(fitter.classes_) == list(range(10))
    assert len(fitter.history_) == 4 and fitter.history_[-1, "swag_snapshots"] == meta["n_snapshots"]


def test_exported_covariance_is_designs_formula(supervised_fit) -> None:
    fitter, _, snaps = supervised_fit
    prior = fitter.prior_
    assert snaps.shape[0] == prior.meta["n_snapshots"] == 3  # epochs 1, 2, 3
    k = prior.rank
    s = snaps.numpy()
    running = np.cumsum(s, axis=0) / np.arange(1, len(s) + 1)[:, None]
    devs = (s - running)[-k:]
    diag = np.maximum(s.var(0), prior.meta["var_clamp"])
    expected = 0.5 * np.diag(diag) + 0.5 * devs.T @ devs / (k - 1)
    np.testing.assert_allclose(prior.mean.double().numpy(), s.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(prior.covariance().numpy(), expected, rtol=1e-3, atol=1e-10)


def test_batchnorm_statistics_are_recomputed_for_the_swag_mean(supervised_fit, digits) -> None:
    fitter, _, _ = supervised_fit
    prior = fitter.prior_
    backbone = backbone_from_meta(prior.meta)
    backbone.load_state_dict({**prior.split(prior.mean), **prior.buffers})
    X = prepare_images(digits[0], Preprocess.from_meta(prior.meta["preprocess"]))
    # update_bn's cumulative average: the unweighted mean over the (unshuffled) batches of the
    # per-batch mean and unbiased variance of the first BatchNorm's input, conv1(x) at the SWAG mean.
    with torch.no_grad():
        h = backbone.features[0](X)
    chunks = h.split(64)
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    variances = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(prior.buffers["features.1.running_mean"], means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prior.buffers["features.1.running_var"], variances, rtol=1e-4, atol=1e-5)
    assert int(prior.buffers["features.1.num_batches_tracked"]) == len(chunks)
    # The fitted net holds the same: SWAG-mean weights and the recomputed statistics.
    torch.testing.assert_close(_flat(fitter.backbone_), prior.mean)


def test_seed_makes_fits_reproducible(digits) -> None:
    X, y = digits[0][:200], digits[1][:200]
    a = PriorFitter(**FAST, random_state=7).fit(X, y).prior_
    b = PriorFitter(**FAST, random_state=7).fit(X, y).prior_
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.factor, b.factor, rtol=0, atol=0)


def test_uint8_and_float64_inputs_and_string_labels(digits) -> None:
    X, y = digits[0][:150], digits[1][:150]
    uint8 = np.rint(X[:, 0] * 255).astype(np.uint8)  # (N, H, W)
    labels = np.array(["even", "odd"])[y % 2]
    fitter = PriorFitter(**FAST).fit(uint8, labels)
    assert list(fitter.classes_) == ["even", "odd"] and fitter.prior_.meta["preprocess"]["channels"] == 1
    fitter64 = PriorFitter(**{**FAST, "image_size": 12}).fit(X.astype(np.float64), y)
    assert fitter64.prior_.meta["preprocess"]["image_size"] == [12, 12]


def test_torch_dataset_input(digits) -> None:
    X, y = digits[0][:100], digits[1][:100]
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    fitter = PriorFitter(**FAST).fit(dataset)
    assert fitter.prior_.meta["n_classes"] == 10
    expected = Preprocess.fit(X)
    np.testing.assert_allclose(fitter.preprocess_.mean, expected.mean, rtol=1e-6)


def test_image_folder_dataset_with_its_own_preprocess(digits, tmp_path) -> None:
    X, y = digits
    for c in (0, 1):
        (tmp_path / f"class{c}").mkdir()
        for i, index in enumerate(np.flatnonzero(y == c)[:10]):
            save_image(X[index], tmp_path / f"class{c}" / f"{i}.png")
    own = Preprocess(image_size=(10, 10), channels=3, mean=(0.3,) * 3, std=(0.4,) * 3)
    folder = ImageFolder(tmp_path, preprocess=own)
    fitter = PriorFitter(**FAST).fit(folder)
    assert fitter.preprocess_ == own and Preprocess.from_meta(fitter.prior_.meta["preprocess"]) == own
    assert fitter.prior_.meta["classes"] == ["class0", "class1"]
    assert fitter.prior_.meta["backbone_kwargs"]["in_channels"] == 3
    with pytest.raises(ConfigError, match="in one place only"):
        PriorFitter(**FAST, preprocess=Preprocess(None, 3, (0.0,) * 3, (1.0,) * 3)).fit(folder)


def test_rgb_images_with_a_resnet_small_stem() -> None:
    rng = np.random.default_rng(0)
    X = rng.random((4, 3, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    fitter = PriorFitter(backbone="resnet18", max_epochs=2, swag_start=0, rank=2, batch_size=2).fit(X, y)
    assert fitter.prior_.meta["backbone_kwargs"] == {"in_channels": 3, "small_input": True}
    assert fitter.prior_.names[0] == "conv1.weight" and fitter.prior_.shapes[0] == (64, 3, 3, 3)


# -- SimCLR fit ---------------------------------------------------------------------------------------
def test_simclr_fit_exports_a_backbone_prior(digits, tmp_path) -> None:
    X = digits[0][:200]
    torch.manual_seed(5)
    initial = get_backbone("small_cnn", in_channels=1, width=4)
    fitter = PriorFitter(**{**FAST, "backbone": initial, "backbone_kwargs": None, "source_task": "simclr",
                            "simclr_temperature": 0.2}).fit(X)
    prior = fitter.prior_
    assert prior.names == tuple(n for n, _ in initial.named_parameters())  # no projector weights
    assert float((prior.mean - _flat(initial)).abs().max()) > 1e-2
    assert prior.meta["source_task"] == "simclr" and prior.meta["simclr_temperature"] == 0.2
    assert not hasattr(fitter, "classes_")
    assert np.isfinite(fitter.history_[:, "train_loss"]).all()
    Prior.load(fitter.save_prior(tmp_path / "simclr.pt"))


# -- estimator contract ----------------------------------------------------------------------------------
def test_clone_get_params_set_params(supervised_fit) -> None:
    fitter, _, _ = supervised_fit
    params = fitter.get_params()
    assert params["rank"] == 3 and params["source_task"] == "supervised"
    copy = clone(fitter)
    assert not hasattr(copy, "prior_")
    assert copy.backbone is not fitter.backbone  # modules are deep-copied by clone
    other = clone(PriorFitter(**FAST))
    assert other.get_params() == PriorFitter(**FAST).get_params()
    assert other.set_params(rank=4, swag_schedule="cosine") is other and other.rank == 4
    with pytest.raises(NotFittedError):
        other.save_prior("never.pt")
    restored = pickle.loads(pickle.dumps(fitter))
    torch.testing.assert_close(restored.prior_.mean, fitter.prior_.mean)
    assert restored.get_params()["rank"] == 3


# -- errors ---------------------------------------------------------------------------------------------
def test_rank_below_two_is_refused(digits) -> None:
    with pytest.raises(ConfigError, match="rank=1.*rank >= 2"):
        PriorFitter(**{**FAST, "rank": 1}).fit(*digits)


def test_too_few_snapshots_is_refused_before_training(digits) -> None:
    fitter = PriorFitter(**{**FAST, "rank": 5})
    with pytest.raises(ConfigError, match=r"collect 2 SWAG snapshot.*rank=5.*more epochs after swag_start"
                                          r".*smaller collect_every"):
        fitter.fit(*digits)
    assert not hasattr(fitter, "net_")


def test_bad_hyperparameters_are_refused(digits) -> None:
    for bad, match in (({"swag_start": 3}, "no epoch for SWAG"), ({"source_task": "mae"}, "source_task='mae'"),
                       ({"lr": 0}, "lr=0"), ({"device": "tpu"}, "device='tpu'"),
                       ({"backbone": "resnet19"}, "unknown backbone")):
        with pytest.raises(ConfigError, match=match):
            PriorFitter(**{**FAST, **bad}).fit(*digits)


def test_data_errors(digits) -> None:
    X, y = digits
    with pytest.raises(DataError, match="at least 2 classes"):
        PriorFitter(**FAST).fit(X[:50], np.zeros(50))
    with pytest.raises(DataError, match="needs labels"):
        PriorFitter(**FAST).fit(X[:50])
    with pytest.raises(DataError, match="one label per image"):
        PriorFitter(**FAST).fit(X[:50], y[:49])


def test_diverging_training_stops_with_a_clear_error(digits) -> None:
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.feature_dim = 64

        def forward(self, x):
            return x.flatten(1) * self.scale / 0.0

    with pytest.raises(TrainingDivergedError, match="lower lr"):
        PriorFitter(**{**FAST, "backbone": Exploding(), "backbone_kwargs": None}).fit(*digits)


@pytest.mark.parametrize("epoch", [2, 3])  # 3: the last epoch, its loss logged but not its snapshot
def test_interrupted_fit_exports_nothing(digits, monkeypatch, epoch) -> None:
    original = SwagCallback.on_epoch_end

    def interrupt(self, net, **kwargs):
        if len(net.history) == epoch:
            raise KeyboardInterrupt
        original(self, net, **kwargs)

    monkeypatch.setattr(SwagCallback, "on_epoch_end", interrupt)
    fitter = PriorFitter(**FAST)
    with pytest.raises(KeyboardInterrupt):
        fitter.fit(digits[0][:100], digits[1][:100])
    assert not hasattr(fitter, "prior_")


def test_interrupted_save_leaves_no_file(supervised_fit, tmp_path, monkeypatch) -> None:
    fitter, _, _ = supervised_fit
    target = tmp_path / "prior.pt"

    def half_write(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(_io.torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        fitter.save_prior(target)
    assert os.listdir(tmp_path) == []

"""SWAG collector and callback against numpy references on known weight trajectories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skorch import NeuralNet, NeuralNetRegressor
from skorch.callbacks import Callback
from torch import nn

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.exceptions import ConfigError, PriorMismatchError
from sklearn_bayes_transfer.swag import SwagCallback, SwagCollector, default_swag_params

SHAPES = [(4, 5), (5,), (3, 2, 2)]
NAMES = ["a.weight", "a.bias", "b.weight"]


def _trajectory(n_snapshots: int, seed: int = 0) -> np.ndarray:
    """Weights of order 1 moving by ~1e-3..1e-4: variances of 1e-8..1e-6, as in real SWAG runs."""
    rng = np.random.default_rng(seed)
    d = sum(math.prod(s) for s in SHAPES)
    centre = rng.uniform(0.5, 2.0, size=d)
    spread = np.exp(rng.uniform(np.log(1e-4), np.log(1e-3), size=d))
    return centre + spread * rng.standard_normal((n_snapshots, d))


def _split(vector: np.ndarray) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in SHAPES:
        n = math.prod(shape)
        out.append(torch.tensor(vector[offset:offset + n], dtype=torch.float32).view(shape))
        offset += n
    return out


def _reference(snaps: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, raw diagonal variance and the last ``rank`` deviations from the running mean."""
    running = np.cumsum(snaps, axis=0) / np.arange(1, len(snaps) + 1)[:, None]
    return snaps.mean(0), snaps.var(0), (snaps - running)[-rank:]


def _collector(rank: int, chunk_size: int | None = None) -> SwagCollector:
    params = [(n, torch.zeros(s)) for n, s in zip(NAMES, SHAPES)]
    return SwagCollector(params, rank=rank, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [None, 7])  # 7: chunks that straddle no parameter evenly
def test_moments_and_deviations_match_numpy(chunk_size) -> None:
    rank = 5
    # Snapshots are float32 parameters: the reference sees exactly the same float32 values.
    snaps = np.stack([torch.cat([t.reshape(-1) for t in _split(w)]).double().numpy() for w in _trajectory(13)])
    swag = _collector(rank, chunk_size)
    for w in snaps:
        swag.collect(_split(w))
    mean, var, devs = _reference(snaps, rank)
    assert swag.n_snapshots == 13
    np.testing.assert_allclose(swag.mean().double().numpy(), mean, rtol=1e-7)
    np.testing.assert_allclose(swag.variance().double().numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(swag.deviations().double().numpy(), devs, rtol=1e-5, atol=1e-12)

    # The same statistics in float32 are badly wrong: the test data really needs float64 moments.
    s32 = torch.tensor(snaps, dtype=torch.float32)
    naive = (s32.square().mean(0) - s32.mean(0).square()).double().numpy()
    assert np.max(np.abs(naive - var) / var) > 0.1


def test_fewer_snapshots_than_rank_keeps_all_deviations_in_order() -> None:
    snaps = _trajectory(3, seed=1)
    swag = _collector(rank=5)
    for w in snaps:
        swag.collect(_split(w))
    _, _, devs = _reference(np.stack([torch.cat([t.reshape(-1) for t in _split(w)]).double().numpy()
                                      for w in snaps]), rank=3)
    assert swag.deviations().shape == (3, snaps.shape[1])
    np.testing.assert_allclose(swag.deviations().double().numpy(), devs, rtol=1e-5, atol=1e-12)
    with pytest.raises(ConfigError, match="only 3 SWAG snapshot.*rank=5"):
        swag.to_prior()


def test_collect_reads_live_parameters_and_accepts_named_pairs() -> None:
    net = nn.Linear(3, 2)
    live = SwagCollector(net.named_parameters(), rank=2)
    given = SwagCollector(net.named_parameters(), rank=2)
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (step + 1))
        live.collect()
        given.collect(list(net.named_parameters()))
    torch.testing.assert_close(live.mean(), given.mean())
    torch.testing.assert_close(live.deviations(), given.deviations())
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    # Parameters moved by 0.1, 0.3, 0.6, 1.0 in total: mean offset 0.5 below the last value.
    torch.testing.assert_close(live.mean(), flat - 0.5)


def test_apply_mean_writes_the_mean_into_the_parameters() -> None:
    net = nn.Linear(3, 2)
    swag = SwagCollector(net.named_parameters(), rank=2)
    before = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()
    for delta in (1.0, 3.0):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(delta)
        swag.collect()
    swag.apply_mean()
    after = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(after, before + 2.5)  # snapshots at +1 and +4


def test_mismatches_and_bad_rank_are_refused() -> None:
    swag = _collector(rank=2)
    with pytest.raises(PriorMismatchError, match="same parameters"):
        swag.collect([torch.zeros(4, 5), torch.zeros(6)])
    with pytest.raises(PriorMismatchError):
        swag.bind([("a.weight", torch.zeros(4, 5))])
    with pytest.raises(ConfigError, match="rank >= 2"):
        _collector(rank=1)
    with pytest.raises(ConfigError, match="at least 1"):
        swag.mean()


def test_to_prior_covariance_is_designs_formula() -> None:
    rank, var_clamp = 4, 1e-7
    snaps = _trajectory(9, seed=2)
    snaps[:, 0] = 1.25  # a weight that never moves: its variance sits at the clamp
    swag = _collector(rank)
    for w in snaps:
        swag.collect(_split(w))
    snaps32 = np.stack([torch.cat([t.reshape(-1) for t in _split(w)]).double().numpy() for w in snaps])
    mean, var, devs = _reference(snaps32, rank)
    expected = 0.5 * np.diag(np.maximum(var, var_clamp)) + 0.5 * devs.T @ devs / (rank - 1)

    prior = swag.to_prior(names=NAMES, shapes=SHAPES, buffers={"bn.running_mean": torch.ones(2)},
                          meta={"backbone": "test"}, var_clamp=var_clamp)
    assert isinstance(prior, Prior) and prior.rank == rank and prior.factor.shape == (rank, snaps.shape[1])
    np.testing.assert_allclose(prior.covariance().numpy(), expected, rtol=1e-4, atol=1e-13)
    np.testing.assert_allclose(prior.mean.double().numpy(), mean, rtol=1e-7)
    assert float(prior.variance[0]) == pytest.approx(var_clamp / 2, rel=1e-6)
    meta = prior.meta
    assert meta["n_snapshots"] == 9 and meta["rank"] == rank and meta["var_clamp"] == var_clamp
    assert meta["method"] == "swag" and meta["backbone"] == "test"
    assert prior.names == tuple(NAMES)
    torch.testing.assert_close(prior.buffers["bn.running_mean"], torch.ones(2))


# -- the skorch callback ---------------------------------------------------------------------------
class _Recorder(Callback):
    """Flat parameter vectors at each epoch end and after each training step, plus the lr used."""

    def initialize(self):
        self.epoch_ends, self.steps, self.lrs = [], [], []
        return self

    def _flat(self, net):
        return torch.cat([p.detach().reshape(-1).double() for p in net.module_.parameters()]).numpy()

    def on_batch_end(self, net, batch=None, training=False, **kwargs):
        if training:
            self.steps.append(self._flat(net))
            self.lrs.append(net.optimizer_.param_groups[0]["lr"])

    def on_epoch_end(self, net, **kwargs):
        self.epoch_ends.append(self._flat(net))


def _data(n: int = 40):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 3)).astype(np.float32)
    return X, (X @ np.array([[1.0], [-2.0], [0.5]], dtype=np.float32))


def _net(swag: SwagCallback, recorder: _Recorder, max_epochs: int, batch_size: int = 10) -> NeuralNetRegressor:
    torch.manual_seed(0)
    return NeuralNetRegressor(nn.Linear(3, 1), max_epochs=max_epochs, lr=0.05, batch_size=batch_size,
                              train_split=None, callbacks=[("swag", swag), ("rec", recorder)], verbose=0)


def test_callback_collects_every_k_epochs_from_start() -> None:
    swag, rec = SwagCallback(start=2, collect_every=2, rank=2, lr=0.01), _Recorder()
    _net(swag, rec, max_epochs=7).fit(*_data())
    snaps = np.stack(rec.epoch_ends)[[3, 5]]  # epochs 2..6 collect at the end of the 2nd and 4th
    assert swag.collector_.n_snapshots == 2 == swag.planned_snapshots(7, steps_per_epoch=4)
    np.testing.assert_allclose(swag.collector_.mean().double().numpy(), snaps.mean(0), rtol=1e-6)
    _, _, devs = _reference(snaps, rank=2)
    np.testing.assert_allclose(swag.collector_.deviations().double().numpy(), devs, rtol=1e-5, atol=1e-9)
    # Before collection the net's lr, during it the collection lr (constant schedule).
    assert rec.lrs[:8] == [0.05] * 8 and rec.lrs[8:] == [0.01] * 20


def test_callback_collects_every_k_steps_with_cyclic_cosine() -> None:
    swag = SwagCallback(start=1, collect_every=4, unit="step", rank=3, lr=0.01, schedule="cosine", max_lr=0.04)
    rec = _Recorder()
    _net(swag, rec, max_epochs=3, batch_size=10).fit(*_data())  # 4 steps per epoch, 8 in collection
    steps = np.stack(rec.steps)[4:]
    assert swag.collector_.n_snapshots == 2 == swag.planned_snapshots(3, steps_per_epoch=4)
    np.testing.assert_allclose(swag.collector_.mean().double().numpy(), steps[[3, 7]].mean(0), rtol=1e-6)
    cycle = [0.01 + 0.5 * 0.03 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    np.testing.assert_allclose(rec.lrs[4:], cycle * 2, rtol=1e-12)
    assert rec.lrs[:4] == [0.05] * 4


def test_cosine_with_epoch_unit_reaches_the_low_lr_before_each_snapshot() -> None:
    swag = SwagCallback(start=0, collect_every=2, rank=2, lr=0.001, schedule="cosine")
    rec = _Recorder()
    _net(swag, rec, max_epochs=4, batch_size=20).fit(*_data())  # 2 steps per epoch, cycles of 4 steps
    cycle = [0.001 + 0.5 * 0.049 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    np.testing.assert_allclose(rec.lrs, cycle * 2, rtol=1e-12)
    assert swag.collector_.n_snapshots == 2


def test_default_parameters_are_the_backbone_when_there_is_one() -> None:
    class WithBackbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(3, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.backbone(x))

    net = NeuralNetRegressor(WithBackbone, max_epochs=1, train_split=None, verbose=0).initialize()
    assert [n for n, _ in default_swag_params(net)] == ["weight", "bias"]
    plain = NeuralNetRegressor(nn.Linear(3, 1), max_epochs=1, train_split=None, verbose=0).initialize()
    assert [n for n, _ in default_swag_params(plain)] == ["weight", "bias"]
    swag = SwagCallback(start=0, rank=2, params=lambda n: [("bias", n.module_.head.bias)])
    NeuralNetRegressor(WithBackbone, max_epochs=2, train_split=None, callbacks=[swag], verbose=0).fit(*_data())
    assert swag.collector_.names == ("bias",)


def test_callback_to_prior_explains_how_to_get_more_snapshots() -> None:
    swag, rec = SwagCallback(start=3, rank=4), _Recorder()
    _net(swag, rec, max_epochs=5).fit(*_data())
    with pytest.raises(ConfigError, match="only 2 SWAG snapshot.*swag_start.*collect_every"):
        swag.to_prior()


def test_callback_partial_fit_continues_collecting() -> None:
    swag, rec = SwagCallback(start=1, rank=2), _Recorder()
    net = _net(swag, rec, max_epochs=2)
    net.fit(*_data())
    net.partial_fit(*_data())
    assert swag.collector_.n_snapshots == 3  # epochs 1, 2, 3 of 0..3
    prior = swag.to_prior(meta={"backbone": "linear"})
    assert prior.meta["swag_start"] == 1 and prior.meta["n_snapshots"] == 3
    np.testing.assert_allclose(prior.mean.double().numpy(), np.stack(rec.epoch_ends)[1:].mean(0), rtol=1e-6)


def test_callback_arguments_are_validated() -> None:
    for bad, match in (({"unit": "batch"}, "unit='batch'"), ({"rank": 1}, "rank=1"),
                       ({"schedule": "cosine"}, "needs lr"), ({"collect_every": 0}, "collect_every=0"),
                       ({"lr": -1.0}, "lr=-1.0")):
        net = NeuralNet(nn.Linear(3, 1), criterion=nn.MSELoss, max_epochs=1, train_split=None,
                        callbacks=[SwagCallback(**bad)], verbose=0)
        with pytest.raises(ConfigError, match=match):
            net.initialize()

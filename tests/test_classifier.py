"""PriorRegularizedClassifier against independent references.

Every check is made on real data (8x8 sklearn digits, small subsets) with tiny networks: a
``small_cnn`` backbone of width 4 (about 1.5k parameters) or a linear softmax model whose
weights are its ``backbone``. References are computed independently: plain cross-entropy of a
copy of the network, ``torch.distributions`` densities, a scikit-learn logistic regression.
"""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit
from skorch.helper import SliceDataset
from threadpoolctl import threadpool_limits
from torch import nn
from torch.distributions import LowRankMultivariateNormal, Normal
from torch.utils.data import TensorDataset

from sklearn_bayes_transfer import (
    ConfigError,
    DataError,
    Prior,
    PriorFormatError,
    PriorMismatchError,
    TrainingDivergedError,
    regularized,
)
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.datasets import load_digits_images

DIGIT_NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny problems: more threads only add synchronisation on a shared machine (torch and BLAS).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 images (N, 8, 8) in [0, 1], and integer labels."""
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def _subset(digits, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    X, y = digits
    idx = np.random.default_rng(seed).permutation(len(y))[:n]
    return X[idx], y[idx]


def _cnn_prior(*, rank: int = 3, variance: float | tuple[float, float] = 1e-2, seed: int = 0,
               meta: dict | None = None) -> Prior:
    """A ``small_cnn`` (width 4) prior around a random initialisation, with a random factor.

    ``variance`` is a constant or a log-uniform range (real SWAG priors span 1e-8 .. 1e-3); the
    factor's rows are of the size of the diagonal's spread, as SWAG deviations are.
    """
    torch.manual_seed(seed)
    base = Prior.from_module(get_backbone("small_cnn", width=4), variance=1.0)
    g = torch.Generator().manual_seed(seed)
    if isinstance(variance, tuple):
        lo, hi = (math.log(v) for v in variance)
        var = torch.exp(lo + (hi - lo) * torch.rand(base.n_params, generator=g, dtype=torch.float64)).float()
    else:
        var = torch.full((base.n_params,), float(variance))
    factor = torch.randn(rank, base.n_params, generator=g) * var.sqrt()
    info = base.meta
    info.update(meta or {})
    return Prior(base.mean, var, factor, names=base.names, shapes=base.shapes, buffers=base.buffers, meta=info)


class LinearNet(nn.Module):
    """A linear softmax classifier whose weights are its ``backbone`` (a prior covers all of them)."""

    def __init__(self, n_features: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.flatten(1))


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])


def _backbone_params(clf: PriorRegularizedClassifier, prior: Prior) -> list[torch.Tensor]:
    """The fitted backbone's parameters in the prior's order, looked up by name."""
    named = dict(clf.module_.named_parameters())
    return [named[name] if name in named else named["backbone." + name] for name in prior.names]


class _ModuleAtTrainBegin(Callback):
    """Keeps a copy of the network as it is when training starts (before the first step)."""

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.module = copy.deepcopy(net.module_)


# -- the loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_weight_decay", [0.0, 0.5])
def test_without_prior_the_loss_is_cross_entropy_plus_head_term(digits, head_weight_decay):
    X, y = _subset(digits, 64)
    snapshot = _ModuleAtTrainBegin()
    clf = PriorRegularizedClassifier(
        _cnn_prior(), prior_structure="none", head_weight_decay=head_weight_decay, preprocess=None,
        batch_size=len(X), max_epochs=1, augment="none", callbacks=[("snapshot", snapshot)], verbose=0,
    ).fit(X, y)

    module = snapshot.module.train()  # the loss is computed in training mode (BatchNorm batch statistics)
    with torch.no_grad():
        reference_ce = float(F.cross_entropy(module(torch.from_numpy(X)[:, None]), torch.from_numpy(y)))
        head_sq = float(sum(p.pow(2).sum() for p in module.head.parameters()))
    epoch = clf.history[-1]
    assert epoch["task_loss"] == pytest.approx(reference_ce, rel=1e-5)
    assert epoch["prior_nll"] == 0.0
    assert epoch["batches"][0]["head_nll"] == pytest.approx(0.5 * head_weight_decay * head_sq / len(X), rel=1e-5)
    assert epoch["train_loss"] == pytest.approx(reference_ce + 0.5 * head_weight_decay * head_sq / len(X), rel=1e-5)


def _reference_prior_nll(prior: Prior, w: torch.Tensor, structure: str, scale: float, eps: float, n: int) -> float:
    """``-log N(w; m, scale * Sigma + eps * I) / n`` up to its constant, with torch.distributions."""
    mean = prior.mean.to(torch.float64)
    var = prior.variance.to(torch.float64)
    factor = prior.factor.to(torch.float64)
    if structure == "lowrank":
        dist = LowRankMultivariateNormal(mean, math.sqrt(scale) * factor.T, scale * var + eps)
        return float(dist.log_prob(mean) - dist.log_prob(w)) / n
    if structure == "diag":
        sd = (scale * var + eps).sqrt()
    else:  # isotropic: one variance, the mean marginal variance of the learned prior
        sd = torch.full_like(var, float((var + factor.pow(2).sum(0)).mean()) * scale + eps).sqrt()
    dist = Normal(mean, sd)
    return float(dist.log_prob(mean).sum() - dist.log_prob(w).sum()) / n


@pytest.mark.parametrize("structure", ["lowrank", "diag", "isotropic"])
@pytest.mark.parametrize("prior_update", ["proximal", "gradient"])
def test_logged_prior_nll_is_the_prior_negative_log_density(digits, structure, prior_update):
    X, y = _subset(digits, 48)
    prior = _cnn_prior(variance=(1e-4, 1e-2), rank=4)
    scale, eps = 3.0, 1e-4
    clf = PriorRegularizedClassifier(
        prior, prior_scale=scale, prior_eps=eps, prior_structure=structure, prior_update=prior_update,
        batch_size=len(X), max_epochs=1, verbose=0,
    ).fit(X, y)
    params = _backbone_params(clf, prior)
    # Move off the mean mostly along the factor's directions, where the structures disagree most
    # (and where scaling the low-rank part by scale**2 instead of scale would show).
    g = torch.Generator().manual_seed(1)
    offset = 3.0 * prior.factor.T @ torch.randn(prior.rank, generator=g) \
        + prior.variance.sqrt() * torch.randn(prior.n_params, generator=g)
    with torch.no_grad():
        for p, m, r in zip(params, prior.split(prior.mean).values(), prior.split(offset).values()):
            p.copy_(m + r)
    w = _flat(params)

    clf.partial_fit(X, y)  # one full batch: the loss is evaluated at w, then a step is taken

    expected = _reference_prior_nll(prior, w, structure, scale, eps, len(X))
    epoch = clf.history[-1]
    assert expected > 1.0  # far enough from the mean for the comparison to mean something
    assert epoch["prior_nll"] == pytest.approx(expected, rel=1e-4)
    batch = epoch["batches"][0]
    assert batch["train_loss"] == pytest.approx(batch["task_loss"] + batch["prior_nll"] + batch["head_nll"], rel=1e-5)


def test_larger_prior_scale_moves_weights_further_from_the_prior_mean(digits):
    X, y = _subset(digits, 200)
    torch.manual_seed(0)
    base = LinearNet()
    prior = Prior.from_module(base, variance=1e-2)
    mean = prior.mean.to(torch.float64)
    distances = []
    for scale in [1e-4, 1e-2, 1.0, 1e2]:
        clf = PriorRegularizedClassifier(
            prior, module=copy.deepcopy(base), prior_scale=scale, head_weight_decay=0.0, preprocess=None,
            lr=0.5, batch_size=len(X), max_epochs=5, verbose=0,
        ).fit(X, y)
        distances.append(float((_flat(_backbone_params(clf, prior)) - mean).norm()))
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > 100 * distances[0]


# -- model selection ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_linear_prior(digits) -> Prior:
    """A prior centred at a logistic regression fitted on all digits (weights that work)."""
    X, y = digits
    lr = LogisticRegression(max_iter=2000).fit(X.reshape(len(X), -1), y)
    mean = torch.cat([torch.tensor(lr.coef_, dtype=torch.float32).reshape(-1),
                      torch.tensor(lr.intercept_, dtype=torch.float32)])
    return Prior(mean, torch.ones_like(mean), None, names=["backbone.weight", "backbone.bias"],
                 shapes=[(10, 64), (10,)], meta={"backbone": "LinearNet"})


def _badly_initialised_linear_net() -> LinearNet:
    torch.manual_seed(123)
    net = LinearNet()
    with torch.no_grad():
        net.backbone.weight.normal_(0.0, 1.0)
    return net


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_grid_search_picks_the_prior_scale_that_generalises(digits, good_linear_prior):
    # A tight prior pins the network to weights that work; a loose one leaves it to fit 30
    # examples from a bad initialisation in 3 epochs. Held-out folds must tell them apart.
    X, y = _subset(digits, 45, seed=1)
    X_test, y_test = _subset(digits, 400, seed=2)
    clf = PriorRegularizedClassifier(good_linear_prior, module=_badly_initialised_linear_net(),
                                     head_weight_decay=0.0, preprocess=None, lr=0.1, max_epochs=3, verbose=0)
    search = GridSearchCV(clf, {"prior_scale": [1e6, 1e-6]}, cv=3).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert search.best_params_ == search.cv_results_["params"][int(np.argmax(scores))]
    assert search.best_params_ == {"prior_scale": 1e-6}
    assert scores.max() > scores.min() + 0.3
    assert search.best_estimator_.score(X_test, y_test) > 0.9


def test_cross_val_score_and_pipeline_with_flat_rows(digits, good_linear_prior):
    X, y = _subset(digits, 90)
    clf = PriorRegularizedClassifier(good_linear_prior, module=_badly_initialised_linear_net(), prior_scale=1e-6,
                                     head_weight_decay=0.0, preprocess=None, lr=0.1, max_epochs=2, verbose=0)
    scores = cross_val_score(clf, X, y, cv=3)
    assert scores.shape == (3,) and (scores > 0.85).all()

    # A pipeline that turns flat rows (N, 64) back into images (N, 8, 8) gives what the images give.
    rows = X.reshape(len(X), 64)
    pipe = make_pipeline(FunctionTransformer(_rows_to_images), clone(clf))
    cnn = PriorRegularizedClassifier(_cnn_prior(), max_epochs=2, verbose=0)
    pipe_cnn = make_pipeline(FunctionTransformer(_rows_to_images), clone(cnn))
    torch.manual_seed(0)
    proba_pipe = pipe_cnn.fit(rows, y).predict_proba(rows)
    torch.manual_seed(0)
    proba_images = cnn.fit(X, y).predict_proba(X)
    np.testing.assert_allclose(proba_pipe, proba_images, rtol=1e-6, atol=1e-7)
    assert pipe.fit(rows, y).score(rows, y) > 0.9


def _rows_to_images(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(len(rows), 8, 8)


def test_flat_rows_are_reshaped_to_the_priors_image_size(digits):
    X, y = _subset(digits, 60)
    prior = _cnn_prior(meta={"preprocess": {"image_size": [8, 8], "channels": 1, "mean": [0.3], "std": [0.4]}})
    clf = PriorRegularizedClassifier(prior, max_epochs=2, verbose=0)
    torch.manual_seed(0)
    proba_images = clf.fit(X, y).predict_proba(X)
    torch.manual_seed(0)
    proba_rows = clone(clf).fit(X.reshape(len(X), 64), y).predict_proba(X.reshape(len(X), 64))
    np.testing.assert_allclose(proba_rows, proba_images, rtol=1e-6, atol=1e-7)


# -- labels and inputs ----------------------------------------------------------------------------
def test_string_labels_round_trip_and_proba_columns_follow_classes(digits):
    X, y = _subset(digits, 200)
    names = DIGIT_NAMES[y]  # sorted order (eight, five, four, ...) differs from digit order
    torch.manual_seed(0)
    clf = PriorRegularizedClassifier(Prior.from_module(LinearNet(), variance=1.0), module=LinearNet(),
                                     prior_scale=1e3, preprocess=None, lr=0.5, batch_size=50, max_epochs=20,
                                     verbose=0).fit(X, names)
    np.testing.assert_array_equal(clf.classes_, np.unique(names))
    pred = clf.predict(X)
    proba = clf.predict_proba(X)
    assert pred.dtype.kind == "U" and set(pred) <= set(DIGIT_NAMES)
    np.testing.assert_array_equal(pred, clf.classes_[proba.argmax(axis=1)])
    assert np.mean(pred == names) > 0.9
    # Column j is the probability of classes_[j]: highest, on average, on examples of that class.
    for j, label in enumerate(clf.classes_):
        assert proba[names == label, j].mean() > proba[names != label, j].mean() + 0.5


@pytest.mark.parametrize("variant", ["float64", "uint8", "channel_axis", "tensor"])
def test_input_dtypes_and_layouts_are_equivalent(digits, variant):
    X, y = _subset(digits, 60)
    X = np.round(X * 255) / 255  # exactly representable as uint8
    converted = {
        "float64": X.astype(np.float64),
        "uint8": np.round(X * 255).astype(np.uint8),
        "channel_axis": X[:, None],
        "tensor": torch.from_numpy(X),
    }[variant]
    clf = PriorRegularizedClassifier(_cnn_prior(), max_epochs=2, verbose=0)
    torch.manual_seed(0)
    reference = clf.fit(X, y).predict_proba(X)
    np.testing.assert_allclose(clf.predict_proba(converted), reference, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    refit = clone(clf).fit(converted, y)
    np.testing.assert_allclose(refit.predict_proba(converted), reference, rtol=1e-5, atol=1e-6)
    assert refit.n_features_in_ == 64


def test_pickle_round_trip_predicts_identically(digits):
    X, y = _subset(digits, 60)
    clf = PriorRegularizedClassifier(_cnn_prior(), max_epochs=2, verbose=0).fit(X, DIGIT_NAMES[y])
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(restored.predict(X), clf.predict(X))


def test_clone_shares_the_prior_instead_of_copying_it(digits):
    X, y = _subset(digits, 40)
    prior = _cnn_prior()
    clf = PriorRegularizedClassifier(prior, max_epochs=1, verbose=0)
    assert clone(clf).prior is prior
    clf.fit(X, y)
    cloned = clone(clf)
    assert cloned.prior is prior
    assert not hasattr(cloned, "prior_") and not hasattr(cloned, "module_")


@pytest.mark.parametrize("as_type", [str, Path])
def test_prior_given_as_a_path(digits, tmp_path, as_type):
    X, y = _subset(digits, 40)
    prior = _cnn_prior()
    path = prior.save(tmp_path / "prior.pt")
    torch.manual_seed(0)
    from_path = PriorRegularizedClassifier(as_type(path), max_epochs=2, verbose=0).fit(X, y)
    torch.manual_seed(0)
    from_object = PriorRegularizedClassifier(prior, max_epochs=2, verbose=0).fit(X, y)
    assert isinstance(from_path.prior_, Prior)
    torch.testing.assert_close(from_path.prior_.mean, prior.mean)
    np.testing.assert_allclose(from_path.predict_proba(X), from_object.predict_proba(X), rtol=1e-6, atol=1e-7)


def test_torch_dataset_input_matches_arrays(digits):
    X, y = _subset(digits, 60)
    dataset = TensorDataset(torch.from_numpy(X)[:, None], torch.from_numpy(y))
    clf = PriorRegularizedClassifier(_cnn_prior(), preprocess=None, max_epochs=2, verbose=0)
    torch.manual_seed(0)
    on_dataset = clone(clf).fit(dataset)  # labels come from the dataset's (image, label) items
    torch.manual_seed(0)
    on_arrays = clone(clf).fit(X, y)
    np.testing.assert_array_equal(on_dataset.classes_, np.arange(10))
    np.testing.assert_allclose(on_dataset.predict_proba(dataset), on_arrays.predict_proba(X), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(on_dataset.predict(dataset), on_arrays.predict(X))


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_grid_search_over_a_dataset_with_slice_dataset(digits):
    """GridSearchCV over a torch Dataset, in parallel.

    scikit-learn splits ``X`` by indexing it; a ``Dataset`` of ``(image, label)`` pairs does not
    support that, so wrap it in skorch's ``SliceDataset`` (which selects the images and indexes
    lazily) and pass the labels as an array, which the stratified folds need::

        X_sl = SliceDataset(dataset, idx=0)          # images
        y = np.array([label for _, label in dataset])
        GridSearchCV(PriorRegularizedClassifier(prior), {"prior_scale": [...]}, cv=3).fit(X_sl, y)
    """
    X, y = _subset(digits, 60)
    dataset = TensorDataset(torch.from_numpy(X)[:, None], torch.from_numpy(y))
    X_sl = SliceDataset(dataset, idx=0)
    labels = np.array([int(label) for _, label in dataset])
    clf = PriorRegularizedClassifier(_cnn_prior(), preprocess=None, max_epochs=2, verbose=0)

    torch.manual_seed(0)
    proba_sliced = clone(clf).fit(X_sl, labels).predict_proba(X_sl[10:20])
    torch.manual_seed(0)
    proba_arrays = clone(clf).fit(X[:, None], labels).predict_proba(X[10:20, None])
    np.testing.assert_allclose(proba_sliced, proba_arrays, rtol=1e-6, atol=1e-7)

    search = GridSearchCV(clf, {"prior_scale": [1e-2, 1e2]}, cv=3, n_jobs=2).fit(X_sl, labels)
    scores = search.cv_results_["mean_test_score"]
    assert search.best_params_ == search.cv_results_["params"][int(np.argmax(scores))]
    assert search.best_estimator_.prior_scale == search.best_params_["prior_scale"]
    assert set(search.predict(X_sl)) <= set(range(10))


# -- numerical stability --------------------------------------------------------------------------
STIFF = dict(variance=(1e-8, 1e-3), rank=5)  # variances down to 1e-8, as real SWAG priors have


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6, 1e10])
def test_default_training_stays_finite_for_every_prior_scale(digits, scale):
    X, y = _subset(digits, 96)
    prior = _cnn_prior(**STIFF)
    clf = PriorRegularizedClassifier(prior, prior_scale=scale, batch_size=32, max_epochs=2, verbose=0).fit(X, y)
    for name, p in clf.module_.named_parameters():
        assert torch.isfinite(p).all(), name
    assert np.isfinite(clf.predict_proba(X)).all()
    assert all(math.isfinite(v) for v in clf.history[:, "train_loss"])
    moved = float((_flat(_backbone_params(clf, prior)) - prior.mean.double()).abs().max())
    if scale <= 1e-3:  # a prior this tight holds the backbone at its mean
        assert moved < 1e-3
    if scale >= 1e6:  # a prior this loose lets it move
        assert moved > 1e-3


def test_stiff_prior_with_gradient_update_stops_with_advice(digits):
    X, y = _subset(digits, 64)
    prior = _cnn_prior(**STIFF)
    kwargs = dict(prior_scale=1.0, lr=0.5, batch_size=32, max_epochs=3, verbose=0)
    with pytest.raises(TrainingDivergedError) as info:
        PriorRegularizedClassifier(prior, prior_update="gradient", **kwargs).fit(X, y)
    message = str(info.value)
    assert "lr" in message and "prior_update='proximal'" in message
    # The same settings with the proximal update train to finite weights.
    clf = PriorRegularizedClassifier(prior, prior_update="proximal", **kwargs).fit(X, y)
    assert all(torch.isfinite(p).all() for p in clf.module_.parameters())


class RecordPriorUpdates(Callback):
    """Logs each call of the penalty's two updates as ``(kind, steps)`` in ``calls``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[float]]] = []

    def on_train_begin(self, net, **kwargs) -> None:
        for kind in ("prox_", "explicit_step_"):
            method = getattr(net.penalty_, kind)

            def logged(params, steps, _method=method, _kind=kind):
                self.calls.append((_kind, list(steps)))
                return _method(params, steps)

            setattr(net.penalty_, kind, logged)


@pytest.mark.parametrize(("variance", "inference"), [(1.0, "map"), (1e-6, "map"), (1e-6, "swag"), (1.0, "sgld")])
def test_prior_updates_add_up_to_the_learning_rate_steps(digits, variance, inference):
    X, y = _subset(digits, 64)
    lr, batch_size, epochs = 0.1, 16, 2
    extra = {"map": {}, "swag": dict(n_samples=2, sample_start=0.0),
             "sgld": dict(n_samples=1, sgld_cycles=1)}[inference]  # SGLD samples in the second epoch
    clf = PriorRegularizedClassifier(
        _cnn_prior(variance=variance, rank=2), prior_scale=1.0, inference=inference, lr=lr,
        lr_schedule="constant", batch_size=batch_size, max_epochs=epochs, train_split=None, verbose=0,
        random_state=0, **extra,
    )
    recorder = RecordPriorUpdates()
    clf.set_params(callbacks=[recorder]).fit(X, y)
    calls = recorder.calls
    step = lr / len(X)  # lr / N per optimizer step
    n_steps = epochs * len(X) // batch_size
    totals = np.sum([steps for _, steps in calls], axis=0)
    if inference == "map":  # (the sampling phases set their own learning rates)
        assert totals == pytest.approx([n_steps * step] * len(totals), rel=1e-9)  # nothing lost, nothing added
    kinds = [kind for kind, _ in calls]
    if variance == 1.0 and inference == "map":
        # A loose prior (step * max(1/d) ~ 0.002): deferred, applied once at the end of each epoch.
        assert kinds == ["explicit_step_"] * epochs
    elif inference == "sgld":
        assert kinds == ["prox_"] * n_steps  # each step exactly, nothing left for the ends of epochs
        assert all(max(steps) == pytest.approx(step) for _, steps in calls[:len(X) // batch_size])
    else:
        # A stiff prior: a proximal step every batch, rounded down to a power of 1.1, the rest carried
        # over and applied at the end of each epoch.
        assert set(kinds) == {"prox_"} and n_steps <= len(kinds) <= n_steps + epochs
        powers = [math.log(max(steps)) / math.log(1.1) for _, steps in calls]
        assert sum(p == pytest.approx(round(p), abs=1e-6) for p in powers) >= n_steps
        assert all(step / 1.1 < max(steps) <= step for _, steps in calls[:len(X) // batch_size])


def test_deferred_prior_updates_match_the_prior_gradient(digits, monkeypatch):
    # With plain SGD the gradient update takes the prior's gradient every step. The default proximal
    # update, deferred over a few steps for a loose prior (step * max(1/d) = 0.026 here), must pull
    # the weights as far, and as closely as a proximal step every batch does.
    X, y = _subset(digits, 64)
    prior = _cnn_prior(variance=0.03, rank=2)
    common = dict(prior_scale=1.0, lr=0.05, optimizer__momentum=0.0, lr_schedule="constant", batch_size=16,
                  max_epochs=20, augment="none", train_split=None, verbose=0, random_state=0)

    def final(**params):
        clf = PriorRegularizedClassifier(prior, **common, **params).fit(X, y)
        return _flat(_backbone_params(clf, prior))

    none, gradient, deferred = final(prior_structure="none"), final(prior_update="gradient"), final()
    monkeypatch.setattr(regularized, "LAZY_PRIOR_STEP", 0.0)
    every_step = final()
    pull = float((gradient - none).norm())
    assert pull > 0.1 * float((none - prior.mean.double()).norm())  # the prior matters here
    gap = float((deferred - gradient).norm())
    assert gap < 0.1 * pull
    assert gap < 1.5 * float((every_step - gradient).norm())


# -- bad input ------------------------------------------------------------------------------------
def test_missing_prior_file_is_named(digits, tmp_path):
    X, y = _subset(digits, 20)
    missing = tmp_path / "no_such_prior.pt"
    with pytest.raises(PriorFormatError, match="no_such_prior.pt"):
        PriorRegularizedClassifier(str(missing), max_epochs=1, verbose=0).fit(X, y)


def test_prior_that_does_not_fit_the_module(digits):
    X, y = _subset(digits, 20)
    with pytest.raises(PriorMismatchError, match="features.0.weight"):
        PriorRegularizedClassifier(_cnn_prior(), module=LinearNet(), max_epochs=1, verbose=0).fit(X, y)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_prior_scale_must_be_positive(digits, scale):
    X, y = _subset(digits, 20)
    with pytest.raises(ConfigError, match="prior_scale"):
        PriorRegularizedClassifier(_cnn_prior(), prior_scale=scale, max_epochs=1, verbose=0).fit(X, y)


def test_unknown_prior_structure_lists_the_allowed_values(digits):
    X, y = _subset(digits, 20)
    with pytest.raises(ConfigError, match="prior_structure") as info:
        PriorRegularizedClassifier(_cnn_prior(), prior_structure="full", max_epochs=1, verbose=0).fit(X, y)
    for allowed in ("'lowrank'", "'diag'", "'isotropic'", "'none'"):
        assert allowed in str(info.value)


def test_stratified_validation_split_names_the_class_that_is_too_rare(digits):
    X, y = _subset(digits, 41)
    labels = np.where(y % 2 == 0, "even", "odd").astype(object)
    labels[0] = "rare"
    clf = PriorRegularizedClassifier(_cnn_prior(), train_split=ValidSplit(0.2, stratified=True),
                                     max_epochs=1, verbose=0)
    with pytest.raises(DataError, match="'rare'"):
        clf.fit(X, labels)


def test_single_class_is_refused(digits):
    X, _ = _subset(digits, 20)
    with pytest.raises(DataError, match="one class"):
        PriorRegularizedClassifier(_cnn_prior(), max_epochs=1, verbose=0).fit(X, np.full(20, 3))


def test_predict_before_fit_raises_not_fitted(digits):
    X, _ = _subset(digits, 5)
    with pytest.raises(NotFittedError):
        PriorRegularizedClassifier(_cnn_prior()).predict(X)


def test_random_state_makes_fits_reproducible_without_touching_global_rng():
    X, y = load_digits_images()
    X, y = X[:60], y[:60]
    prior = Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01)

    def fit(seed):
        return PriorRegularizedClassifier(prior, max_epochs=2, lr=0.1, batch_size=16, verbose=0,
                                          iterator_train__shuffle=True, random_state=seed).fit(X, y)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = fit(0), fit(0), fit(1)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert not np.allclose(a.predict_proba(X), c.predict_proba(X))

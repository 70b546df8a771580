"""``prior_scale="evidence"``, ``evidence_curve`` and ``inference="laplace"`` on the estimators, and their CLI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_folder, write_prior
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import ConfigError, Prior
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.evidence import EVIDENCE_UPDATES, EvidenceWarning, update_steps
from sklearn_bayes_transfer.laplace import evidence_grid, log_evidence
from sklearn_bayes_transfer.modelfile import load_model, save_model
from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter

runner = CliRunner()


def cnn_prior(rank: int = 3, seed: int = 0) -> Prior:
    torch.manual_seed(seed)
    base = Prior.from_module(get_backbone("small_cnn", width=4), variance=1.0)
    g = torch.Generator().manual_seed(seed)
    variance = torch.exp(torch.empty(base.n_params).uniform_(math.log(1e-4), math.log(1e-2), generator=g))
    factor = 0.5 * torch.randn(rank, base.n_params, generator=g) * variance.sqrt()
    return Prior(base.mean, variance, factor, names=base.names, shapes=base.shapes, buffers=base.buffers,
                 meta=base.meta)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits_images()
    return X[:60], y[:60]


def evidence_fit(digits, **params) -> PriorRegularizedClassifier:
    X, y = digits
    settings = dict(prior_scale="evidence", batch_size=16, min_steps=40, verbose=0, random_state=0)
    return PriorRegularizedClassifier(cnn_prior(), **{**settings, **params}).fit(X, y)


def test_evidence_fit_updates_the_scale_and_logs_it(digits):
    clf = evidence_fit(digits)
    trace = clf.evidence_trace_
    steps = clf.training_plan_.epochs * clf.training_plan_.steps_per_epoch
    assert [entry["step"] for entry in trace] == update_steps(steps) and len(trace) == EVIDENCE_UPDATES
    assert clf.prior_scale_ == trace[-1]["prior_scale"] == clf.penalty_.scale
    low, high = clf.prior_.reference_scale() * 1e-3, clf.prior_.reference_scale() * 1e9
    assert all(low <= entry["prior_scale"] <= high and math.isfinite(entry["log_evidence"]) for entry in trace)
    assert clf.history[-1, "prior_scale"] == clf.prior_scale_
    assert len(clf.history[:, "prior_scale"]) == len(clf.history)  # every epoch
    assert np.isfinite(clf.predict_proba(digits[0])).all()


def test_each_update_takes_the_maximiser_of_the_evidence_at_the_current_weights(digits):
    clf = evidence_fit(digits)
    callback = dict(clf.callbacks_)["evidence"]
    callback.active_, callback.step_, callback.at_ = True, 0, [1]
    callback.dataset_ = clf.get_dataset(*clf._prepare_Xy(*digits))
    torch.manual_seed(3)
    callback._update(clf)
    torch.manual_seed(3)  # the same examples and drawn labels: the same curvature
    h, log_lik = clf._curvature(callback.dataset_, clf.prior_params_)
    grid = evidence_grid(callback.bounds_, per_decade=40)
    values = log_evidence(clf.prior_, clf._prior_residual(), h, grid, data_term=log_lik)
    assert math.log10(clf.prior_scale_) == pytest.approx(math.log10(grid[values.argmax()]), abs=0.03)
    assert callback.trace_[-1]["log_evidence"] == pytest.approx(values.max(), rel=1e-4)


def test_non_finite_curvature_skips_the_update_with_a_warning(digits, monkeypatch):
    clf = evidence_fit(digits)
    before = clf.prior_scale_
    weights = [p.detach().clone() for p in clf.module_.parameters()]
    callback = dict(clf.callbacks_)["evidence"]
    callback.dataset_ = clf.get_dataset(*clf._prepare_Xy(*digits))
    monkeypatch.setattr(clf, "_curvature", lambda dataset, params: ([torch.full_like(p, float("nan"))
                                                                     for p in params], 0.0))
    with pytest.warns(EvidenceWarning, match=f"stays {before:.4g}"):
        callback._update(clf)
    assert clf.prior_scale_ == before
    assert all(torch.equal(a, b) for a, b in zip(weights, clf.module_.parameters()))


def test_evidence_curve_and_model_file(digits, tmp_path):
    clf = evidence_fit(digits, prior_scale_bounds=(1e-1, 1e7))
    scales, values = clf.evidence_curve(*digits)
    assert scales[0] == pytest.approx(1e-1) and scales[-1] == pytest.approx(1e7) and len(values) == len(scales)
    assert np.isfinite(values).all()
    path = save_model(clf, tmp_path / "model.pt")
    loaded = load_model(path)
    assert loaded.prior_scale_ == clf.prior_scale_ and loaded.evidence_trace_ == clf.evidence_trace_
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "evidence at step" in result.stdout and f"{clf.prior_scale_:.4g}" in result.stdout


@pytest.mark.parametrize(("params", "needle"), [
    (dict(prior_structure="none"), "prior_scale='evidence' chooses the scale of a prior term"),
    (dict(prior_scale_bounds=(5.0, 1.0)), "prior_scale_bounds"),
    (dict(prior_scale_bounds=(1.0,)), "prior_scale_bounds"),
    (dict(prior_scale="evidance"), "prior_scale"),
    (dict(inference="laplace", head_weight_decay=0.0), "head_weight_decay > 0"),
])
def test_bad_settings_are_refused_before_training(digits, params, needle):
    with pytest.raises(ConfigError, match=needle):
        evidence_fit(digits, **params)


def test_evidence_curve_needs_a_fitted_prior_term(digits):
    clf = PriorRegularizedClassifier(cnn_prior(), prior_structure="none", max_epochs=1, verbose=0).fit(*digits)
    with pytest.raises(ConfigError, match="needs a prior term"):
        clf.evidence_curve(*digits)


def test_segmenter_chooses_its_scale_by_evidence():
    rng = np.random.default_rng(0)
    X = rng.random((6, 1, 12, 12), dtype=np.float32)
    masks = (X[:, 0] > 0.5).astype(np.int64)
    seg = PriorRegularizedSegmenter(cnn_prior(), prior_scale="evidence", batch_size=3, min_steps=10,
                                    augment="none", verbose=0, random_state=0).fit(X, masks)
    assert len(seg.evidence_trace_) == EVIDENCE_UPDATES and seg.prior_scale_ == seg.penalty_.scale


# -- Laplace inference --------------------------------------------------------------------------------------
def test_laplace_samples_and_linearised_predictions(digits):
    X, y = digits
    clf = PriorRegularizedClassifier(cnn_prior(), inference="laplace", n_samples=4, max_epochs=3, batch_size=16,
                                     verbose=0, random_state=0).fit(X, y)
    n_params = sum(p.numel() for p in clf.module_.parameters())
    assert clf.samples_.shape == (4, n_params)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    # Samples at the fitted weights give the MAP predictions (the linearised network is exact there).
    w_star = torch.cat([p.detach().reshape(-1) for p in clf.module_.parameters()])
    clf.samples_ = w_star.expand(4, -1).clone()
    map_proba = PriorRegularizedClassifier.predict_proba(clf.set_params(inference="map"), X)
    np.testing.assert_allclose(clf.set_params(inference="laplace").predict_proba(X), map_proba, atol=1e-5)


def test_linearised_predictions_of_a_linear_model_are_the_model_at_the_sample():
    # For logits linear in the weights, f(x; w*) + J (w - w*) = f(x; w): the GLM predictive of a
    # sample equals the network evaluated there.
    rng = np.random.default_rng(1)
    X, y = rng.random((30, 1, 4, 4), dtype=np.float32), np.arange(30) % 3
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    clf = PriorRegularizedClassifier(module=module, preprocess=None, inference="laplace", n_samples=3,
                                     max_epochs=2, batch_size=10, augment="none", verbose=0, random_state=0).fit(X, y)
    linearised = clf.predict_proba(X)
    params = list(clf.module_.parameters())
    expected = np.zeros_like(linearised)
    with torch.no_grad():
        for sample in clf.samples_:
            offset = 0
            for p in params:
                p.copy_(sample[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            expected += torch.softmax(clf.module_(torch.from_numpy(X)), 1).numpy() / len(clf.samples_)
    np.testing.assert_allclose(linearised, expected, atol=1e-5)


# -- command line --------------------------------------------------------------------------------------------
def test_finetune_and_tune_by_evidence(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 4)
    out = tmp_path / "model.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out", str(out),
                                 "--prior-scale", "evidence", "--min-steps", "10", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "by evidence" in result.stdout
    assert load_model(out).evidence_trace_
    result = runner.invoke(app, ["tune", "--prior", str(prior), "--data", str(data), "--method", "evidence",
                                 "--structures", "lowrank,isotropic", "--min-steps", "10", "--batch-size", "4",
                                 "--json", "--out", str(tmp_path / "best.pt")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    assert [r["params"]["prior_structure"] for r in payload["results"]] == ["lowrank", "isotropic"]
    best = max(payload["results"], key=lambda r: r["log_evidence"])
    assert best["chosen"] and payload["chosen"] == best["params"]
    assert load_model(tmp_path / "best.pt").prior_scale_ == pytest.approx(best["params"]["prior_scale"])


def test_cli_refuses_a_bad_prior_scale_word(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 2)
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out",
                                 str(tmp_path / "m.pt"), "--prior-scale", "evidense"])
    one_line_error(result, "--prior-scale", "'evidense'", "evidence")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = runner.invoke(app, ["tune", "--prior", str(prior), "--data", str(data), "--method", "evidence",
                                     "--prior-scale", "1e3"])
    one_line_error(result, "--prior-scale", "two values")

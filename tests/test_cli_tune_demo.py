"""``bt-transfer tune`` and ``bt-transfer demo``, and the tuning helpers behind them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_folder, write_prior
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.demo import digits_transfer_demo, fit_digits_prior
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.modelfile import load_model
from sklearn_bayes_transfer.tuning import (
    default_param_grid,
    prefer_default,
    results_table,
    select_index,
)

runner = CliRunner()


def test_default_grid_is_scaled_to_the_prior_and_includes_standard_finetuning():
    torch.manual_seed(0)
    prior = Prior.from_module(torch.nn.Linear(5, 3), variance=1e-4)
    ref = float(np.mean(prior.mean.numpy().astype(np.float64) ** 2) / 1e-4)
    grid = default_param_grid(prior, decades=[-1, 0, 2])
    np.testing.assert_allclose(grid[0]["prior_scale"], [ref / 10, ref, ref * 100], rtol=1e-5)
    assert grid[0]["prior_structure"] == ["lowrank"]
    assert grid[1] == {"prior_structure": ["none"]}
    # A prior with 100x smaller variances gets a 100x larger grid.
    tight = Prior(prior.mean, prior.variance / 100, names=prior.names, shapes=prior.shapes)
    np.testing.assert_allclose(default_param_grid(tight, decades=[0])[0]["prior_scale"], [ref * 100], rtol=1e-5)


def test_grid_refuses_bad_scales_and_none_as_a_structure():
    prior = Prior.from_module(torch.nn.Linear(2, 1), variance=0.1)
    with pytest.raises(ConfigError, match="> 0"):
        default_param_grid(prior, scales=[1.0, -2.0])
    with pytest.raises(ConfigError, match="include_none"):
        default_param_grid(prior, structures=["none"])


def test_results_table_sorts_by_rank():
    cv = {"params": [{"a": 1}, {"a": 2}], "mean_test_score": [0.5, 0.9], "std_test_score": [0.1, 0.0],
          "rank_test_score": [2, 1], "mean_fit_time": [1.0, 2.0]}
    rows = results_table(cv)
    assert [r["params"]["a"] for r in rows] == [2, 1]
    assert rows[0] == {"params": {"a": 2}, "mean": 0.9, "std": 0.0, "rank": 1, "fit_time": 2.0}


def _cv(folds: dict) -> dict:
    """cv_results_ of candidates given as {prior_scale or "none": [fold scores]}."""
    params = [{"prior_structure": "none"} if k == "none" else {"prior_structure": "lowrank", "prior_scale": k}
              for k in folds]
    scores = np.asarray(list(folds.values()), dtype=float)
    cv = {"params": params, "mean_test_score": scores.mean(1)}
    cv.update({f"split{i}_test_score": scores[:, i] for i in range(scores.shape[1])})
    return cv


def test_the_default_candidate_stays_unless_beaten_beyond_fold_noise():
    prior = Prior.from_module(torch.nn.Linear(3, 2), variance=0.01)
    auto = prior.reference_scale() * 1e3
    default = {"prior_structure": "lowrank", "prior_scale": "auto"}
    # Better on average, but fold by fold the difference is +0.1, -0.05, +0.01: mean 0.02 < its SE 0.044.
    noisy = _cv({0.5: [0.9, 0.8, 0.81], auto: [0.8, 0.85, 0.8], "none": [0.7, 0.7, 0.7]})
    assert select_index(noisy, default, prior) == 1
    # Better in every fold: mean difference 0.05, SE 0.0058.
    clear = _cv({0.5: [0.85, 0.9, 0.86], auto: [0.8, 0.85, 0.8], "none": [0.7, 0.7, 0.7]})
    assert select_index(clear, default, prior) == 0
    # Standard fine-tuning can win the same way.
    assert select_index(_cv({auto: [0.6, 0.62, 0.61], "none": [0.8, 0.82, 0.85]}), default, prior) == 1
    # Without the default candidate in the grid, the best mean wins.
    assert select_index(_cv({0.5: [0.9, 0.8, 0.81], 7.0: [0.8, 0.85, 0.8]}), default, prior) == 0
    # The rule as GridSearchCV's refit, on real fits.
    X, y = load_digits_images()
    search = GridSearchCV(PriorRegularizedClassifier(_small_prior(), max_epochs=1, verbose=0),
                          default_param_grid(_small_prior(), decades=[0, 3]), cv=2,
                          refit=prefer_default(default, _small_prior())).fit(X[:40], y[:40])
    assert search.best_index_ == select_index(search.cv_results_, default, _small_prior())


def _small_prior() -> Prior:
    torch.manual_seed(0)
    return Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01)


def test_tune_prints_every_candidate_and_saves_the_best(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 4)
    out = tmp_path / "best.pt"
    result = runner.invoke(app, ["tune", "--prior", str(prior), "--data", str(data), "--prior-scale", "1e-2,1e2",
                                 "--cv", "2", "--max-epochs", "2", "--lr", "0.05", "--batch-size", "4", "--json",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    candidates = [r["params"] for r in payload["results"]]
    assert {"prior_structure": "none"} in candidates
    assert sorted(c["prior_scale"] for c in candidates if "prior_scale" in c) == [1e-2, 1e2]
    assert all(0 <= r["mean"] <= 1 and r["std"] >= 0 for r in payload["results"])
    model = load_model(out)
    chosen = payload["chosen"]
    assert [r["params"] for r in payload["results"] if r["chosen"]] == [chosen]
    assert model.prior_structure == chosen["prior_structure"]
    # Logistic regression on the pixels, cross-validated on the same folds, beside the candidates.
    X, y = load_image_folder(data, image_size=(8, 8), channels=1)
    folds = StratifiedKFold(2, shuffle=True, random_state=0)
    reference = cross_val_score(LogisticRegression(max_iter=2000), X.reshape(len(X), -1), y, cv=folds)
    baseline, = payload["baselines"]
    assert "logistic regression" in baseline["name"]
    assert baseline["mean"] == pytest.approx(reference.mean()) and baseline["std"] == pytest.approx(reference.std())


def test_tune_table_output(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 3)
    result = runner.invoke(app, ["tune", "--prior", str(prior), "--data", str(data), "--prior-scale", "1",
                                 "--cv", "3", "--max-epochs", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "standard fine-tuning" in result.stdout and "lowrank, scale 1" in result.stdout
    assert "chosen:" in result.stdout and "logistic regression (pixels)" in result.stdout


@pytest.mark.parametrize("args, needles", [
    (["--prior-scale", "1,-3"], ["--prior-scale", "> 0"]),
    (["--prior-scale", "1,abc"], ["'abc'", "not a number"]),
    (["--cv", "5"], ["--cv 5", "class"]),
    (["--scoring", "f1"], ["f1"]),
    (["--structures", "bogus"], ["--structures", "'bogus'"]),
    (["--warmup", "-0.1"], ["--warmup"]),
])
def test_tune_bad_input(tmp_path, args, needles):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 3)
    result = runner.invoke(app, ["tune", "--prior", str(prior), "--data", str(data), "--max-epochs", "1", *args])
    one_line_error(result, *needles)


def test_tune_refuses_existing_output_before_training(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 3)
    out = tmp_path / "best.pt"
    out.write_bytes(b"keep me")
    result = runner.invoke(app, ["tune", "--prior", str(prior), "--data", str(data), "--out", str(out)])
    one_line_error(result, str(out), "--force")
    assert out.read_bytes() == b"keep me"


def test_demo_library_rows():
    prior = fit_digits_prior(max_epochs=4, width=4, rank=3)
    assert prior.meta["source_task"] == "supervised" and prior.rank == 3
    rows = digits_transfer_demo(labels_per_class=3, seeds=[0], max_epochs=2, prior=prior, tune_cv=2)
    assert [r["variant"] for r in rows] == ["standard fine-tuning", "learned prior (default scale)",
                                          "learned prior (tuned by CV)", "logistic regression on pixels"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert "chosen" in rows[2]


def test_demo_command_json():
    result = runner.invoke(app, ["demo", "--labels-per-class", "2", "--max-epochs", "1", "--source-epochs", "4",
                                 "--width", "4", "--rank", "2", "--cv", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0}

"""Searches on other processes: priors travel by reference, Dask and loky give the serial results."""

from __future__ import annotations

import json
import pickle

import joblib
import numpy as np
import pytest
import torch
from conftest import make_random_prior, one_line_error, write_folder, write_prior
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior, PriorFormatError, PriorRegularizedClassifier
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.datasets import load_digits_images

distributed = pytest.importorskip("dask.distributed")
runner = CliRunner()


def test_a_loaded_prior_pickles_by_reference(tmp_path):
    small = make_random_prior(shapes=((100, 100),), rank=3).save(tmp_path / "small.pt")
    big = make_random_prior(shapes=((1000, 1000),), rank=3, seed=1).save(tmp_path / "big.pt")
    sizes = {}
    for path in (small, big):
        estimator = PriorRegularizedClassifier(Prior.load(path))
        sizes[path.name] = len(pickle.dumps(clone(estimator)))
    # D = 1e6 against D = 1e4: the pickled candidate does not grow with the prior.
    assert abs(sizes["big.pt"] - sizes["small.pt"]) < 100 and sizes["big.pt"] < 20_000
    loaded = Prior.load(big)
    again = pickle.loads(pickle.dumps(loaded))
    assert again.digest() == loaded.digest()
    loaded.mean.add_(0.0)  # written into: the tensors travel
    assert len(pickle.dumps(loaded)) > 4_000_000
    assert len(pickle.dumps(loaded.reduce("diag"))) > 4_000_000  # derived content is not the file's


def test_a_worker_without_the_file_or_with_another_says_so(tmp_path):
    path = make_random_prior(seed=2).save(tmp_path / "prior.pt")
    sent = pickle.dumps(Prior.load(path))
    make_random_prior(seed=3).save(path)  # another prior at the same path
    with pytest.raises(PriorFormatError, match=r"not the one that was sent"):
        pickle.loads(sent)
    moved = pickle.dumps(Prior.load(path))
    path.rename(tmp_path / "elsewhere.pt")
    with pytest.raises(PriorFormatError, match="prior.pt' does not exist.*same path|readable at that path"):
        pickle.loads(moved)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def _search(prior: Prior, n_jobs: int) -> GridSearchCV:
    estimator = PriorRegularizedClassifier(prior, max_epochs=2, batch_size=16, verbose=0, random_state=0)
    return GridSearchCV(estimator, {"prior_scale": [1e-2, 1.0, 1e2]}, cv=2, n_jobs=n_jobs)


def test_dask_and_loky_searches_give_the_serial_results(tmp_path, cluster):
    torch.manual_seed(0)
    path = Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01).save(tmp_path / "prior.pt")
    X, y = load_digits_images()
    X, y = X[:60], y[:60]
    serial = _search(Prior.load(path), 1).fit(X, y)
    loky = _search(Prior.load(path), 2).fit(X, y)
    with distributed.Client(cluster), joblib.parallel_backend("dask"):
        dask = _search(Prior.load(path), -1).fit(X, y)
    for other in (loky, dask):
        assert other.best_params_ == serial.best_params_
        np.testing.assert_allclose(other.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"])


def test_tune_on_a_dask_scheduler(tmp_path, cluster):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 4)
    common = ["tune", "--prior", str(prior), "--data", str(data), "--prior-scale", "1e-2,1e2", "--cv", "2",
              "--max-epochs", "1", "--batch-size", "4", "--json"]
    local = json.loads(runner.invoke(app, common).stdout)
    result = runner.invoke(app, [*common, "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)
    assert [r["mean"] for r in remote["results"]] == pytest.approx([r["mean"] for r in local["results"]])
    assert remote["chosen"] == local["chosen"]
    one_line_error(runner.invoke(app, [*common, "--scheduler", "tcp://127.0.0.1:9"]), "--scheduler",
                   "no Dask scheduler")

"""Optimizers by name: the library helper, PriorFitter and the fit-prior command."""

from __future__ import annotations

import pytest
import torch
from conftest import write_folder
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import ConfigError, PriorFitter
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.optim import FOP, optimizer_arguments


@pytest.mark.parametrize("name, cls, has_momentum", [("sgd", torch.optim.SGD, True),
                                                     ("adam", torch.optim.Adam, False),
                                                     ("fop", FOP, True)])
def test_optimizer_arguments(name, cls, has_momentum):
    kwargs = optimizer_arguments(name, momentum=0.5, weight_decay=1e-4)
    assert kwargs["optimizer"] is cls
    assert ("optimizer__momentum" in kwargs) == has_momentum
    assert kwargs["optimizer__weight_decay"] == 1e-4
    assert optimizer_arguments(torch.optim.RMSprop)["optimizer"] is torch.optim.RMSprop


def test_unknown_optimizer_lists_the_allowed_names():
    with pytest.raises(ConfigError, match="'sgd', 'adam', 'fop'"):
        optimizer_arguments("lbfgs")


@pytest.mark.parametrize("optimizer", ["fop", "adam"])
def test_prior_fitter_trains_with_a_named_optimizer(optimizer):
    X, y = load_digits_images()
    fitter = PriorFitter(backbone="small_cnn", backbone_kwargs={"width": 4}, max_epochs=4, rank=2, batch_size=64,
                         lr=0.01, optimizer=optimizer).fit(X[:200], y[:200])
    assert type(fitter.net_.optimizer_).__name__ == {"fop": "FOP", "adam": "Adam"}[optimizer]
    assert fitter.prior_.rank == 2


def test_fit_prior_command_accepts_fop(tmp_path):
    data = write_folder(tmp_path / "imgs", 6)
    out = tmp_path / "prior.pt"
    result = CliRunner().invoke(app, ["fit-prior", "--data", str(data), "--out", str(out), "--backbone", "small_cnn",
                                      "--backbone-kwargs", '{"width": 4}', "--max-epochs", "4", "--rank", "2",
                                      "--optimizer", "fop", "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.exists()

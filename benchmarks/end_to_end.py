"""Training throughput of ``fit`` against a hand-written PyTorch loop on the same network and data.

Run:  python benchmarks/end_to_end.py [--images 256] [--epochs 2] [--rounds 3] [--image-size 32]
                                      [--batch-size 64] [--threads 2] [--device cpu]

Every run trains a ResNet-18 backbone with the small-image stem (``get_backbone("resnet18",
in_channels=3, small_input=True)``, D = 11.2M) and a linear head on the same ``--images`` random RGB
images (10 classes) for ``--epochs`` epochs in shuffled batches of ``--batch-size`` with SGD
(lr 0.05, momentum 0.9), from building the network to the last step:

- ``hand-written loop``: ``DataLoader`` + forward, cross-entropy, backward, ``optimizer.step()``;
- ``fit, no prior``, ``fit, isotropic prior``, ``fit, low-rank prior K=10``:
  ``PriorRegularizedClassifier.fit`` doing the same work (``augment="none"``,
  ``lr_schedule="constant"``, ``batchnorm="running"``), with ``prior_structure`` ``"none"``,
  ``"isotropic"`` or ``"lowrank"`` (a synthetic prior: the backbone's weights as mean, variances
  around 1e-6, a random K x D factor; ``prior_scale="auto"``, the proximal step of the default);
- ``fit, default recipe, low-rank K=10``: the estimator's defaults (light augmentation, warm-up
  and cosine schedule, BatchNorm statistics recomputed at the end), which do more work.

The runs take turns, round by round, so that load changes on a shared machine hit all of them
alike. The table gives median images/s over rounds and their ratio to the hand-written loop, twice:
for the whole call (``fit``: building the network, preparing the prior, training) and for its
training epochs alone (from the start of the first epoch to the end of the last, prior updates
included), with the one-off ``setup`` seconds between them, and for the median training step (the
speed of a long fit: the default recipe's 500 steps, against the handful here).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from skorch.callbacks import Callback
from torch import nn

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier

N_CLASSES = 10
LR, MOMENTUM = 0.05, 0.9


def make_prior(backbone: nn.Module, rank: int, seed: int = 0) -> Prior:
    """The backbone's weights as mean, variances log-uniform around 1e-6, a random K x D factor."""
    base = Prior.from_module(backbone, variance=1.0)
    g = torch.Generator().manual_seed(seed)
    variance = torch.exp(torch.empty(base.n_params).uniform_(np.log(2e-7), np.log(5e-6), generator=g))
    factor = torch.randn(rank, base.n_params, generator=g) * 1e-3
    return Prior(base.mean, variance, factor, names=base.names, shapes=base.shapes, buffers=base.buffers,
                 meta=base.meta)


class EpochClock(Callback):
    """Seconds from the start of the first training epoch to the end of the last, and of each step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = self.stop = self.step_start = 0.0
        self.steps: list[float] = []

    def on_epoch_begin(self, net, **kwargs) -> None:
        if len(net.history) == 1:
            self.start = _now(self.device)

    def on_batch_begin(self, net, **kwargs) -> None:
        self.step_start = _now(self.device)

    def on_batch_end(self, net, **kwargs) -> None:
        self.steps.append(_now(self.device) - self.step_start)

    def on_epoch_end(self, net, **kwargs) -> None:
        self.stop = _now(self.device)


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def hand_written(prior: Prior, X: np.ndarray, y: np.ndarray, epochs: int, batch_size: int,
                 device: str) -> tuple[float, float]:
    """Train with a plain PyTorch loop; returns the seconds of its epochs and its median step."""
    backbone = get_backbone("resnet18", in_channels=3, small_input=True)
    with torch.no_grad():  # copies, not views of the prior's mean (vector_to_parameters would alias it)
        for parameter, value in zip(backbone.parameters(), prior.split(prior.mean).values()):
            parameter.copy_(value)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, N_CLASSES)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    model.train()
    start, steps = _now(device), []
    for _ in range(epochs):
        for xb, yb in loader:
            step_start = _now(device)
            xb, yb = xb.to(device), yb.to(device)
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(_now(device) - step_start)
    return _now(device) - start, statistics.median(steps)


def estimator_fit(prior: Prior, X: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, device: str,
                  **params) -> tuple[float, float]:
    """``fit`` with these settings; returns the seconds of its training epochs and its median step."""
    same_work = dict(augment="none", lr_schedule="constant", batchnorm="running")
    settings = {**same_work, **params}
    clock = EpochClock(device)
    PriorRegularizedClassifier(prior, max_epochs=epochs, batch_size=batch_size, lr=LR, preprocess=None,
                               device=device, verbose=0, callbacks=[clock], **settings).fit(X, y)
    return clock.stop - clock.start, statistics.median(clock.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    X = rng.random((args.images, 3, args.image_size, args.image_size), dtype=np.float32)
    y = np.arange(args.images) % N_CLASSES
    prior = make_prior(get_backbone("resnet18", in_channels=3, small_input=True), rank=10)
    common = (X, y, args.epochs, args.batch_size, args.device)
    runs = {
        "hand-written loop": lambda: hand_written(prior, *common),
        "fit, no prior": lambda: estimator_fit(prior, *common, prior_structure="none"),
        "fit, isotropic prior": lambda: estimator_fit(prior, *common, prior_structure="isotropic"),
        "fit, low-rank prior K=10": lambda: estimator_fit(prior, *common, prior_structure="lowrank"),
        "fit, default recipe, low-rank K=10": lambda: estimator_fit(
            prior, *common, augment="light", lr_schedule="cosine", batchnorm="recompute"),
    }
    print(f"ResNet-18 small-input stem, D = {prior.n_params:,}, {args.images} images of 3 x {args.image_size} x "
          f"{args.image_size}, {args.epochs} epochs in batches of {args.batch_size}, device {args.device}, torch "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds (+1 warm-up)")
    images = args.images * args.epochs
    whole: dict[str, list[float]] = {name: [] for name in runs}
    epochs: dict[str, list[float]] = {name: [] for name in runs}
    setup: dict[str, list[float]] = {name: [] for name in runs}
    step: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            in_epochs, median_step = run()
            seconds = time.perf_counter() - start
            if round_:
                whole[name].append(images / seconds)
                epochs[name].append(images / in_epochs)
                setup[name].append(seconds - in_epochs)
                step[name].append(args.batch_size / median_step)
    base = {name: statistics.median(values["hand-written loop"])
            for name, values in (("whole", whole), ("epochs", epochs), ("step", step))}
    print(f"\n{'':<38}{'whole call':>20}{'training epochs':>20}{'median step':>20}")
    print(f"{'run':<38}" + f"{'images/s':>10}{'vs loop':>10}" * 3 + f"{'setup s':>10}")
    for name in runs:
        row = f"{name:<38}"
        for key, values in (("whole", whole), ("epochs", epochs), ("step", step)):
            median = statistics.median(values[name])
            row += f"{median:>10.1f}{median / base[key]:>9.2f}x"
        print(row + f"{statistics.median(setup[name]):>10.2f}")


if __name__ == "__main__":
    main()

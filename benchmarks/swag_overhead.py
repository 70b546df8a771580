"""What SWAG collection costs during source training (target: <= 3% of training time).

ResNet-18 with the small-image stem on 32x32 RGB inputs (D = 11.17M parameters), trained with
SGD through skorch, side by side in one run:

- ``plain``: training without SWAG;
- ``swag``:  the same training with :class:`SwagCallback` collecting once per epoch (rank 20).

Runs alternate (plain, swag, plain, swag, ...) so that machine noise hits both alike, and the
figures are medians. The collection time is also measured directly (each ``collect`` call is
timed), which is far less noisy than a difference of two wall-clock totals. The epochs here are
short (``--n-images`` images), so the per-epoch share is pessimistic for real data sets; the
script also prints the cost of one snapshot relative to one training step, which tells how
often ``collect_unit="step"`` may collect within the budget.

Finally it compares one snapshot as :class:`SwagCollector` takes it (the parameters streamed in
cache-sized chunks through a small float64 scratch buffer) with the naive version (``torch.cat``
of all parameters, then whole-vector updates).

Run:  python benchmarks/swag_overhead.py [--n-images 128] [--epochs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from skorch import NeuralNet
from skorch.callbacks import Callback
from torch import nn

from sklearn_bayes_transfer.backbones import BackboneWithHead, get_backbone
from sklearn_bayes_transfer.swag import SwagCallback, SwagCollector


class TimedSwag(SwagCallback):
    """SwagCallback that records how long each snapshot takes."""

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        super().on_train_begin(net, X=X, y=y, **kwargs)
        self.collect_seconds_ = []
        collect = self.collector_.collect

        def timed(params=None):
            start = time.perf_counter()
            collect(params)
            self.collect_seconds_.append(time.perf_counter() - start)

        self.collector_.collect = timed


class Clock(Callback):
    """Wall-clock time of every training step and every epoch.

    It must be the last callback, so that an epoch's time includes the other callbacks'
    ``on_epoch_end`` (the SWAG snapshot). skorch's own ``dur`` is taken by a default callback
    that runs before user callbacks, so it would leave the snapshot out.
    """

    def initialize(self):
        self.seconds_ = []
        self.epoch_seconds_ = []
        return self

    def on_epoch_begin(self, net, **kwargs):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, net, **kwargs):
        self.epoch_seconds_.append(time.perf_counter() - self._epoch_start)

    def on_batch_begin(self, net, training=False, **kwargs):
        self._start = time.perf_counter()

    def on_batch_end(self, net, training=False, **kwargs):
        if training:
            self.seconds_.append(time.perf_counter() - self._start)


def make_net(swag: bool, epochs: int, batch_size: int, seed: int) -> tuple[NeuralNet, TimedSwag | None, Clock]:
    torch.manual_seed(seed)
    backbone = get_backbone("resnet18", in_channels=3, small_input=True)
    module = BackboneWithHead(backbone, nn.Linear(backbone.feature_dim, 10))
    clock = Clock()
    callbacks: list = [("clock", clock)]
    cb = None
    if swag:
        cb = TimedSwag(start=0, collect_every=1, unit="epoch", rank=20, lr=0.01)
        callbacks.insert(0, ("swag", cb))
    net = NeuralNet(module, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.05,
                    optimizer__momentum=0.9, max_epochs=epochs, batch_size=batch_size, train_split=None,
                    iterator_train__shuffle=True, callbacks=callbacks, verbose=0)
    return net, cb, clock


def snapshot_microbenchmark(repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one snapshot: our collector vs a naive torch.cat implementation."""
    backbone = get_backbone("resnet18", in_channels=3, small_input=True)
    named = list(backbone.named_parameters())
    ours = SwagCollector(named, rank=20)
    d = ours.n_params
    mean = torch.zeros(d, dtype=torch.float64)
    sq = torch.zeros(d, dtype=torch.float64)
    dev = torch.zeros(20, d, dtype=torch.float32)

    def naive(n: int) -> None:
        w = torch.cat([p.detach().reshape(-1) for _, p in named]).to(torch.float64)
        mean.mul_(n / (n + 1)).add_(w / (n + 1))
        sq.mul_(n / (n + 1)).add_(w * w / (n + 1))
        dev[n % 20] = (w - mean).to(torch.float32)

    ours_s, naive_s = [], []
    for i in range(repeats):
        start = time.perf_counter()
        ours.collect()
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        naive(i)
        naive_s.append(time.perf_counter() - start)
    return statistics.median(ours_s), statistics.median(naive_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.n_images, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=args.n_images).astype(np.int64)

    epoch_s: dict[str, list[float]] = {"plain": [], "swag": []}
    step_s: dict[str, list[float]] = {"plain": [], "swag": []}
    collect_s: list[float] = []
    for r in range(args.repeats):
        for kind in ("plain", "swag"):
            net, cb, clock = make_net(kind == "swag", args.epochs, args.batch_size, seed=r)
            net.fit(X, y)
            epoch_s[kind] += clock.epoch_seconds_
            step_s[kind] += clock.seconds_
            if cb is not None:
                collect_s += cb.collect_seconds_
            print(f"  run {r + 1}/{args.repeats} {kind:5s}: epochs "
                  + ", ".join(f"{d:.2f}s" for d in clock.epoch_seconds_), flush=True)

    d = sum(p.numel() for p in get_backbone("resnet18", in_channels=3, small_input=True).parameters())
    plain, swag = statistics.median(epoch_s["plain"]), statistics.median(epoch_s["swag"])
    collect = statistics.median(collect_s)
    step = statistics.median(step_s["plain"])
    steps_per_epoch = -(-args.n_images // args.batch_size)
    print()
    print(f"ResNet-18 small stem, 32x32x3, D = {d:,}, rank 20, {args.n_images} images/epoch "
          f"({steps_per_epoch} steps of {args.batch_size}), torch threads {torch.get_num_threads()}")
    fastest_plain, fastest_swag = min(epoch_s["plain"]), min(epoch_s["swag"])
    print(f"epoch, plain training          median {plain:7.3f} s, fastest {fastest_plain:7.3f} s")
    median_diff = 100 * (swag - plain) / plain
    fastest_diff = 100 * (fastest_swag - fastest_plain) / fastest_plain
    print(f"epoch, with SWAG collection    median {swag:7.3f} s, fastest {fastest_swag:7.3f} s   "
          f"(difference {median_diff:+.1f}% / {fastest_diff:+.1f}%: a difference of two noisy totals)")
    print(f"snapshot, timed directly       median {1000 * collect:7.1f} ms = {100 * collect / plain:.2f}% of the "
          f"median plain epoch here ({100 * collect / fastest_plain:.2f}% of the fastest)")
    print(f"training step                  median {1000 * step:7.1f} ms; one snapshot = "
          f"{collect / step:.2f} steps -> collect_unit='step' stays <= 3% with collect_every >= "
          f"{int(np.ceil(collect / step / 0.03))}")
    ours, naive = snapshot_microbenchmark()
    print(f"one snapshot, chunked stream   median {1000 * ours:7.1f} ms; "
          f"naive torch.cat version {1000 * naive:7.1f} ms")


if __name__ == "__main__":
    main()

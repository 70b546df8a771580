"""What the prior costs per training step: plain skorch fine-tuning vs PriorRegularizedClassifier.

Run:  python benchmarks/step_overhead.py [--steps 3] [--threads 2] [--ranks 5 20] [--device cpu]

Both nets train the same network, a ResNet-18 backbone with the small-image stem
(``get_backbone("resnet18", in_channels=3, small_input=True)``, D = 11.2M parameters) and a
linear head, on the same batch (64 RGB images of 64x64, 10 classes), with SGD:

- ``skorch``: ``skorch.NeuralNetClassifier`` (no prior);
- ``prior K=k proximal|gradient``: ``PriorRegularizedClassifier`` with a synthetic prior
  (the backbone's weights as mean, variances ~1e-6, a random K x D factor, ``prior_scale=1e4``,
  inside the useful range and where the gradient update is stable too), the prior term applied
  as a proximal step (the default with SGD) or through the gradient.

Each net is initialised, then ``net.train_step(batch)`` (forward, loss, backward, optimizer
step, and for the prior nets the prior term) is timed. The nets take turns, step by step, so
that load changes on a shared machine hit all of them alike; the first round is a warm-up.
The table gives the median ms/step and its overhead over plain skorch. A step takes seconds on
a CPU, so that difference is within the step-to-step noise; the last two columns time the prior
term alone (the proximal step, or the penalty's value and backward) on the same net, which is
what the overhead is made of, as a share of the plain step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from skorch import NeuralNetClassifier
from torch import nn

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.backbones import BackboneWithHead, get_backbone
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier

N_CLASSES = 10


def make_prior(backbone: nn.Module, rank: int, seed: int = 0) -> Prior:
    """The backbone's weights as mean, variances log-uniform around 1e-6, a random K x D factor."""
    base = Prior.from_module(backbone, variance=1.0)
    g = torch.Generator().manual_seed(seed)
    variance = torch.exp(torch.empty(base.n_params).uniform_(np.log(2e-7), np.log(5e-6), generator=g))
    factor = torch.randn(rank, base.n_params, generator=g) * 1e-3
    return Prior(base.mean, variance, factor, names=base.names, shapes=base.shapes, buffers=base.buffers,
                 meta=base.meta)


def initialised(net, X: np.ndarray, y: np.ndarray):
    """``net`` ready for ``train_step``, with a history batch to log into.

    The prior nets learn ``classes_`` and bind the prior in ``fit``: one epoch on one image per
    class (a small step, not timed).
    """
    if isinstance(net, PriorRegularizedClassifier):
        first = np.unique(y, return_index=True)[1]
        net.fit(X[first], y[first])
    else:
        net.initialize()
    net.history.new_epoch()
    net.history.new_batch()
    return net


def batch_of(net, X: np.ndarray, y: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as the net's own train_step receives it (after the estimator's preprocessing)."""
    if isinstance(net, PriorRegularizedClassifier):
        xt, yt = net._prepare_Xy(X, y)
        return xt.to(device), yt.to(device)
    return torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prior_term(net: PriorRegularizedClassifier):
    """What the net adds to a plain step: the proximal step, or the penalty's value and backward."""
    if net.prior_update == "proximal":
        return net._proximal_step

    def value_and_gradient():
        net.penalty_(net.prior_params_).backward()

    return value_and_gradient


def median_seconds(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per net (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rng = np.random.default_rng(0)
    X = rng.random((args.batch_size, 3, args.image_size, args.image_size), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, args.batch_size)
    y[:N_CLASSES] = np.arange(N_CLASSES)  # every class present, so both nets size the head alike

    backbone = get_backbone("resnet18", in_channels=3, small_input=True)
    common = dict(lr=0.01, batch_size=args.batch_size, max_epochs=1, train_split=None, device=args.device,
                  verbose=0)
    nets = {"skorch": NeuralNetClassifier(BackboneWithHead(backbone, nn.Linear(backbone.feature_dim, N_CLASSES)),
                                          criterion=nn.CrossEntropyLoss, **common)}
    largest = make_prior(backbone, max(args.ranks))
    for rank in sorted(args.ranks):
        # Lower ranks are the leading rows of the largest factor (a view, no copy).
        prior = largest if rank == largest.rank else Prior(
            largest.mean, largest.variance, largest.factor[:rank], names=largest.names, shapes=largest.shapes,
            buffers=largest.buffers, meta=largest.meta)
        for update in ("proximal", "gradient"):
            nets[f"prior K={rank} {update}"] = PriorRegularizedClassifier(
                prior, prior_scale=1e4, prior_update=update, preprocess=None, head_weight_decay=1.0, **common)

    batches = {}
    for name, net in nets.items():
        initialised(net, X, y)
        batches[name] = batch_of(net, X, y, args.device)
    d = sum(p.numel() for p in backbone.parameters())
    print(f"ResNet-18 small-input stem, D = {d:,} backbone parameters, batch {args.batch_size} x 3 x "
          f"{args.image_size} x {args.image_size}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.steps} timed steps per net (medians)")

    times: dict[str, list[float]] = {name: [] for name in nets}
    for step in range(args.steps + 1):
        for name, net in nets.items():
            sync(args.device)
            start = time.perf_counter()
            net.train_step(batches[name])
            sync(args.device)
            if step:  # the first round warms up allocators and caches
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["skorch"])
    print(f"\n{'net':<24}{'ms/step':>9}{'min':>8}{'max':>8}{'overhead':>10}{'prior term ms':>15}{'% of step':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        row = f"{name:<24}{1e3 * median:>9.0f}{1e3 * min(values):>8.0f}{1e3 * max(values):>8.0f}"
        if name != "skorch":
            term = median_seconds(prior_term(nets[name]), 2 * args.steps + 1, args.device)
            row += f"{100 * (median - base) / base:>+9.1f}%{1e3 * term:>15.1f}{100 * term / base:>10.2f}%"
        print(row)
    print("\noverhead: difference of the step medians (steps vary by a few % on a shared CPU); prior term: the\n"
          "proximal step, or the penalty's value + backward, timed alone on the same net (median).")


if __name__ == "__main__":
    main()

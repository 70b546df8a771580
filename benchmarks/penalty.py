"""Time the prior penalty (value + gradient) on ResNet-18 against its memory floor and against
``torch.distributions.LowRankMultivariateNormal``.

Run:  python benchmarks/penalty.py [--repeats 9] [--threads 2] [--ranks 5 20] [--skip-distributions]

Per configuration it prints medians (ms) of:
- ours:  PriorPenalty value + backward (two streamed passes over the factor, torch operations),
- floor: two full reductions over the precomputed factor W (the same bytes our passes read),
- torch.distributions: LowRankMultivariateNormal.log_prob on the concatenated parameters with
  autograd (the official code's route), built once outside the timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from sklearn_bayes_transfer import Prior, PriorPenalty


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_prior(model: torch.nn.Module, rank: int, seed: int = 0) -> Prior:
    base = Prior.from_module(model, variance=1.0)
    g = torch.Generator().manual_seed(seed)
    d = base.n_params
    variance = torch.rand(d, generator=g) * 1e-5 + 1e-8
    factor = torch.randn(rank, d, generator=g) * 1e-3
    return Prior(base.mean, variance, factor, names=base.names, shapes=base.shapes, meta=base.meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--skip-distributions", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 1e-3)
    d = sum(p.numel() for p in params)
    print(f"ResNet-18 backbone: D = {d:,} parameters, {len(params)} tensors, {args.threads} threads, "
          f"median of {args.repeats}")
    header = (f"{'K':>3} {'factor':>9} | {'ours ms':>8} {'floor ms':>9} {'ours/floor':>10} | "
              f"{'distributions ms':>16} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    for rank in args.ranks:
        prior = make_prior(model, rank)
        dist_ms = None
        if not args.skip_distributions:
            dist = torch.distributions.LowRankMultivariateNormal(
                prior.mean, prior.factor.T.contiguous(), prior.variance)

            def through_distributions() -> None:
                for p in params:
                    p.grad = None
                (-dist.log_prob(torch.cat([p.reshape(-1) for p in params]))).backward()

            dist_ms = median_ms(through_distributions, args.repeats)  # its time varies 2-3x from call to call
            del dist
        for dtype in (torch.float32, torch.bfloat16):
            penalty = PriorPenalty(prior, scale=1.0, factor_dtype=dtype)
            penalty(params)  # builds W on first use
            w_t = penalty._cache[(torch.device("cpu"), torch.float32)].w_t

            def ours() -> None:
                for p in params:
                    p.grad = None
                penalty(params).backward()

            def floor() -> None:
                w_t.sum()
                w_t.sum()

            # Interleave the timings so drifts of the machine's speed hit both alike.
            t_ours, t_floor = [], []
            for _ in range(3):
                t_ours.append(median_ms(ours, args.repeats))
                t_floor.append(median_ms(floor, args.repeats))
            t_ours, t_floor = statistics.median(t_ours), statistics.median(t_floor)
            name = str(dtype).replace("torch.", "")
            dist_txt = f"{dist_ms:16.1f} {dist_ms / t_ours:7.1f}x" if dist_ms else f"{'-':>16} {'-':>8}"
            print(f"{rank:>3} {name:>9} | {t_ours:8.1f} {t_floor:9.1f} {t_ours / t_floor:9.2f}x | {dist_txt}",
                  flush=True)


if __name__ == "__main__":
    main()

"""Shared fixtures: small random priors and official-format prior files, seeds fixed.

- ``random_prior(shapes, rank=..., seed=...)``: a :class:`Prior` over a few hundred parameters
  whose low-rank part matters (the factor's rows are of the size of the diagonal's spread);
- ``mlp``: a tiny ``nn.Sequential`` whose parameter shapes are :data:`MLP_SHAPES`;
- ``official_prior``: writes the four files of the paper repository's format
  (``<prefix>_model.pt``, ``_mean.pt``, ``_variance.pt``, ``_covmat.pt``) for a small ResNet-like
  module, from simulated SWAG snapshots, and returns the prefix with the raw ingredients;
- ``fop_kernel``: each compiled FOP kernel module built at install time that this CPU runs, in
  charge of FOP, or a skip; ``threads`` restores torch's thread count after a test changes it.

Helpers several test modules share (imported ``from conftest import ...``):

- the float64 reference of the prior term: ``reference`` (a ``LowRankMultivariateNormal``),
  ``ref_penalty_and_grad``, ``point_near``, ``flat_grad``, ``assert_grad_close``;
- command-line fixtures: ``write_folder`` (a labelled folder of tiny PNGs), ``write_prior`` (a
  small_cnn prior file) and ``one_line_error`` (a failed command printed one line and no traceback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from sklearn_bayes_transfer import Prior, _kernel
from sklearn_bayes_transfer.backbones import get_backbone

__all__ = ["CLASSES", "MLP_SHAPES", "PREPROCESS", "OfficialFiles", "TinyResNet", "assert_grad_close", "flat_grad",
           "make_mlp", "make_random_prior", "one_line_error", "point_near", "ref_penalty_and_grad", "reference",
           "write_folder", "write_prior"]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test models gain nothing from intra-op threads; on a shared 2-core machine threads
    waiting for each other made tiny convolutions 10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(params=["generic", "x86_64_v3", "x86_64_v4"])
def fop_kernel(request, monkeypatch):
    """Each compiled FOP kernel module built at install time that this CPU can run (the generic
    one takes the code paths of CPUs without AVX2 or AVX-512), put in charge of FOP; a skip where
    that level was not built (no C compiler at install time, another architecture, an older CPU)."""
    module = _kernel.available_kernels().get(request.param)
    if module is None:
        pytest.skip(f"the {request.param} FOP kernel was not built for this installation or cannot run on this CPU")
    monkeypatch.setattr(_kernel, "load_kernel", lambda: module)
    return module


@pytest.fixture
def threads():
    """Restore the session's torch thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


#: Shapes of ``make_mlp()``'s parameters: Linear(3, 4), Linear(4, 5), Linear(5, 2).
MLP_SHAPES = ((4, 3), (4,), (5, 4), (5,), (2, 5), (2,))
MLP_NAMES = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``Linear(3, 4) - ReLU - Linear(4, 5) - ReLU - Linear(5, 2)``: 53 parameters in 6 tensors."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    return net.to(dtype)


def make_random_prior(
    shapes: Sequence[Sequence[int]] = MLP_SHAPES,
    *,
    rank: int = 3,
    seed: int = 0,
    names: Sequence[str] | None = None,
    factor_dtype: torch.dtype = torch.float32,
    variance_range: tuple[float, float] = (1e-3, 1e-1),
    factor_scale: float = 1.0,
    mean_scale: float = 0.5,
    buffers: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> Prior:
    """A random prior: log-uniform variances, factor rows ``~ factor_scale * sqrt(variance)``.

    Scaling the factor with the diagonal's spread keeps the low-rank part of the covariance
    comparable to the diagonal one, so tests that compare structures see a real difference.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = [tuple(s) for s in shapes]
    d = sum(math.prod(s) for s in shapes)
    lo, hi = (math.log(v) for v in variance_range)
    variance = torch.exp(lo + (hi - lo) * torch.rand(d, generator=g, dtype=torch.float64)).float()
    mean = mean_scale * torch.randn(d, generator=g)
    factor = factor_scale * torch.randn(rank, d, generator=g) * variance.sqrt()
    if names is None:
        names = MLP_NAMES if shapes == list(MLP_SHAPES) else [f"layer{i}.weight" for i in range(len(shapes))]
    info = {"backbone": "test-mlp", "method": "swag", "rank": rank}
    info.update(meta or {})
    return Prior(mean, variance, factor.to(factor_dtype), names=names, shapes=shapes, buffers=buffers, meta=info)


@pytest.fixture
def random_prior() -> Callable[..., Prior]:
    """Factory of small random priors (see :func:`make_random_prior`)."""
    return make_random_prior


@pytest.fixture
def mlp() -> nn.Sequential:
    """A tiny float32 MLP whose parameters match ``random_prior()``'s default shapes."""
    return make_mlp()


# -- the official repository's four-file format -------------------------------------------------
class _Block(nn.Module):
    """A torchvision-style BasicBlock, so state_dict keys look like ``layer1.0.conv1.weight``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class TinyResNet(nn.Module):
    """ResNet layout at toy width (about 5,000 parameters); ``fc`` optional like ``fc = Identity``."""

    def __init__(self, with_fc: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_Block(8, 8, 1))
        self.layer2 = nn.Sequential(_Block(8, 16, 2))
        self.fc = nn.Linear(16, 10) if with_fc else nn.Identity()


@dataclass
class OfficialFiles:
    """What :func:`official_prior` wrote, and the ingredients to check an import against."""

    prefix: Path
    model: TinyResNet
    mean: torch.Tensor  # float32 (D,), parameters() order, fc excluded
    variance: torch.Tensor  # SWAG diagonal as written
    deviations: torch.Tensor  # raw K x D deviation rows (before any normalisation)
    covmat: torch.Tensor  # as written: raw or divided by sqrt(K - 1)
    backbone_names: list[str]


def _simulate_swag(w0: torch.Tensor, rank: int, n_snapshots: int, seed: int) -> tuple[torch.Tensor, ...]:
    """SWAG moments of ``n_snapshots`` iterates around ``w0``, in float64 as SWAG must.

    Each weight has its own spread (log-uniform over two decades); the last ``rank``
    deviations are taken from the running mean at collection time, as SWAG collects them.
    """
    g = torch.Generator().manual_seed(seed)
    d = w0.numel()
    spread = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    snaps = w0.double() + spread * torch.randn(n_snapshots, d, generator=g, dtype=torch.float64)
    counts = torch.arange(1, n_snapshots + 1, dtype=torch.float64)[:, None]
    running_mean = snaps.cumsum(0) / counts
    mean = running_mean[-1]
    diag = ((snaps ** 2).mean(0) - mean ** 2).clamp_min(1e-8)
    deviations = snaps[-rank:] - running_mean[-rank:]
    return mean.float(), diag.float(), deviations.float(), snaps[-1].float()


@pytest.fixture
def official_prior(tmp_path: Path) -> Callable[..., OfficialFiles]:
    """Factory writing an official-format prior; arguments choose K, normalisation, fc, mismatch."""

    def make(
        *,
        rank: int = 5,
        normalized: bool = False,
        with_fc: bool = False,
        model_holds_last_iterate: bool = False,
        n_snapshots: int = 40,
        seed: int = 0,
        name: str = "official",
    ) -> OfficialFiles:
        torch.manual_seed(seed)
        model = TinyResNet(with_fc=with_fc)
        backbone = [(n, p) for n, p in model.named_parameters() if not n.startswith("fc.")]
        w0 = torch.cat([p.detach().reshape(-1) for _, p in backbone])
        mean, diag, deviations, last = _simulate_swag(w0, rank, n_snapshots, seed)
        with torch.no_grad():
            # The model file holds the SWAG mean (or, for the mismatch case, the last iterate),
            # and BatchNorm statistics that are not the defaults, so their import is visible.
            source = last if model_holds_last_iterate else mean
            offset = 0
            for _, p in backbone:
                p.copy_(source[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.3)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.num_batches_tracked.fill_(1234)
        covmat = deviations / math.sqrt(rank - 1) if normalized else deviations
        prefix = tmp_path / name
        torch.save(model.state_dict(), f"{prefix}_model.pt")
        torch.save(mean.clone(), f"{prefix}_mean.pt")
        torch.save(diag.clone(), f"{prefix}_variance.pt")
        torch.save(covmat.clone(), f"{prefix}_covmat.pt")
        return OfficialFiles(prefix, model, mean, diag, deviations, covmat, [n for n, _ in backbone])

    return make


# -- the float64 reference of the prior term -----------------------------------------------------------------
def reference(prior: Prior, structure: str, scale: float, eps: float) -> LowRankMultivariateNormal:
    """The scaled, reduced prior as a float64 torch distribution."""
    reduced = prior.reduce(structure)
    factor = reduced.factor.to(torch.float64)
    if factor.shape[0] == 0:  # the distribution needs one column; a zero column adds nothing
        factor = torch.zeros(1, reduced.n_params, dtype=torch.float64)
    return LowRankMultivariateNormal(
        reduced.mean.to(torch.float64),
        cov_factor=(math.sqrt(scale) * factor).T.contiguous(),
        cov_diag=scale * reduced.variance.to(torch.float64) + eps,
    )


def ref_penalty_and_grad(dist: LowRankMultivariateNormal, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log p(w) + log p(mean)`` and its gradient, in float64."""
    w64 = w.detach().to(torch.float64).requires_grad_(True)
    value = -dist.log_prob(w64) + dist.log_prob(dist.loc)
    (grad,) = torch.autograd.grad(value, w64)
    return value.detach(), grad


def point_near(prior: Prior, seed: int = 1) -> torch.Tensor:
    """A weight vector ``mean + r`` whose deviation has a diagonal and a low-rank component."""
    g = torch.Generator().manual_seed(seed)
    r = prior.variance.sqrt() * torch.randn(prior.n_params, generator=g)
    if prior.rank:
        r = r + prior.factor.float().T @ torch.randn(prior.rank, generator=g)
    return prior.mean + r


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params]).to(torch.float64)


def assert_grad_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(ours.to(torch.float64), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


# -- command-line fixtures ---------------------------------------------------------------------------------------
CLASSES = ("ant", "bee", "cat")
PREPROCESS = {"image_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25]}


def one_line_error(result, *needles: str) -> str:
    """A failed command: exit code 1, no traceback, one stderr line holding every needle."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_folder(root: Path, n_per_class: int = 6, *, seed: int = 0, size=(8, 8),
                 classes=CLASSES) -> Path:
    """Grey PNGs whose brightness depends on the class, so a tiny network can tell them apart."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.clip(rng.normal(50 + 75 * k, 15, size), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def write_prior(path: Path, *, width: int = 4, meta=None, with_preprocess: bool = True) -> Path:
    torch.manual_seed(0)
    info = {"preprocess": PREPROCESS} if with_preprocess else {}
    info.update(meta or {})
    return Prior.from_module(get_backbone("small_cnn", width=width), variance=0.01, meta=info).save(path)

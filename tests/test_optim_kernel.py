"""FOP's compiled CPU kernel against FOP's torch path: same weights, directions and
preconditioners step after step, on layers that exercise every column count the kernel handles
(1 .. 16), its vector and scalar paths, segments cut inside layers, several threads, param
groups, the guards and ``state_dict``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sklearn_bayes_transfer import Backend, ConfigError, _kernel
from sklearn_bayes_transfer import optim as optim_module
from sklearn_bayes_transfer.optim import FOP


@pytest.fixture
def kernel(fop_kernel):
    return fop_kernel



class Zoo(nn.Module):
    """One layer per column count: d = 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16 (and a 9-column layer
    with too few rows for the kernel, and a bias-only path)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(3, 8, 1),             # d = 1, 24 rows
            nn.Conv2d(8, 8, (1, 2)),        # d = 2
            nn.Conv2d(8, 8, (1, 3)),        # d = 3
            nn.Conv2d(8, 8, 2),             # d = 4
            nn.Conv2d(8, 8, (1, 5)),        # d = 5
            nn.Conv2d(8, 8, (2, 3)),        # d = 6
            nn.Conv2d(8, 8, (1, 7)),        # d = 7
            nn.Conv2d(8, 8, (2, 4)),        # d = 8
            nn.Conv2d(8, 40, 3),            # d = 9, 320 rows: vector blocks and tails
            nn.Conv2d(40, 8, (3, 4)),       # d = 12
            nn.Conv2d(8, 8, 4),             # d = 16
            nn.Conv2d(8, 2, 3, bias=False),  # d = 9 with 16 rows
        ])
        self.tiny = nn.Conv2d(1, 2, 3)      # d = 9, 2 rows: 3 * 2 < 9, stays on the torch path
        self.head = nn.Linear(5, 3)         # d = 5: a linear layer in the kernel too



def run(model: nn.Module, opt: FOP, steps: int, seed: int = 0) -> None:
    """``steps`` optimizer steps on synthetic gradients that pull towards the weights (so that
    consecutive gradients correlate and the preconditioners learn), different per parameter."""
    for t in range(steps):
        for i, p in enumerate(model.parameters()):
            g = torch.Generator().manual_seed(1000 * (seed + t) + i)
            p.grad = torch.randn(p.shape, generator=g) + 2.0 * p.detach()
        opt.step()


def twins(**options) -> tuple:
    torch.manual_seed(0)
    ours = Zoo()
    ref = copy.deepcopy(ours)
    kwargs = dict(lr=0.05, precond_lr=0.5, momentum=0.9, weight_decay=1e-3)
    kwargs.update(options)
    return (ours, FOP(ours.parameters(), backend="compiled", **kwargs),
            ref, FOP(ref.parameters(), backend="torch", **kwargs))


def assert_same_state(ours: nn.Module, opt: FOP, ref: nn.Module, ref_opt: FOP, rtol: float = 2e-4) -> None:
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol * float(q.detach().abs().max()), msg=name)
        a, b = opt.state[p], ref_opt.state[q]
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=rtol * float(b[key].abs().max()) + 1e-12,
                                       msg=f"{name}: {key}")


def moved_preconditioners(model: nn.Module, opt: FOP) -> int:
    """How many preconditioners are visibly away from the identity (guards the comparisons)."""
    return sum(float((opt.state[p]["precond"] - torch.eye(opt.state[p]["precond"].shape[0])).abs().max()) > 1e-3
               for p in model.parameters() if "precond" in opt.state[p])


# -- same numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_kernel_steps_equal_torch_steps(kernel, monkeypatch, threads, n_threads, momentum):
    monkeypatch.setattr(optim_module, "_KERNEL_SEGMENT", 200)  # cut layers into many segments
    torch.set_num_threads(n_threads)
    ours, opt, ref, ref_opt = twins(momentum=momentum)
    calls = []
    original = FOP._kernel_update
    monkeypatch.setattr(FOP, "_kernel_update", lambda self, lib, updates: (calls.append(len(updates)),
                                                                           original(self, lib, updates)))
    run(ours, opt, 6)
    run(ref, ref_opt, 6)
    # 12 convs and the head take the kernel path (not on step 1, which creates M = I)
    assert calls == [13] * 5
    assert moved_preconditioners(ours, opt) >= 8
    assert_same_state(ours, opt, ref, ref_opt)


def test_param_groups_and_the_norm_cap(kernel):
    torch.manual_seed(0)
    ours = Zoo()
    ref = copy.deepcopy(ours)

    def groups(model: nn.Module) -> list[dict]:
        convs = list(model.convs.parameters())
        return [{"params": convs[:10], "lr": 0.02, "precond_lr": 2.0, "max_precond_norm": 1.02},
                {"params": convs[10:] + list(model.tiny.parameters()) + list(model.head.parameters()),
                 "momentum": 0.5}]

    opt = FOP(groups(ours), lr=0.05, precond_lr=0.2, momentum=0.9, backend="compiled")
    ref_opt = FOP(groups(ref), lr=0.05, precond_lr=0.2, momentum=0.9, backend="torch")
    run(ours, opt, 6)
    run(ref, ref_opt, 6)
    capped = [opt.state[p]["precond"] for p in list(ours.convs.parameters())[:10] if p.ndim > 1]
    # the cap is active: the Hölder bound sits at 1.02 for some preconditioner
    bounds = [float(torch.sqrt(m.abs().sum(0).max() * m.abs().sum(1).max())) for m in capped]
    assert max(bounds) == pytest.approx(1.02, rel=1e-5)
    assert_same_state(ours, opt, ref, ref_opt)


def test_large_layer_uses_vector_blocks_across_threads(kernel, threads):
    # A 3 x 3 layer of 256 x 64 filters: 147,456 elements, three default segments.
    torch.set_num_threads(2)
    torch.manual_seed(1)
    ours = nn.Conv2d(64, 256, 3, bias=False)
    ref = copy.deepcopy(ours)
    opt = FOP(ours.parameters(), lr=0.1, precond_lr=1e3, momentum=0.9, backend="compiled")
    ref_opt = FOP(ref.parameters(), lr=0.1, precond_lr=1e3, momentum=0.9, backend="torch")
    for t in range(4):
        g = torch.Generator().manual_seed(t)
        grad = torch.randn(ours.weight.shape, generator=g) + ours.weight.detach()  # correlated steps
        ours.weight.grad, ref.weight.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    assert moved_preconditioners(ours, opt) == 1
    assert_same_state(ours, opt, ref, ref_opt)


def test_state_dict_round_trip_on_the_kernel_path(kernel):
    ours, opt, _, _ = twins()
    run(ours, opt, 3)
    clone = copy.deepcopy(ours)
    restored = FOP(clone.parameters(), backend="compiled")
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(ours, opt, 3, seed=10)
    run(clone, restored, 3, seed=10)
    for p, q in zip(ours.parameters(), clone.parameters()):
        assert torch.equal(p, q)


# -- guards ----------------------------------------------------------------------------------------
def test_non_finite_gradient_on_a_kernel_layer_is_skipped_like_torch(kernel):
    ours, opt, ref, ref_opt = twins()
    run(ours, opt, 2)
    run(ref, ref_opt, 2)
    for model, optimizer in ((ours, opt), (ref, ref_opt)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        model.convs[8].weight.grad[0, 0, 0, 0] = float("nan")
        before = model.convs[8].weight.detach().clone()
        with pytest.warns(RuntimeWarning, match=r"shape \(40, 8, 3, 3\)\) holds NaN or inf; its update was skipped"):
            optimizer.step()
        assert torch.equal(model.convs[8].weight, before)
    assert_same_state(ours, opt, ref, ref_opt)
    assert moved_preconditioners(ours, opt) >= 8


def test_auto_uses_the_kernel_and_torch_backend_does_not(kernel, monkeypatch):
    used = []
    monkeypatch.setattr(FOP, "_kernel_update", lambda self, lib, updates: used.append(self.backend))
    for backend in ("auto", "torch"):
        model = nn.Conv2d(4, 4, 3)
        opt = FOP(model.parameters(), backend=backend)
        for _ in range(2):
            model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
            opt.step()
    assert used == [Backend.AUTO]


def test_float64_and_non_contiguous_parameters_take_the_torch_path(kernel, monkeypatch):
    used = []
    monkeypatch.setattr(FOP, "_kernel_update", lambda self, lib, updates: used.append(len(updates)))
    for model in (nn.Conv2d(4, 4, 3).double(), nn.Conv2d(4, 4, 3).to(memory_format=torch.channels_last)):
        opt = FOP(model.parameters())
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(2, 4, 5, 5, dtype=model.weight.dtype)).sum().backward()
            opt.step()
    assert used == []


def test_environment_switch_turns_the_kernel_off(kernel, monkeypatch):
    monkeypatch.setenv("SKLEARN_BAYES_TRANSFER_KERNEL", "0")
    assert FOP([nn.Parameter(torch.zeros(2, 3))])._kernel_library() is None


def test_backend_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"backend='fast' is not valid; expected one of 'auto', 'compiled', 'torch'"):
        FOP([nn.Parameter(torch.zeros(2, 3))], backend="fast")
    monkeypatch.setattr(_kernel, "_best", lambda: None)  # an installation built without a C compiler
    with pytest.raises(ConfigError, match=r"FOP: backend='compiled'.*not built.*backend='auto'"):
        FOP([nn.Parameter(torch.zeros(2, 3))], backend="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nn.Linear(3, 2)
        opt = FOP(model.parameters())  # auto: falls back silently
        for _ in range(2):
            model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
            opt.step()


def test_the_best_built_level_for_this_cpu_is_loaded():
    kernels = _kernel.available_kernels()
    if not kernels:
        pytest.skip("no compiled FOP kernel was built for this installation")
    level = kernels["generic"].cpu_level()
    assert level in (0, 1, 3, 4)
    assert ("x86_64_v4" in kernels) <= (level >= 4) and ("x86_64_v3" in kernels) <= (level >= 3)
    best = next(kernels[name] for name in ("x86_64_v4", "x86_64_v3", "generic") if name in kernels)
    assert _kernel.load_kernel() is best
    assert isinstance(best.openmp(), bool)

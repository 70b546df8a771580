"""PriorPenalty against torch.distributions.LowRankMultivariateNormal (float64 reference).

Scaling convention (docs/design.md): ``Sigma_tilde = lambda * Sigma + eps * I
= diag(lambda * variance + eps) + (sqrt(lambda) F)^T (sqrt(lambda) F)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    assert_grad_close,
    flat_grad,
    make_mlp,
    point_near,
    ref_penalty_and_grad,
    reference,
)
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from sklearn_bayes_transfer import ConfigError, Prior, PriorMismatchError, PriorPenalty

STRUCTURES = ["lowrank", "diag", "isotropic"]
SCALES = [1e-6, 1e-3, 1.0, 1e3, 1e6, 1e10]
# Parameter sizes 12, 4, 20, 5, 10, 2: a chunk of 7 cuts inside ``0.weight`` and ``2.weight`` and
# spans ``0.weight``/``0.bias`` and ``2.bias``/``4.weight``/... (offsets 12, 16, 36, 41, 51).
ODD_SHAPES = ((4, 3), (4,), (5, 4), (5,), (2, 5), (2,))


# -- helpers ------------------------------------------------------------------------------------
def load_into(module: nn.Module, prior: Prior, w: torch.Tensor) -> list[nn.Parameter]:
    """Copy the flat ``w`` into ``module`` (whose parameters are the prior's, in order)."""
    params = list(module.parameters())
    assert [n for n, _ in module.named_parameters()] == list(prior.names)
    with torch.no_grad():
        for p, view in zip(params, prior.split(w).values()):
            p.copy_(view)
    return params


class Wrapper(nn.Module):
    """Names its child ``module`` like DataParallel / DDP do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


class WithHead(nn.Module):
    """A backbone-plus-head model, for a prior fitted on the bare backbone."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2, 3)


# -- value, log_prob and gradient against the reference ------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_matches_low_rank_mvn(random_prior, mlp, structure, scale, eps):
    prior = random_prior(rank=3, seed=2)
    w = point_near(prior)
    params = load_into(mlp, prior, w)
    penalty = PriorPenalty(prior, scale=scale, eps=eps, structure=structure)
    dist = reference(prior, structure, scale, eps)
    ref_value, ref_grad = ref_penalty_and_grad(dist, torch.cat([p.detach().reshape(-1) for p in params]))

    value = penalty(params)
    value.backward()
    grad = flat_grad(params)

    assert value.dtype == torch.float32 and value.dim() == 0
    assert math.isfinite(value.item()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=0)
    assert_grad_close(grad, ref_grad, rtol=1e-4)
    with torch.no_grad():
        full = penalty.log_prob(params)
    ref_full = dist.log_prob(torch.cat([p.detach().reshape(-1) for p in params]).double())
    torch.testing.assert_close(full.double(), ref_full, rtol=1e-4, atol=0)
    assert penalty.logdet == pytest.approx(float(2 * torch.log(torch.diagonal(
        torch.linalg.cholesky(dist.covariance_matrix))).sum()), rel=1e-9)


def test_structures_really_differ(random_prior, mlp):
    # Guards the test above: with these priors the low-rank part changes value and gradient.
    prior = random_prior(rank=3, seed=2)
    params = load_into(mlp, prior, point_near(prior))
    with torch.no_grad():
        values = {s: float(PriorPenalty(prior, structure=s)(params)) for s in STRUCTURES}
    assert abs(values["lowrank"] - values["diag"]) > 0.05 * values["diag"]
    assert abs(values["isotropic"] - values["diag"]) > 0.05 * values["diag"]


def test_zero_at_the_mean(random_prior, mlp):
    prior = random_prior(seed=3)
    params = load_into(mlp, prior, prior.mean)
    value = PriorPenalty(prior, scale=10.0)(params)
    value.backward()
    assert value.item() == 0.0
    assert float(flat_grad(params).abs().max()) == 0.0


@pytest.mark.parametrize("chunk_size", [1, 7, 13, 53, 10_000])
@pytest.mark.parametrize("structure", ["lowrank", "isotropic"])
def test_chunks_spanning_and_cutting_parameters(random_prior, mlp, chunk_size, structure):
    prior = random_prior(ODD_SHAPES, rank=4, seed=5)
    params = load_into(mlp, prior, point_near(prior, seed=6))
    penalty = PriorPenalty(prior, scale=3.0, eps=1e-4, structure=structure, chunk_size=chunk_size)
    ref_value, ref_grad = ref_penalty_and_grad(reference(prior, structure, 3.0, 1e-4),
                                               torch.cat([p.detach().reshape(-1) for p in params]))
    value = penalty(params)
    value.backward()
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=0)
    assert_grad_close(flat_grad(params), ref_grad, rtol=1e-4)
    # Each gradient lands on its own parameter, with its shape.
    assert [tuple(p.grad.shape) for p in params] == [tuple(s) for s in ODD_SHAPES]


def test_float64_module(random_prior):
    prior = random_prior(rank=3, seed=7)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    params = load_into(net, prior, point_near(prior).double())
    penalty = PriorPenalty(prior, scale=1e4, eps=1e-6, chunk_size=7)
    ref_value, ref_grad = ref_penalty_and_grad(reference(prior, "lowrank", 1e4, 1e-6),
                                               torch.cat([p.detach().reshape(-1) for p in params]))
    value = penalty(params)
    value.backward()
    assert value.dtype == torch.float64
    assert all(p.grad.dtype == torch.float64 for p in params)
    # All-float64 arithmetic: far tighter than the float32 tolerance.
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=0)
    assert_grad_close(flat_grad(params), ref_grad, rtol=1e-9)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_factor(random_prior, mlp, low):
    prior = random_prior(ODD_SHAPES, rank=4, seed=8)
    params = load_into(mlp, prior, point_near(prior, seed=9))
    exact = PriorPenalty(prior, scale=100.0, chunk_size=7)
    value32 = exact(params)
    value32.backward()
    grad32 = flat_grad(params)
    for penalty in (PriorPenalty(prior.with_factor_dtype(low), scale=100.0, chunk_size=7),
                    PriorPenalty(prior, scale=100.0, factor_dtype=low, chunk_size=7),
                    PriorPenalty(prior, scale=100.0, factor_dtype=low, chunk_size=7)):
        for p in params:
            p.grad = None
        value = penalty(params)
        value.backward()
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, value32, rtol=1e-2, atol=0)
        assert_grad_close(flat_grad(params), grad32, rtol=1e-2)
    assert PriorPenalty(prior.with_factor_dtype(low)).prior.factor_dtype == low


# -- binding to real modules -------------------------------------------------------------------
def test_bind_plain_module(random_prior, mlp):
    prior = random_prior()
    params = PriorPenalty(prior).bind(mlp)
    expected = [mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias, mlp[4].weight, mlp[4].bias]
    assert len(params) == len(expected) and all(p is q for p, q in zip(params, expected))


@pytest.mark.parametrize("wrap", ["module-prefix", "backbone-child", "both"])
def test_bind_wrapped_and_backbone_models(random_prior, mlp, wrap):
    prior = random_prior(rank=3, seed=10)
    w = point_near(prior, seed=11)
    load_into(mlp, prior, w)
    model = {"module-prefix": lambda: Wrapper(mlp), "backbone-child": lambda: WithHead(mlp),
             "both": lambda: Wrapper(WithHead(mlp))}[wrap]()
    penalty = PriorPenalty(prior, scale=2.0, chunk_size=7)
    params = penalty.bind(model)
    assert all(p is q for p, q in zip(params, mlp.parameters()))
    value = penalty(params)
    value.backward()
    ref_value, ref_grad = ref_penalty_and_grad(reference(prior, "lowrank", 2.0, 0.0), w)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=0)
    assert_grad_close(flat_grad(list(mlp.parameters())), ref_grad, rtol=1e-4)
    if wrap != "module-prefix":
        head = model.module.head if wrap == "both" else model.head
        assert head.weight.grad is None  # the head is not under the prior


def test_bind_mismatch_names_parameters_and_shapes(random_prior):
    prior = random_prior()
    wrong = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(PriorMismatchError) as err:
        PriorPenalty(prior).bind(wrong)
    msg = str(err.value)
    assert "2.weight" in msg and "(5, 4)" in msg and "(6, 4)" in msg
    assert "0.weight" not in msg.split("module parameters start with")[0]  # only the mismatching ones

    short = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
    with pytest.raises(PriorMismatchError, match=r"4\.weight"):
        PriorPenalty(prior).bind(short)


def test_wrong_parameter_list_is_a_mismatch(random_prior, mlp):
    penalty = PriorPenalty(random_prior())
    params = list(mlp.parameters())
    with pytest.raises(PriorMismatchError, match="6 parameter tensors"):
        penalty(params[:-1])
    with pytest.raises(PriorMismatchError, match=r"'2\.weight'.*\(4, 5\)"):
        penalty([params[0], params[1], params[2].T, *params[3:]])


def test_interleaved_evaluations_keep_their_own_gradients(random_prior):
    # The first pass caches r / d for the backward; a second evaluation in between must not leak.
    prior = random_prior(rank=3, seed=12)
    penalty = PriorPenalty(prior, scale=5.0, chunk_size=7)
    nets, points = [], []
    for seed in (13, 14):
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
        points.append(point_near(prior, seed=seed))
        load_into(net, prior, points[-1])
        nets.append(net)
    out_a = penalty(list(nets[0].parameters()))
    out_b = penalty(list(nets[1].parameters()))
    out_a.backward()
    out_b.backward()
    dist = reference(prior, "lowrank", 5.0, 0.0)
    for net, w in zip(nets, points):
        assert_grad_close(flat_grad(list(net.parameters())), ref_penalty_and_grad(dist, w)[1], rtol=1e-4)


def test_second_backward_through_a_retained_graph(random_prior, mlp):
    # The kernel turns its forward buffers into the gradient in place; a second backward must
    # not reuse them.
    prior = random_prior(rank=4, seed=15)
    params = load_into(mlp, prior, point_near(prior, seed=16))
    value = PriorPenalty(prior, scale=2.0)(params)
    value.backward(retain_graph=True)
    first = flat_grad(params)
    for p in params:
        p.grad = None
    (3.0 * value).backward()
    assert_grad_close(flat_grad(params), 3.0 * first, rtol=1e-6)
    _, ref_grad = ref_penalty_and_grad(reference(prior, "lowrank", 2.0, 0.0),
                                       torch.cat([p.detach().reshape(-1) for p in params]))
    assert_grad_close(first, ref_grad, rtol=1e-4)


def test_value_without_grad_equals_value_with_grad(random_prior, mlp):
    prior = random_prior(rank=4, seed=19)
    params = load_into(mlp, prior, point_near(prior, seed=20))
    penalty = PriorPenalty(prior, scale=2.0)
    with torch.no_grad():
        quiet = penalty(params)
    # float32 sums: the kernel's loops without the r / d store may add in another order
    assert quiet.item() == pytest.approx(penalty(params).item(), rel=1e-6)


# -- the proximal step ----------------------------------------------------------------------------
def dense_prox(dist: LowRankMultivariateNormal, w: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``argmin_v 0.5 (v-m)^T P (v-m) + 0.5 (v-w)^T S^{-1} (v-w)`` by a dense float64 solve.

    Setting the gradient to zero gives ``(I + S P)(v - m) = w - m`` with ``P = Sigma^{-1}``, so
    ``v - m = Sigma (Sigma + S)^{-1} (w - m)`` (one solve, no inverse; ``S = 0`` gives ``v = w``).
    """
    cov = dist.covariance_matrix
    r = w.double() - dist.loc
    return dist.loc + cov @ torch.linalg.solve(cov + torch.diag(steps.double()), r)


def half_maha(dist: LowRankMultivariateNormal, v: torch.Tensor) -> float:
    return float(-dist.log_prob(v.double()) + dist.log_prob(dist.loc))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("step", [0.0, 1e-3, 1.0, 1e3, 1e12, 1e30])
def test_prox_matches_dense_solution(random_prior, mlp, structure, step):
    prior = random_prior(ODD_SHAPES, rank=3, seed=17)
    w = point_near(prior, seed=18)
    params = load_into(mlp, prior, w)
    scale, eps = 1e3, 1e-6
    dist = reference(prior, structure, scale, eps)
    penalty = PriorPenalty(prior, scale=scale, eps=eps, structure=structure, chunk_size=7)
    expected = dense_prox(dist, w, torch.full((prior.n_params,), step))

    value = penalty.prox_(params, step)
    v = torch.cat([p.detach().reshape(-1) for p in params]).double()

    assert bool(torch.isfinite(v).all()) and math.isfinite(value)
    r_size = float((w.double() - dist.loc).abs().max())
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5 * r_size)
    # The returned value is the penalty at the new weights.
    assert value == pytest.approx(half_maha(dist, v), rel=1e-4, abs=1e-9)
    # A contraction towards the mean, however large the step.
    m = dist.loc
    assert float((v - m).norm()) <= float((w.double() - m).norm()) * (1 + 1e-6)
    assert half_maha(dist, v) <= half_maha(dist, w) * (1 + 1e-6)
    if step >= 1e12:
        torch.testing.assert_close(v, m, rtol=0, atol=1e-6)


def test_prox_per_parameter_steps(random_prior, mlp):
    prior = random_prior(ODD_SHAPES, rank=3, seed=19)
    w = point_near(prior, seed=20)
    params = load_into(mlp, prior, w)
    steps = [0.5, 0.0, 2.0, 1e3, 0.1, 7.0]
    per_element = torch.cat([torch.full((math.prod(s),), v) for s, v in zip(prior.shapes, steps)])
    dist = reference(prior, "lowrank", 10.0, 0.0)
    PriorPenalty(prior, scale=10.0, chunk_size=7).prox_(params, steps)
    v = torch.cat([p.detach().reshape(-1) for p in params]).double()
    torch.testing.assert_close(v, dense_prox(dist, w, per_element), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[1].detach(), w[12:16])  # step 0 leaves a tensor alone


def test_prox_repeated_calls_and_then_gradient(random_prior, mlp):
    # prox_ reuses cached K x K terms for the same steps and shares buffers with the gradient pass.
    prior = random_prior(ODD_SHAPES, rank=3, seed=24)
    w = point_near(prior, seed=25)
    params = load_into(mlp, prior, w)
    penalty = PriorPenalty(prior, scale=4.0, chunk_size=7)
    dist = reference(prior, "lowrank", 4.0, 0.0)
    expected = w.double()
    for _ in range(3):
        penalty.prox_(params, 0.3)
        expected = dense_prox(dist, expected, torch.full((prior.n_params,), 0.3))
    v = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(v.double(), expected, rtol=1e-5, atol=1e-6)
    value = penalty(params)
    value.backward()
    assert_grad_close(flat_grad(params), ref_penalty_and_grad(dist, v)[1], rtol=1e-4)


def test_prox_stiff_lowrank_prior(random_prior):
    # A factor far larger than the diagonal (as in real SWAG priors): steps >> d make the K x K
    # system of the Woodbury prox nearly singular unless it is formed without cancellation.
    shapes = ((10, 40), (10,))
    prior = random_prior(shapes, rank=5, seed=26, factor_scale=300.0, variance_range=(1e-8, 1e-5))
    w = point_near(prior, seed=27)
    for scale, step in ((1e6, 1e-3), (1.0, 10.0), (1.0, 1e-6)):
        net = nn.Linear(40, 10)
        params = [net.weight, net.bias]
        with torch.no_grad():
            for p, view in zip(params, prior.split(w).values()):
                p.copy_(view)
        PriorPenalty(prior, scale=scale).prox_(params, step)
        v = torch.cat([p.detach().reshape(-1) for p in params]).double()
        dist = reference(prior, "lowrank", scale, 0.0)
        expected = dense_prox(dist, w, torch.full((prior.n_params,), step))
        r_size = float((w.double() - dist.loc).abs().max())
        # float32 weights: the exact answer itself rounds at ~5e-8 of |r|.
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6 * r_size)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_explicit_step_is_a_gradient_step(random_prior, mlp, structure):
    prior = random_prior(ODD_SHAPES, rank=3, seed=28)
    w = point_near(prior, seed=29)
    params = load_into(mlp, prior, w)
    steps = [0.5, 0.0, 2.0, 1e-3, 0.1, 7.0]
    per_element = torch.cat([torch.full((math.prod(s),), v) for s, v in zip(prior.shapes, steps)])
    dist = reference(prior, structure, 10.0, 1e-4)
    penalty = PriorPenalty(prior, scale=10.0, eps=1e-4, structure=structure, chunk_size=7)
    value = penalty.explicit_step_(params, steps)
    v = torch.cat([p.detach().reshape(-1) for p in params]).double()
    expected = w.double() - per_element.double() * ref_penalty_and_grad(dist, w)[1]
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)
    assert value == pytest.approx(half_maha(dist, v), rel=1e-4)  # the value at the new weights
    assert all(p.grad is None for p in params)  # the step leaves no gradients behind


def test_explicit_step_agrees_with_prox_to_first_order(random_prior, mlp):
    # prox(w) = w - S P (w - m) + O((S P)^2): halving the step quarters the gap.
    prior = random_prior(ODD_SHAPES, rank=3, seed=30)
    w = point_near(prior, seed=31)
    penalty = PriorPenalty(prior, scale=10.0, chunk_size=7)
    s_max = 1.0 / penalty.max_precision
    gaps = []
    for step in (0.02 * s_max, 0.01 * s_max):
        explicit, proximal = load_into(make_mlp(), prior, w), load_into(mlp, prior, w)
        penalty.explicit_step_(explicit, step)
        penalty.prox_(proximal, step)
        moved = torch.cat([p.detach().reshape(-1) for p in proximal]) - w
        gap = torch.cat([(a - b).detach().reshape(-1) for a, b in zip(explicit, proximal)])
        gaps.append(float(gap.double().norm() / moved.double().norm()))
    assert gaps[0] < 0.05
    assert gaps[1] == pytest.approx(gaps[0] / 2, rel=0.2)  # relative gap O(S P): linear in the step


@pytest.mark.parametrize("step", [-1.0, float("nan"), float("inf"), [1.0, 2.0]])
def test_prox_rejects_bad_steps(random_prior, mlp, step):
    prior = random_prior(seed=19)
    params = load_into(mlp, prior, point_near(prior, seed=20))
    before = [p.detach().clone() for p in params]
    with pytest.raises(ConfigError, match="step"):
        PriorPenalty(prior).prox_(params, step)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing half-applied


# -- autograd ------------------------------------------------------------------------------------
def test_gradcheck_tiny_float64():
    g = torch.Generator().manual_seed(21)
    shapes = [(2, 3), (2,), (1, 2)]
    d = 10
    variance = torch.rand(d, generator=g) + 0.5
    prior = Prior(torch.randn(d, generator=g), variance, 0.7 * torch.randn(2, d, generator=g),
                  names=["a.weight", "a.bias", "b.weight"], shapes=shapes)
    penalty = PriorPenalty(prior, scale=0.8, eps=0.1, chunk_size=4)
    inputs = tuple(torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes)
    assert torch.autograd.gradcheck(lambda *ps: penalty(list(ps)), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# -- configuration errors ------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_scale_must_be_positive(random_prior, scale):
    with pytest.raises(ConfigError, match="prior_scale") as err:
        PriorPenalty(random_prior(), scale=scale)
    assert repr(scale) in str(err.value) or str(scale) in str(err.value)


@pytest.mark.parametrize("eps", [-1e-3, float("nan")])
def test_eps_must_be_non_negative(random_prior, eps):
    with pytest.raises(ConfigError, match="prior_eps"):
        PriorPenalty(random_prior(), eps=eps)


def test_unknown_structure_lists_allowed_values(random_prior):
    with pytest.raises(ConfigError) as err:
        PriorPenalty(random_prior(), structure="full")
    msg = str(err.value)
    assert "'full'" in msg and all(f"'{s}'" in msg for s in STRUCTURES)
    with pytest.raises(ConfigError, match="none"):
        PriorPenalty(random_prior(), structure="none")


def test_zero_variance_needs_eps(random_prior):
    prior = random_prior()
    zero = Prior(prior.mean, torch.zeros_like(prior.variance), None, names=prior.names, shapes=prior.shapes)
    with pytest.raises(ConfigError, match="prior_eps"):
        PriorPenalty(zero, structure="diag")
    penalty = PriorPenalty(zero, structure="diag", eps=0.5)
    assert penalty.max_precision == pytest.approx(2.0)


def test_chunk_size_and_prior_type_checked(random_prior):
    with pytest.raises(ConfigError, match="chunk_size"):
        PriorPenalty(random_prior(), chunk_size=0)
    with pytest.raises(ConfigError, match="Prior.load"):
        PriorPenalty("prior.pt")  # type: ignore[arg-type]

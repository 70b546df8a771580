"""FOP: the hypergradient against finite differences, the scalar case against hypergradient
descent, convergence against tuned SGD, state round trips, bad input and the guards."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.optim import FOP


def _tiny_net() -> nn.Module:
    # Every code path: a conv with a non-square kernel (d = 6 spatial taps, n = 4 rows), a wide
    # linear layer (d = 16, n = 3: thin products for both the hypergradient and the update), a
    # narrow one (d = 3, n = 2: full hypergradient, thin update) and biases (base update).
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=(2, 3)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 2, 3),
        nn.Tanh(),
        nn.Linear(3, 2),
    ).double()


def _data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 5, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 2, generator=g, dtype=torch.float64))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()


def test_hypergradient_matches_finite_differences():
    model = _tiny_net()
    x, y = _data()
    lr, rho, wd = 0.2, 1e-3, 0.01
    opt = FOP(model.parameters(), lr=lr, precond_lr=rho, momentum=0.5, weight_decay=wd)
    _step(model, opt, x, y)
    before = [p.detach().clone() for p in model.parameters()]  # theta_1
    _step(model, opt, x, y)  # theta_2 = theta_1 - lr U_1 M_1 M_1^T, M_1 != I
    layers = {0: model[0].weight, 1: model[3].weight, 2: model[5].weight}
    index = {id(p): i for i, p in enumerate(model.parameters())}
    snapshot = {k: (opt.state[p]["direction"].clone(), opt.state[p]["precond"].clone())
                for k, p in layers.items()}

    def objective(p: torch.Tensor, m: torch.Tensor) -> float:
        # J(M) = L(theta_1 - lr U_1 M M^T) + wd/2 ||theta||^2, other parameters at theta_2.
        u, _ = snapshot[next(k for k, q in layers.items() if q is p)]
        d = m.shape[0]
        w = before[index[id(p)]] - lr * (u.reshape(-1, d) @ m @ m.T).reshape(p.shape)
        original = p.detach().clone()
        with torch.no_grad():
            p.copy_(w)
            value = _loss(model, x, y).item() + 0.5 * wd * sum(
                float((q**2).sum()) for q in model.parameters())
            p.copy_(original)
        return value

    g = torch.Generator().manual_seed(7)
    eps = 1e-6
    checks = {}
    for k, p in layers.items():
        u, m1 = snapshot[k]
        d = m1.shape[0]
        # The layout is the one the optimizer used: rebuilding theta_2 from theta_1 matches.
        rebuilt = before[index[id(p)]] - lr * (u.reshape(-1, d) @ m1 @ m1.T).reshape(p.shape)
        torch.testing.assert_close(rebuilt, p.detach(), rtol=0, atol=1e-12)
        assert not torch.allclose(m1, torch.eye(d, dtype=m1.dtype), atol=1e-6)
        if d * d <= 36:  # every entry
            directions = list(torch.eye(d * d, dtype=m1.dtype).reshape(d * d, d, d))
        else:  # random directions for the 16 x 16 factor
            directions = [torch.randn(d, d, generator=g, dtype=m1.dtype) for _ in range(6)]
        checks[k] = [(e, (objective(p, m1 + eps * e) - objective(p, m1 - eps * e)) / (2 * eps))
                     for e in directions]

    _step(model, opt, x, y)  # uses g_2 = grad J at theta_2 to update M
    for k, p in layers.items():
        # What the optimizer used as dJ/dM: M_2 = M_1 - precond_lr * dJ/dM.
        hypergradient = (snapshot[k][1] - opt.state[p]["precond"]) / rho
        assert hypergradient.abs().max() > 1e-4  # the test is not vacuous
        for e, fd in checks[k]:
            assert float((hypergradient * e).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def _scalar_model() -> nn.Module:
    torch.manual_seed(3)
    # A 1x1 convolution and a one-input linear layer: d = 1, so M is a genuine scalar.
    return nn.Sequential(nn.Conv2d(2, 3, kernel_size=1, bias=False), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 1, bias=False), nn.Tanh(),
                         nn.Linear(1, 2, bias=False)).double()


def test_scalar_preconditioner_follows_hypergradient_descent():
    model = _scalar_model()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 2, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    lr, rho = 0.3, 0.5
    opt = FOP(model.parameters(), lr=lr, precond_lr=rho)
    followed = [model[0].weight, model[4].weight]
    grads, rates, weights = [], [], []
    for _ in range(10):
        opt.zero_grad()
        _loss(model, x, y).backward()
        weights.append([p.detach().clone().numpy() for p in followed])
        grads.append([p.grad.clone().numpy() for p in followed])
        opt.step()
        rates.append([lr * opt.state[p]["precond"].item() ** 2 for p in followed])
    for k in range(len(followed)):
        a = [r[k] for r in rates]  # effective step size a_t = lr * m_t^2
        for t in range(1, len(a)):
            gu = float(np.sum(grads[t][k] * grads[t - 1][k]))
            beta = 4 * rho * lr * a[t - 1]
            # Baydin et al.'s rule a_t = a_{t-1} + beta g_t . g_{t-1}, taken in sqrt(a).
            assert math.sqrt(a[t]) == pytest.approx(
                math.sqrt(a[t - 1]) + beta * gu / (2 * math.sqrt(a[t - 1])), rel=1e-12)
            assert a[t] == pytest.approx(
                a[t - 1] + beta * gu + (beta * gu) ** 2 / (4 * a[t - 1]), rel=1e-12)
        for t in range(len(a) - 1):  # ... and the weights move by a_t along the gradient
            np.testing.assert_allclose(weights[t + 1][k], weights[t][k] - a[t] * grads[t][k],
                                       rtol=1e-12, atol=1e-15)
        assert abs(a[-1] - lr) > 1e-3 * lr  # the learning rate really adapted


def _quadratic(seed: int = 0, d: int = 10, rows: int = 6, condition: float = 1e3):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, -math.log10(condition), d, dtype=torch.float64)) @ q.T
    w_star = torch.randn(rows, d, generator=g, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(a)
    assert eigenvalues.max() / eigenvalues.min() >= condition * 0.999

    def loss(w: torch.Tensor) -> torch.Tensor:  # a linear layer on correlated inputs
        r = w - w_star
        return 0.5 * torch.einsum("ij,jk,ik->", r, a, r)

    return loss, (rows, d)


def _steps_to(loss, shape, make_optimizer, target: float, budget: int = 5000) -> int:
    w = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([w])
    start = loss(w).item()
    for step in range(budget):
        opt.zero_grad()
        value = loss(w)
        if value.item() <= target * start:
            return step
        value.backward()
        opt.step()
    return budget


def test_fop_beats_best_sgd_on_ill_conditioned_quadratic():
    loss, shape = _quadratic()
    target = 1e-3
    sgd = {lr: _steps_to(loss, shape, lambda p, lr=lr: torch.optim.SGD(p, lr=lr), target)
           for lr in (0.25, 0.5, 1.0, 1.5, 1.9)}  # L = 1: 2 / L is the stability limit
    best_sgd = min(sgd.values())
    assert best_sgd < 5000
    fop = _steps_to(loss, shape, lambda p: FOP(p, lr=1.0, precond_lr=1e3), target)
    assert fop < 0.5 * best_sgd, (fop, sgd)


def test_precond_lr_zero_is_sgd():
    x, y = _data()
    model_a, model_b = _tiny_net(), _tiny_net()
    fop = FOP(model_a.parameters(), lr=0.1, precond_lr=0.0, momentum=0.9, weight_decay=1e-2)
    sgd = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        _step(model_a, fop, x, y)
        _step(model_b, sgd, x, y)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_preconditioner_layout_and_fallbacks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 5), nn.Linear(5, 700))
    opt = FOP(model.parameters(), lr=0.01, max_precond_dim=600)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["precond"].shape == (9, 9)  # k^2 x k^2, shared
    assert opt.state[model[3].weight]["precond"].shape == (16, 16)  # d_in x d_in
    assert opt.state[model[4].weight]["precond"].shape == (5, 5)
    for p in (model[0].bias, model[1].weight, model[1].bias, model[3].bias):
        assert "precond" not in opt.state[p]
    # a layer with more inputs than max_precond_dim takes the base update
    wide = nn.Linear(700, 2)
    opt = FOP(wide.parameters(), lr=0.01, max_precond_dim=600)
    wide(torch.randn(3, 700)).sum().backward()
    opt.step()
    assert "precond" not in opt.state[wide.weight]


def test_channels_last_matches_contiguous():
    x, y = _data()
    model_a, model_b = _tiny_net(), _tiny_net()
    model_b[0].weight.data = model_b[0].weight.data.to(memory_format=torch.channels_last)
    assert not model_b[0].weight.is_contiguous()
    opt_a = FOP(model_a.parameters(), lr=0.1, precond_lr=0.1, momentum=0.9)
    opt_b = FOP(model_b.parameters(), lr=0.1, precond_lr=0.1, momentum=0.9)
    for _ in range(4):
        _step(model_a, opt_a, x, y)
        _step(model_b, opt_b, x, y)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_guards_bound_the_preconditioner():
    model = _tiny_net()
    x, y = _data()
    cap = 2.0
    opt = FOP(model.parameters(), lr=0.1, precond_lr=1e6, momentum=0.9, max_precond_norm=cap)
    layers = [model[0].weight, model[3].weight, model[5].weight]
    _step(model, opt, x, y)
    for _ in range(15):
        old = [opt.state[p]["precond"].clone() for p in layers]
        _step(model, opt, x, y)
        for p, m_old in zip(layers, old):
            m = opt.state[p]["precond"]
            assert torch.isfinite(m).all()
            assert torch.linalg.matrix_norm(m, ord=2) <= cap + 1e-9
            # Trust region: M_new = c (I + A) M_old with ||A||_2 <= 1/2 and 0 < c <= 1 (the
            # cap's rescaling), so M_new M_old^{-1} has singular values in [0, 3/2] and is
            # never singular unless the cap shrank it.
            factor = m @ torch.linalg.inv(m_old)
            assert torch.linalg.matrix_norm(factor, ord=2) <= 1.5 + 1e-9
            eigenvalues = torch.linalg.eigvalsh(m @ m.T)
            assert eigenvalues.min() > 0  # P stays positive definite
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_state_dict_round_trip_continues_identically():
    x, y = _data()
    model = _tiny_net()
    opt = FOP(model.parameters(), lr=0.1, precond_lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        _step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(4):
        _step(model, opt, x, y)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = _tiny_net()
    restored.load_state_dict(saved["model"])
    opt2 = FOP(restored.parameters(), lr=0.1, precond_lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(saved["opt"])
    for _ in range(4):
        _step(restored, opt2, x, y)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
        for key in ("precond", "direction"):
            if key in opt.state[p]:
                assert torch.equal(opt.state[p][key], opt2.state[q][key])


@pytest.mark.parametrize(
    ("argument", "value"),
    [("lr", -0.1), ("lr", float("nan")), ("precond_lr", -1e-3), ("momentum", -0.5),
     ("momentum", 1.0), ("weight_decay", -1e-4), ("max_precond_norm", 0.0),
     ("max_precond_dim", 0), ("max_precond_dim", 2.5), ("lr", "fast")],
)
def test_bad_hyperparameters_raise_config_error(argument, value):
    params = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ConfigError, match=argument):
        FOP(params, **{argument: value})
    with pytest.raises(ValueError, match=argument):  # ConfigError is a ValueError
        FOP([{"params": params, argument: value}])


def test_non_finite_hypergradient_skips_preconditioner_update():
    layer = nn.Linear(3, 2, bias=False)
    opt = FOP(layer.parameters(), lr=1e-32, precond_lr=1.0)
    layer.weight.grad = torch.full((2, 3), 1e30)
    opt.step()  # u_0 = 1e30: finite, and so is the step lr * u_0
    start = layer.weight.detach().clone()
    layer.weight.grad = torch.full((2, 3), 1e30)
    with pytest.warns(RuntimeWarning, match="non-finite hypergradient"):
        opt.step()  # U^T G ~ 1e60 overflows float32
    assert torch.equal(opt.state[layer.weight]["precond"], torch.eye(3))
    assert torch.isfinite(layer.weight).all()
    assert not torch.equal(layer.weight, start)  # the weights still took their (finite) step


@pytest.mark.parametrize("steps_before", [0, 1])
def test_non_finite_gradient_leaves_parameters_and_state(steps_before):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    opt = FOP(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)
    for _ in range(steps_before):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    opt.zero_grad()
    model(x).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    model[0].bias.grad[1] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    messages = [str(w.message) for w in caught]
    assert sum("holds NaN or inf" in m for m in messages) == 2
    assert not any("hypergradient" in m for m in messages)
    for p, w, s in list(zip(model.parameters(), weights, states))[:2]:
        assert torch.equal(p, w)
        assert opt.state[p].keys() == s.keys()
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v)
    for p, w in list(zip(model.parameters(), weights))[2:]:
        assert not torch.equal(p, w)  # the healthy layer still trains


def test_skorch_net_trains_with_fop():
    from sklearn.datasets import load_digits
    from skorch import NeuralNetClassifier

    digits = load_digits()
    x = (digits.images[:200, None] / 16.0).astype(np.float32)
    y = digits.target[:200].astype(np.int64)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    net = NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, optimizer=FOP, lr=0.1, optimizer__precond_lr=1e-3,
                              optimizer__momentum=0.9, max_epochs=5, batch_size=32,
                              train_split=None, verbose=0)
    net.fit(x, y)
    losses = net.history[:, "train_loss"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert isinstance(net.optimizer_, FOP)
    assert net.optimizer_.state[net.module_[0].weight]["precond"].shape == (9, 9)
    # skorch's set_params writes straight into the param groups; the next step checks them
    net.set_params(optimizer__precond_lr=-1.0)
    with pytest.raises(ConfigError, match="precond_lr"):
        net.partial_fit(x, y)
    with pytest.raises(ConfigError, match="lr"):
        net.set_params(optimizer__precond_lr=1e-3, lr=-0.1).fit(x, y)

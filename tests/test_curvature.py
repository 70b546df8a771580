"""The diagonal Fisher against per-example loops with autograd (the independent reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sklearn_bayes_transfer import ConfigError
from sklearn_bayes_transfer.curvature import diagonal_fisher


def conv_net(seed: int = 0, dense: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()]
    if dense:  # per-pixel logits of 4 classes
        layers.append(nn.Conv2d(3, 4, 1))
    else:
        layers += [nn.Flatten(), nn.Linear(3 * 6 * 6, 4)]
    net = nn.Sequential(*layers)
    with torch.no_grad():  # running statistics away from (0, 1), so evaluation mode matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def reference_fisher(net: nn.Module, params: list[nn.Parameter], x: torch.Tensor) -> list[torch.Tensor]:
    """``sum_n sum_c p_c (grad log p_c)^2``, one example and class at a time, in evaluation mode."""
    net.eval()
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        out = net(x[i:i + 1])
        probs = out.softmax(1)[0].detach()
        for c in range(out.shape[1]):
            loss = nn.functional.cross_entropy(out, torch.tensor([c]))
            for t, g in zip(total, torch.autograd.grad(loss, params, retain_graph=True)):
                t += probs[c] * g.square()
    return total


def test_exact_fisher_matches_per_example_loop_in_eval_mode():
    net = conv_net()
    net.train()
    x = torch.randn(7, 1, 6, 6)
    params = [p for p in net.parameters()]
    h = diagonal_fisher(net, params, [x[:3], x[3:]], estimate="exact", chunk_size=2)
    assert net.training  # its mode is given back
    for got, want in zip(h, reference_fisher(net, params, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_mc_fisher_is_unbiased():
    net = conv_net(seed=1)
    x = torch.randn(6, 1, 6, 6)
    params = [net[0].weight, net[4].weight]  # a subset; the others are held fixed
    exact = diagonal_fisher(net, params, [x], estimate="exact")
    g = torch.Generator().manual_seed(0)
    draws = 400
    mean = [torch.zeros_like(p) for p in params]
    for _ in range(draws):
        for m, value in zip(mean, diagonal_fisher(net, params, [x], generator=g)):
            m += value / draws
    for m, e in zip(mean, exact):
        assert float((m - e).abs().sum() / e.abs().sum()) < 0.05


@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_dense_outputs_count_every_position(positions):
    # Each pixel is one categorical observation: the expected squared gradient of the summed
    # log-likelihood at drawn labels is the sum of per-pixel Fishers; a mean over pixels has 1/P of it.
    net = conv_net(seed=2, dense=True)
    x = torch.randn(2, 1, 3, 3)
    params = [net[3].weight, net[3].bias]
    net.eval()
    want = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        out = net(x[i:i + 1])  # (1, 4, 3, 3)
        probs = out.softmax(1)[0].detach()
        for row in range(3):
            for col in range(3):
                for c in range(4):
                    loss = nn.functional.cross_entropy(out[:, :, row, col], torch.tensor([c]))
                    for t, g in zip(want, torch.autograd.grad(loss, params, retain_graph=True)):
                        t += probs[c, row, col] * g.square()
    if positions == "mean":
        want = [w / 9 for w in want]
    g = torch.Generator().manual_seed(0)
    draws = 600
    mean = [torch.zeros_like(p) for p in params]
    for _ in range(draws):
        for m, value in zip(mean, diagonal_fisher(net, params, [x], positions=positions, generator=g)):
            m += value / draws
    for m, w in zip(mean, want):
        assert float((m - w).abs().sum() / w.abs().sum()) < 0.06


def test_bad_arguments_are_named():
    net = conv_net()
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(ConfigError, match="estimate='bayes'"):
        diagonal_fisher(net, list(net.parameters()), [x], estimate="bayes")
    with pytest.raises(ConfigError, match="positions"):
        diagonal_fisher(net, list(net.parameters()), [x], positions="max")
    with pytest.raises(ConfigError, match=r"params\[0\]"):
        diagonal_fisher(net, [nn.Parameter(torch.zeros(2))], [x])
    dense = conv_net(dense=True)
    with pytest.raises(ConfigError, match="'mc'"):
        diagonal_fisher(dense, list(dense.parameters()), [torch.randn(2, 1, 3, 3)], estimate="exact")

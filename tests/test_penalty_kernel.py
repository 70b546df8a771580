"""The compiled streaming kernel of PriorPenalty: same numbers as the torch passes and the float64
reference on layouts that exercise its segments, blocks, row unrolling and threads; its build
cache; and the fall-backs and errors of ``backend=``."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
from torch import nn

from sklearn_bayes_transfer import ConfigError, Prior, PriorPenalty
from sklearn_bayes_transfer import _kernel
from sklearn_bayes_transfer import penalty as penalty_module
from sklearn_bayes_transfer.penalty import _Segments

from conftest import assert_grad_close, flat_grad, point_near, ref_penalty_and_grad, reference

# 1200 elements (cut into segments of 1100 + 100 below), 700 (one full block of 512 and a
# partial one), 1155 in four dimensions (1100 + 55), a one-element tensor and a small bias.
BIG_SHAPES = ((40, 30), (700,), (3, 5, 7, 11), (1,), (6,))


@pytest.fixture
def kernel(compiled):
    return compiled("streaming")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache directory and no library loaded yet, restored afterwards."""
    monkeypatch.setenv("SKLEARN_BAYES_TRANSFER_CACHE", str(tmp_path / "cache"))
    _kernel._load.cache_clear()
    yield tmp_path / "cache"
    _kernel._load.cache_clear()



def params_for(shapes, prior, w) -> list[torch.Tensor]:
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    with torch.no_grad():
        for p, view in zip(params, prior.split(w).values()):
            p.copy_(view)
    return params


def value_and_grad(penalty: PriorPenalty, params: list[torch.Tensor],
                   weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The penalty and the gradient of ``weight * penalty`` (backward's incoming gradient)."""
    for p in params:
        p.grad = None
    value = penalty(params)
    (weight * value).backward()
    return value.detach(), flat_grad(params)


# -- numbers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1, 4, 5, 9])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "python-threads"])
def test_kernel_matches_reference_across_segments_and_threads(kernel, random_prior, monkeypatch, threads,
                                                              rank, n_threads, openmp):
    if openmp and not kernel.openmp:
        pytest.skip("the kernel was built without OpenMP here")
    monkeypatch.setattr(kernel, "openmp", openmp)  # False: the segments go to Python threads
    monkeypatch.setattr(penalty_module, "_SEGMENT_SIZE", 1100)
    torch.set_num_threads(n_threads)
    prior = random_prior(BIG_SHAPES, rank=rank, seed=31)
    w = point_near(prior, seed=32)
    params = params_for(BIG_SHAPES, prior, w)
    penalty = PriorPenalty(prior, scale=7.0, eps=1e-5, backend="compiled")
    seg = penalty._segments(params)
    assert seg.count == 7 and len(seg.ranges) == min(n_threads, seg.count)  # 1200 and 1155 cut in two

    value, grad = value_and_grad(penalty, params, weight=0.3)
    ref_value, ref_grad = ref_penalty_and_grad(reference(prior, "lowrank", 7.0, 1e-5), w)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=0)
    assert_grad_close(grad, 0.3 * ref_grad, rtol=1e-4)
    assert [tuple(p.grad.shape) for p in params] == [tuple(s) for s in BIG_SHAPES]


@pytest.mark.parametrize("rank", [3, 8])
def test_kernel_bfloat16_factor_equals_torch_upcast(kernel, random_prior, monkeypatch, threads, rank):
    # Both backends widen the same bfloat16 numbers; only float32 summation order differs.
    monkeypatch.setattr(penalty_module, "_SEGMENT_SIZE", 1100)
    torch.set_num_threads(2)
    prior = random_prior(BIG_SHAPES, rank=rank, seed=33)
    params = params_for(BIG_SHAPES, prior, point_near(prior, seed=34))
    results = [value_and_grad(PriorPenalty(prior, scale=50.0, factor_dtype=torch.bfloat16, backend=b), params)
               for b in ("compiled", "torch")]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    assert_grad_close(results[0][1], results[1][1].double(), rtol=1e-5)


def test_kernel_reads_non_contiguous_weights(kernel, random_prior):
    conv = nn.Conv2d(3, 4, 3)
    base = Prior.from_module(nn.Conv2d(3, 4, 3), variance=0.05)
    conv = conv.to(memory_format=torch.channels_last)
    params = list(conv.parameters())
    assert not params[0].is_contiguous()
    results = [value_and_grad(PriorPenalty(base, scale=2.0, backend=b), params) for b in ("compiled", "torch")]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_kernel_prox_equals_torch_prox(kernel, random_prior, monkeypatch, threads, factor_dtype, n_threads):
    monkeypatch.setattr(penalty_module, "_SEGMENT_SIZE", 1100)
    torch.set_num_threads(n_threads)
    prior = random_prior(BIG_SHAPES, rank=5, seed=37)
    w = point_near(prior, seed=38)
    steps = [0.5, 2.0, 0.0, 1e3, 0.1]
    results = []
    for backend in ("compiled", "torch"):
        params = params_for(BIG_SHAPES, prior, w)
        penalty = PriorPenalty(prior, scale=3.0, eps=1e-6, factor_dtype=factor_dtype, backend=backend)
        value = penalty.prox_(params, steps)
        results.append((value, torch.cat([p.detach().reshape(-1) for p in params])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    moved = (results[0][1] - w).abs()
    assert float(moved[:1200].max()) > 1e-3 and float(moved[1900:3055].max()) == 0.0  # step 0: untouched


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_prox_writes_non_contiguous_weights(kernel, backend):
    # channels_last weights: the step must land in the parameter, as for contiguous ones.
    base = Prior.from_module(nn.Conv2d(3, 4, 3), variance=0.05)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(3)
        conv = nn.Conv2d(3, 4, 3).to(memory_format=layout)
        before = conv.weight.detach().clone()
        params = list(conv.parameters())
        value = PriorPenalty(base, scale=2.0, backend=backend).prox_(params, 0.7)
        assert params[0].is_contiguous() == (layout is torch.contiguous_format)
        assert float((conv.weight.detach() - before).abs().max()) > 1e-3
        results.append((value, [p.detach().clone() for p in params]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
def test_segment_ranges_cover_everything_once(n_threads):
    sizes = [5, 200_000, 3, 70_000, 1]
    seg = _Segments(sizes, n_threads)
    assert int(seg.length.sum()) == sum(sizes)
    assert int(seg.length.max()) <= penalty_module._SEGMENT_SIZE
    covered = [s for a, b in seg.ranges for s in range(a, b)]
    assert covered == list(range(seg.count))
    assert len(seg.ranges) == min(n_threads, seg.count)
    # balanced within one segment's worth of elements
    loads = [int(seg.length[a:b].sum()) for a, b in seg.ranges]
    assert max(loads) - min(loads) <= 2 * penalty_module._SEGMENT_SIZE
    assert torch.equal(seg.offset, torch.cumsum(seg.length, 0) - seg.length)


# -- backend selection ----------------------------------------------------------------------------
def test_auto_uses_the_kernel_on_float32_cpu(kernel, random_prior, mlp):
    penalty = PriorPenalty(random_prior())
    params = penalty.bind(mlp)
    assert penalty._kernel_for(penalty._precomputed(params), params) is kernel


def test_auto_falls_back_where_the_kernel_does_not_apply(kernel, random_prior):
    prior = random_prior()

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))

    for penalty, module in ((PriorPenalty(prior), net().double()),
                            (PriorPenalty(prior, factor_dtype=torch.float16), net())):
        params = penalty.bind(module)
        assert penalty._kernel_for(penalty._precomputed(params), params) is None


def test_environment_switch_turns_the_kernel_off(kernel, random_prior, mlp, monkeypatch):
    monkeypatch.setenv("SKLEARN_BAYES_TRANSFER_KERNEL", "0")
    penalty = PriorPenalty(random_prior())
    params = penalty.bind(mlp)
    assert penalty._kernel_for(penalty._precomputed(params), params) is None
    assert math.isfinite(penalty(params).item())


def test_compiled_backend_refuses_what_it_cannot_run(kernel, random_prior):
    prior = random_prior()
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    penalty = PriorPenalty(prior, backend="compiled")
    with pytest.raises(ConfigError, match=r"float32 weights on the CPU.*torch.float64.*backend='auto'"):
        penalty(penalty.bind(net))


def test_unknown_backend_lists_choices(random_prior):
    with pytest.raises(ConfigError, match=r"backend='gpu' is not valid; expected one of 'auto', 'compiled', 'torch'"):
        PriorPenalty(random_prior(), backend="gpu")


# -- building ---------------------------------------------------------------------------------------
def test_build_is_cached_and_leaves_no_temporary_files(fresh_build):
    lib = _kernel.load_kernel()
    built = sorted(p.name for p in fresh_build.iterdir())
    assert len(built) == 1 and built[0].startswith("streaming-") and built[0].endswith(".so")
    stamp = (fresh_build / built[0]).stat().st_mtime_ns
    _kernel._load.cache_clear()
    assert _kernel.load_kernel() is not lib
    assert sorted(p.name for p in fresh_build.iterdir()) == built
    assert (fresh_build / built[0]).stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_unwritable_cache_directory_builds_in_a_temporary_one(monkeypatch, tmp_path, random_prior, mlp):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SKLEARN_BAYES_TRANSFER_CACHE", str(blocker / "cache"))
    _kernel._load.cache_clear()
    try:
        try:
            lib = _kernel.load_kernel()
        except _kernel.KernelUnavailable as exc:
            if "no C compiler" in str(exc):
                pytest.skip(str(exc))
            raise
        assert "bt-kernel-" in lib._name and blocker.read_text() == "not a directory"
        penalty = PriorPenalty(random_prior(), backend="compiled")
        assert math.isfinite(penalty(penalty.bind(mlp)).item())
    finally:
        _kernel._load.cache_clear()


def test_without_a_compiler_auto_falls_back_and_compiled_says_why(fresh_build, monkeypatch, tmp_path,
                                                                  random_prior, mlp):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang in an empty directory
    with pytest.raises(ConfigError, match=r"backend='compiled'.*no C compiler found.*backend='auto'"):
        PriorPenalty(random_prior(), backend="compiled")
    penalty = PriorPenalty(random_prior())
    params = penalty.bind(mlp)
    assert penalty._kernel_for(penalty._precomputed(params), params) is None
    with torch.no_grad():
        assert penalty(params).item() == PriorPenalty(random_prior(), backend="torch")(params).item()


def test_failing_compiler_is_reported_and_nothing_half_built(fresh_build, monkeypatch, random_prior):
    monkeypatch.setenv("CC", "false")  # exists, exits with 1
    with pytest.raises(ConfigError, match=r"'false' failed to build streaming\.c"):
        PriorPenalty(random_prior(), backend="compiled")
    assert not fresh_build.exists() or not any(fresh_build.iterdir())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "python-threads"])
def test_forked_child_runs_the_threaded_kernel(kernel, random_prior, monkeypatch, threads, openmp):
    if openmp and not kernel.openmp:
        pytest.skip("the kernel was built without OpenMP here")
    monkeypatch.setattr(kernel, "openmp", openmp)
    monkeypatch.setattr(penalty_module, "_SEGMENT_SIZE", 1100)
    torch.set_num_threads(2)
    prior = random_prior(BIG_SHAPES, rank=3, seed=35)
    params = params_for(BIG_SHAPES, prior, point_near(prior, seed=36))
    penalty = PriorPenalty(prior, backend="compiled")
    with torch.no_grad():
        expected = penalty(params).item()  # the parent's pool threads exist now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the same evaluation must finish (not hang on the parent's pool)
        try:
            with torch.no_grad():
                os.write(write, repr(penalty(params).item()).encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the kernel's thread pool")
    got = os.read(read, 100).decode()
    os.close(read)
    assert done[1] == 0 and float(got) == expected

"""The prior's negative log-density over a module's weights, computed at the memory floor.

For ``Sigma_tilde = lambda * Sigma + eps * I = diag(d) + U U^T`` (``d = lambda * variance + eps``,
``U = sqrt(lambda) F^T``) Woodbury gives ``Sigma_tilde^{-1} = diag(1/d) - W W^T`` with
``W = diag(1/d) U L^{-T}`` and ``L L^T = I_K + U^T diag(1/d) U``. ``1/d`` and ``W`` are computed
once; every evaluation is then one streamed pass over ``W`` for the value

    z = W^T r,   0.5 * maha = 0.5 * (r . (r / d) - z . z),   r = w - mean

and one more for the gradient ``r / d - W z`` (in a custom autograd function, so backward is
exactly that second pass). The passes walk the parameters in chunks that stay in cache, so no
per-step concatenation of the weights happens and a bfloat16 / float16 factor is upcast chunk by
chunk. See ``docs/design.md`` ("Computing the prior term at the memory floor"); a compiled version of
the passes was measured and removed (``docs/deviations.md`` #7).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .exceptions import ConfigError, PriorMismatchError
from .prior import Prior, PriorStructure, named_parameters_for

__all__ = ["PriorPenalty", "DEFAULT_CHUNK_SIZE"]

#: Elements per chunk on CPU: K x chunk of the factor (float32) stays within L2 for K <= 20.
DEFAULT_CHUNK_SIZE = 131_072
# On accelerators the plain mat-vecs are bandwidth-bound already; big chunks only cut launches.
_ACCELERATOR_CHUNK_SIZE = 1 << 22
# Factorisations of the proximal step kept, one per set of steps (K x K each).
_PROX_CACHE_SIZE = 16


@dataclass(frozen=True)
class _Piece:
    param: int  # index into the parameter list
    start: int  # offset inside the flattened parameter
    stop: int


@dataclass(frozen=True)
class _Chunk:
    start: int  # offset in the flat prior vector
    stop: int
    pieces: tuple[_Piece, ...]


def _plan_chunks(sizes: Sequence[int], chunk_size: int) -> tuple[_Chunk, ...]:
    """Cut the virtual concatenation of the parameters into chunks of at most ``chunk_size``.

    A chunk inside one large parameter is a view of it; a chunk spanning several small
    parameters (biases, BatchNorm affines) is gathered into a cache-sized scratch buffer.
    """
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    total, chunks, start, p = offsets[-1], [], 0, 0
    while start < total:
        stop = min(start + chunk_size, total)
        pieces = []
        while p < len(sizes) and offsets[p] < stop:
            lo, hi = max(start, offsets[p]) - offsets[p], min(stop, offsets[p + 1]) - offsets[p]
            if hi > lo:
                pieces.append(_Piece(p, lo, hi))
            if offsets[p + 1] <= stop:
                p += 1
            else:
                break
        chunks.append(_Chunk(start, stop, tuple(pieces)))
        start = stop
    return tuple(chunks)


class _Precomputed:
    """``mean``, ``1/d`` and ``W^T`` (K x D) on one device, in the compute dtype."""

    def __init__(self, penalty: "PriorPenalty", device: torch.device, dtype: torch.dtype) -> None:
        prior = penalty.prior
        self.device, self.dtype = device, dtype
        self.mean = prior.mean.to(device=device, dtype=dtype).contiguous()
        self.inv_d = penalty._inv_d64.to(device=device, dtype=dtype).contiguous()
        factor_dtype = penalty.factor_dtype or prior.factor_dtype
        if factor_dtype == torch.float32 and dtype == torch.float64:
            factor_dtype = torch.float64
        self.w_t = penalty._w_t(device=device, dtype=factor_dtype)
        # r / d of the latest evaluation, and a counter telling backward whether it is still its own.
        self.rd = torch.empty(0, dtype=dtype, device=device)
        self.generation = 0


class _Mahalanobis(torch.autograd.Function):
    """``0.5 r^T Sigma_tilde^{-1} r``; backward is the second streamed pass."""

    @staticmethod
    def forward(ctx, penalty: "PriorPenalty", *params: torch.Tensor) -> torch.Tensor:
        pre = penalty._precomputed(params)
        z, diag_sum = penalty._first_pass(pre, params)
        # Combine in float64: the two sums nearly cancel along the prior's low-rank directions.
        z64 = z.to(torch.float64)
        value = (diag_sum.to(torch.float64) - torch.dot(z64, z64)) * 0.5
        ctx.penalty, ctx.pre = penalty, pre
        # The first pass left r / d in a buffer the backward reuses, unless a later evaluation
        # overwrote it (then the backward recomputes it from the saved weights).
        ctx.generation = pre.generation
        ctx.save_for_backward(z.to(pre.dtype), *params)
        return value.to(params[0].dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        z, *params = ctx.saved_tensors
        reuse = ctx.generation == ctx.pre.generation
        grads = ctx.penalty._second_pass(ctx.pre, params, z, grad_output.to(z.dtype), reuse)
        return (None, *grads)


class PriorPenalty:
    """The negative log-density of a (scaled) prior, bound to a module's parameters.

    Computes ``0.5 * (w - mean)^T Sigma_tilde^{-1} (w - mean)`` with
    ``Sigma_tilde = scale * Sigma + eps * I`` for the chosen ``structure``, and its gradient,
    in two streamed passes over the low-rank factor. The log-determinant is constant in the
    weights; it is left out of the training term and included in :meth:`log_prob`.

    Parameters
    ----------
    prior : Prior
        The learned prior.
    scale : float, default=1.0
        ``lambda > 0``, multiplies the whole covariance (``1`` = the posterior as learned).
    eps : float, default=0.0
        Jitter ``>= 0`` added to the diagonal.
    structure : {"lowrank", "diag", "isotropic"}, default="lowrank"
        Which part of the covariance to use (see :class:`~sklearn_bayes_transfer.prior.PriorStructure`).
    factor_dtype : torch.dtype, optional
        Storage dtype of the precomputed ``W`` (default: the prior's factor dtype). bfloat16 and
        float16 halve the memory traffic; chunks are upcast to the compute dtype.
    chunk_size : int, optional
        Elements per streamed chunk of the torch passes (default: 131072 on CPU, 4M on
        accelerators).

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer import Prior, PriorPenalty
    >>> layer = torch.nn.Linear(3, 2)
    >>> prior = Prior.from_module(layer, variance=0.5)
    >>> penalty = PriorPenalty(prior, scale=2.0)
    >>> params = penalty.bind(layer)
    >>> penalty(params).item()  # at the prior mean
    0.0
    """

    def __init__(
        self,
        prior: Prior,
        *,
        scale: float = 1.0,
        eps: float = 0.0,
        structure: PriorStructure | str = PriorStructure.LOWRANK,
        factor_dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(prior, Prior):
            raise ConfigError(f"prior must be a Prior, got {type(prior).__name__}; load files with Prior.load(path)")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"prior_scale must be a finite number > 0, got {scale!r} "
                              "(use prior_structure='none' to fine-tune without a prior)")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"prior_eps must be a finite number >= 0, got {eps!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        try:
            structure = PriorStructure(structure)
        except ValueError:
            raise ConfigError(f"prior_structure={structure!r} is not valid; expected 'lowrank', 'diag' or "
                              "'isotropic' ('none' means no penalty at all)") from None
        if structure is PriorStructure.NONE:
            raise ConfigError("prior_structure='none' has no penalty to compute; skip the PriorPenalty instead")
        self.prior = prior.reduce(structure)
        self.scale, self.eps, self.structure = float(scale), float(eps), structure
        self.factor_dtype = factor_dtype
        self.chunk_size = chunk_size
        self._setup()
        self._cache: dict[tuple, _Precomputed] = {}
        self._plans: dict[tuple, tuple[_Chunk, ...]] = {}
        self._prox_cache: OrderedDict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = OrderedDict()

    # -- precomputation ----------------------------------------------------------------------
    def _setup(self) -> None:
        d = self.scale * self.prior.variance.to(torch.float64) + self.eps
        if self.prior.n_params and float(d.min()) <= 0:
            zeros = int((d <= 0).sum())
            raise ConfigError(f"{zeros} prior variance(s) are zero, so the prior precision is infinite; "
                              "set prior_eps > 0 (e.g. 1e-8)")
        self._inv_d64 = 1.0 / d
        self._max_precision: float | None = None
        k = self.prior.rank
        # A = I_K + lambda * F diag(1/d) F^T, built chunk by chunk in float64.
        a = torch.eye(k, dtype=torch.float64)
        for start in range(0, self.prior.n_params, DEFAULT_CHUNK_SIZE):
            stop = start + DEFAULT_CHUNK_SIZE
            f = self.prior.factor[:, start:stop].to(torch.float64)
            a += self.scale * (f * self._inv_d64[start:stop]) @ f.T
        self._chol = torch.linalg.cholesky(a) if k else a
        self._logdet = float(torch.log(d).sum() + 2 * torch.log(torch.diagonal(self._chol)).sum())

    def _w_t(self, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``W^T = L^{-1} sqrt(lambda) F diag(1/d)`` as a (K, D) tensor."""
        k, n = self.prior.rank, self.prior.n_params
        out = torch.empty(k, n, dtype=dtype, device=device)
        step = DEFAULT_CHUNK_SIZE
        for start in range(0, n if k else 0, step):
            stop = min(start + step, n)
            f = self.prior.factor[:, start:stop].to(torch.float64) * (math.sqrt(self.scale) * self._inv_d64[start:stop])
            out[:, start:stop] = torch.linalg.solve_triangular(self._chol, f, upper=False).to(device=device, dtype=dtype)
        return out

    def _precomputed(self, params: Sequence[torch.Tensor]) -> _Precomputed:
        first = params[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        key = (first.device, dtype)
        if key not in self._cache:
            self._cache[key] = _Precomputed(self, first.device, dtype)
        return self._cache[key]

    def _plan(self, params: Sequence[torch.Tensor]) -> tuple[_Chunk, ...]:
        self._check(params)
        device = params[0].device
        size = self.chunk_size or (DEFAULT_CHUNK_SIZE if device.type == "cpu" else _ACCELERATOR_CHUNK_SIZE)
        key = (size, device.type)
        if key not in self._plans:
            self._plans[key] = _plan_chunks([math.prod(s) for s in self.prior.shapes], size)
        return self._plans[key]

    def _check(self, params: Sequence[torch.Tensor]) -> None:
        if len(params) != len(self.prior.shapes):
            raise PriorMismatchError(f"expected {len(self.prior.shapes)} parameter tensors (the prior's), got "
                                     f"{len(params)}; use penalty.bind(module) to select them")
        for p, name, shape in zip(params, self.prior.names, self.prior.shapes):
            if tuple(p.shape) != shape:
                raise PriorMismatchError(f"parameter {name!r} has shape {tuple(p.shape)}, the prior expects {shape}")

    # -- streamed passes ------------------------------------------------------------------------
    @staticmethod
    def _gather(chunk: _Chunk, flat: Sequence[torch.Tensor], scratch: torch.Tensor) -> torch.Tensor:
        """The chunk's weights: a view for one parameter, else gathered into ``scratch``."""
        n = chunk.stop - chunk.start
        if len(chunk.pieces) == 1:
            piece = chunk.pieces[0]
            view = flat[piece.param][piece.start:piece.stop]
            if view.dtype == scratch.dtype:
                return view
            return scratch[:n].copy_(view)
        pos = 0
        for piece in chunk.pieces:
            m = piece.stop - piece.start
            scratch[pos:pos + m].copy_(flat[piece.param][piece.start:piece.stop])
            pos += m
        return scratch[:n]

    def _factor_chunk(self, pre: _Precomputed, chunk: _Chunk, scratch: torch.Tensor) -> torch.Tensor:
        w_t = pre.w_t[:, chunk.start:chunk.stop]
        if w_t.dtype == pre.dtype:
            return w_t
        return scratch[:, :chunk.stop - chunk.start].copy_(w_t)

    def _first_pass(self, pre: _Precomputed, params: Sequence[torch.Tensor]):
        plan = self._plan(params)
        flat = [p.detach().reshape(-1) for p in params]
        k, dtype, device = self.prior.rank, pre.dtype, pre.device
        size = max(c.stop - c.start for c in plan)
        scratch_w = torch.empty(size, dtype=dtype, device=device)
        r = torch.empty(size, dtype=dtype, device=device)
        scratch_f = torch.empty(k, size, dtype=dtype, device=device) if pre.w_t.dtype != dtype and k else None
        zs = torch.zeros(len(plan), k, dtype=dtype, device=device)
        diag = torch.zeros(len(plan), dtype=dtype, device=device)
        pre.generation += 1
        if pre.rd.numel() != self.prior.n_params:
            pre.rd = torch.empty(self.prior.n_params, dtype=dtype, device=device)
        for i, chunk in enumerate(plan):
            n = chunk.stop - chunk.start
            w = self._gather(chunk, flat, scratch_w)
            rc = torch.sub(w, pre.mean[chunk.start:chunk.stop], out=r[:n])
            rd = torch.mul(rc, pre.inv_d[chunk.start:chunk.stop], out=pre.rd[chunk.start:chunk.stop])
            torch.dot(rc, rd, out=diag[i])
            if k:
                torch.mv(self._factor_chunk(pre, chunk, scratch_f), rc, out=zs[i])
        # Per-chunk partial sums, added once: fewer rounding steps and no device syncs in the loop.
        return zs.sum(0), diag.sum(dtype=torch.float64)

    def _second_pass(self, pre: _Precomputed, params: Sequence[torch.Tensor], z: torch.Tensor,
                     grad_output: torch.Tensor, reuse: bool) -> list[torch.Tensor]:
        plan = self._plan(params)
        flat = [p.detach().reshape(-1) for p in params]
        k, dtype, device = self.prior.rank, pre.dtype, pre.device
        size = max(c.stop - c.start for c in plan)
        scratch_w = torch.empty(size, dtype=dtype, device=device)
        scratch_g = torch.empty(size, dtype=dtype, device=device)
        r = torch.empty(size, dtype=dtype, device=device)
        scratch_f = torch.empty(k, size, dtype=dtype, device=device) if pre.w_t.dtype != dtype and k else None
        # One gradient tensor per parameter: each is small enough for the allocator to recycle,
        # where one D-sized buffer would be fresh (page-faulting) memory on every step.
        grads = [torch.empty(p.shape, dtype=dtype, device=device) for p in params]
        flat_grads = [g.view(-1) for g in grads]
        zg = z * grad_output
        go = float(grad_output)
        for chunk in plan:
            n = chunk.stop - chunk.start
            if len(chunk.pieces) == 1:
                piece = chunk.pieces[0]
                g = flat_grads[piece.param][piece.start:piece.stop]
            else:
                g = scratch_g[:n]
            if reuse:
                rd = pre.rd[chunk.start:chunk.stop]
            else:
                w = self._gather(chunk, flat, scratch_w)
                rc = torch.sub(w, pre.mean[chunk.start:chunk.stop], out=r[:n])
                rd = torch.mul(rc, pre.inv_d[chunk.start:chunk.stop], out=r[:n])
            if k:
                # g = go * r/d - W (go * z), one fused pass over the chunk.
                torch.addmv(rd, self._factor_chunk(pre, chunk, scratch_f).T, zg, beta=go, alpha=-1, out=g)
            else:
                torch.mul(rd, go, out=g)
            if len(chunk.pieces) > 1:
                pos = 0
                for piece in chunk.pieces:
                    m = piece.stop - piece.start
                    flat_grads[piece.param][piece.start:piece.stop].copy_(g[pos:pos + m])
                    pos += m
        return [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]

    # -- public API -----------------------------------------------------------------------------
    def bind(self, module: nn.Module) -> list[nn.Parameter]:
        """The module's parameters this prior covers, in the prior's order (by name).

        Raises :class:`~sklearn_bayes_transfer.exceptions.PriorMismatchError` naming the first
        missing or mismatching parameters.
        """
        return [p for _, p in named_parameters_for(self.prior, module)]

    def __call__(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``0.5 * r^T Sigma_tilde^{-1} r`` (differentiable in ``params``)."""
        return _Mahalanobis.apply(self, *params)

    def log_prob(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full log-density ``log N(w; mean, Sigma_tilde)``, with log-determinant and ``2 pi``."""
        const = 0.5 * (self._logdet + self.prior.n_params * math.log(2 * math.pi))
        return -self(params) - const

    @property
    def logdet(self) -> float:
        """``log det Sigma_tilde`` (computed in float64)."""
        return self._logdet

    @property
    def max_precision(self) -> float:
        """Largest diagonal precision ``1 / min(d)``: the stiffness of the training term."""
        if self._max_precision is None:
            self._max_precision = float(self._inv_d64.max()) if self.prior.n_params else 0.0
        return self._max_precision

    @torch.no_grad()
    def prox_(self, params: Sequence[torch.Tensor], step: float | Sequence[float]) -> float:
        """Exact proximal step of the whole term, in place; returns its value at the new weights.

        With ``S = diag(step)`` (one step per parameter tensor, e.g. ``lr / N``) it replaces
        ``w`` by ``argmin_v 0.5 (v - m)^T P (v - m) + 0.5 (v - w)^T S^{-1} (v - w)``, with
        ``P = Sigma_tilde^{-1} = diag(1/d) - W W^T``:

            v - m = (S^{-1} + P)^{-1} S^{-1} r = u + B^{-1} W (I - W^T B^{-1} W)^{-1} W^T u,
            u = r / (1 + s / d),   B^{-1} = s d / (d + s)

        (Woodbury again; the K x K matrix is factorised in float64 once per set of steps and kept
        for the latest 16 sets). It is two streamed passes over ``W``, like value plus gradient,
        and unlike an explicit gradient step it is stable for every prior scale and step: a
        proximal map of a convex quadratic never expands distances. The returned
        ``0.5 (v - m)^T P (v - m)`` comes from the same passes.
        """
        steps = self._steps(params, step)
        pre = self._precomputed(params)
        chol, gram = self._prox_terms(pre, params, steps)
        return self._update_(pre, params, steps, proximal=True, chol=chol, gram=gram)

    @torch.no_grad()
    def explicit_step_(self, params: Sequence[torch.Tensor], step: float | Sequence[float]) -> float:
        """An explicit gradient step of the term, in place: ``w <- w - S P (w - m)``; returns its new value.

        It agrees with :meth:`prox_` to first order in ``S P`` and costs the same two streamed
        passes without the K x K factorisation a new step needs there, but it is stable only
        while ``step * max_precision < 2``: keep ``step * max_precision`` small.
        """
        steps = self._steps(params, step)
        return self._update_(self._precomputed(params), params, steps, proximal=False)

    def _steps(self, params: Sequence[torch.Tensor], step: float | Sequence[float]) -> list[float]:
        self._check(params)
        if isinstance(step, torch.Tensor) and step.dim() == 0:
            step = float(step)
        steps = [float(step)] * len(params) if isinstance(step, (int, float)) else [float(s) for s in step]
        if len(steps) != len(params) or any(not math.isfinite(s) or s < 0 for s in steps):
            raise ConfigError(f"step must be a finite number >= 0, or one per parameter tensor, got {step!r}")
        return steps

    @staticmethod
    def _chunk_step(chunk: _Chunk, steps: Sequence[float], scratch: torch.Tensor) -> float | torch.Tensor:
        """The chunk's steps: one number when its pieces share it, else a vector in ``scratch``."""
        values = {steps[piece.param] for piece in chunk.pieces}
        if len(values) == 1:
            return values.pop()
        pos = 0
        for piece in chunk.pieces:
            m = piece.stop - piece.start
            scratch[pos:pos + m].fill_(steps[piece.param])
            pos += m
        return scratch[:pos]

    def _update_(self, pre: _Precomputed, params: Sequence[torch.Tensor], steps: Sequence[float], *,
                 proximal: bool, chol: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> float:
        """``v - m = u + b * (W c)`` in two streamed passes, written into ``params``; the value at ``v``.

        Proximal: ``u = r d / (d + s)``, ``c = (I - W^T B^{-1} W)^{-1} W^T u``, ``b = s d / (d + s)``.
        Explicit: ``u = r - s r / d``, ``c = W^T r``, ``b = s`` (that is ``r - S P r``).
        """
        plan = self._plan(params)
        k, dtype, device = self.prior.rank, pre.dtype, pre.device
        size = max(c.stop - c.start for c in plan)
        scratch_w, r, tmp, scratch_s = (torch.empty(size, dtype=dtype, device=device) for _ in range(4))
        scratch_f = torch.empty(k, size, dtype=dtype, device=device) if pre.w_t.dtype != dtype and k else None
        if pre.rd.numel() != self.prior.n_params:
            pre.rd = torch.empty(self.prior.n_params, dtype=dtype, device=device)
        pre.generation += 1  # the buffer now holds u, not r / d
        flat = [p.detach().reshape(-1) for p in params]
        ts = torch.zeros(len(plan), k, dtype=dtype, device=device)
        for i, chunk in enumerate(plan):
            n = chunk.stop - chunk.start
            s = self._chunk_step(chunk, steps, scratch_s)
            inv_d = pre.inv_d[chunk.start:chunk.stop]
            rc = torch.sub(self._gather(chunk, flat, scratch_w), pre.mean[chunk.start:chunk.stop], out=r[:n])
            u = pre.rd[chunk.start:chunk.stop]
            if proximal:
                torch.mul(rc, torch.mul(inv_d, s, out=tmp[:n]).add_(1).reciprocal_(), out=u)
            else:
                torch.sub(rc, torch.mul(rc, inv_d, out=tmp[:n]).mul_(s), out=u)
            if k:
                torch.mv(self._factor_chunk(pre, chunk, scratch_f), u if proximal else rc, out=ts[i])
        t = ts.sum(0).to(torch.float64)
        c = torch.cholesky_solve(t.unsqueeze(1), chol).squeeze(1) if proximal and k else t
        c_dev = c.to(device=device, dtype=dtype)
        diag = torch.zeros(len(plan), dtype=dtype, device=device)
        zs = torch.zeros(len(plan), k, dtype=dtype, device=device)
        for i, chunk in enumerate(plan):
            n = chunk.stop - chunk.start
            inv_d = pre.inv_d[chunk.start:chunk.stop]
            rv = r[:n].copy_(pre.rd[chunk.start:chunk.stop])
            if k:
                s = self._chunk_step(chunk, steps, scratch_s)
                factor = self._factor_chunk(pre, chunk, scratch_f)
                step_c = torch.mv(factor.T, c_dev)
                if proximal:  # b = s / (1 + s / d)
                    rv.addcmul_(step_c, torch.mul(inv_d, s, out=tmp[:n]).add_(1).reciprocal_().mul_(s))
                elif isinstance(s, float):
                    rv.add_(step_c, alpha=s)
                else:
                    rv.addcmul_(step_c, s)
                if not proximal:  # W^T (v - m) while the chunk of W is in cache
                    torch.mv(factor, rv, out=zs[i])
            torch.dot(rv, torch.mul(rv, inv_d, out=tmp[:n]), out=diag[i])
            new = rv.add_(pre.mean[chunk.start:chunk.stop])
            pos = 0
            for piece in chunk.pieces:
                m = piece.stop - piece.start
                flat[piece.param][piece.start:piece.stop].copy_(new[pos:pos + m])
                pos += m
        for p, f in zip(params, flat):
            if not p.is_contiguous():  # reshape(-1) copied it (channels_last): write the result back
                p.detach().copy_(f.view(p.shape))
        if not k:
            return float(0.5 * diag.sum(dtype=torch.float64))
        # W^T (v - m): from K x K algebra for the proximal step instead of a third pass.
        z = t + gram @ c if proximal else zs.sum(0).to(torch.float64)
        return float(0.5 * (diag.sum(dtype=torch.float64) - z.dot(z)))

    def _prox_terms(self, pre: _Precomputed, params: Sequence[torch.Tensor],
                    steps: Sequence[float]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The Cholesky factor of ``I - W^T B^{-1} W`` and ``W^T B^{-1} W`` (float64, CPU) for these steps."""
        k = self.prior.rank
        if not k:
            return None, None
        key = (pre.device, pre.dtype, tuple(steps))
        if key in self._prox_cache:
            self._prox_cache.move_to_end(key)
            return self._prox_cache[key]
        plan = self._plan(params)
        dtype, device = pre.dtype, pre.device
        size = max(c.stop - c.start for c in plan)
        scratch_s, b, rest = (torch.empty(size, dtype=dtype, device=device) for _ in range(3))
        scratch_f = torch.empty(k, size, dtype=dtype, device=device) if pre.w_t.dtype != dtype else None
        both = torch.zeros(2 * k, k, dtype=torch.float64, device=device)
        for chunk in plan:
            n = chunk.stop - chunk.start
            s = self._chunk_step(chunk, steps, scratch_s)
            inv_d = pre.inv_d[chunk.start:chunk.stop]
            shrink = torch.mul(inv_d, s, out=b[:n]).add_(1).reciprocal_()   # d / (d + s)
            torch.div(shrink, inv_d, out=rest[:n])                           # d^2 / (d + s)
            shrink.mul_(s)                                                   # s d / (d + s)
            w = self._factor_chunk(pre, chunk, scratch_f)
            # Two small GEMMs in the compute dtype, summed in float64.
            both += (torch.cat([w * b[:n], w * rest[:n]]) @ w.T).to(torch.float64)
        both = both.cpu()
        gram = both[:k]
        # I - gram, formed without cancellation: W^T diag(d) W = I - L^{-1} L^{-T}, so
        # I - W^T B^{-1} W = L^{-1} L^{-T} + W^T diag(d^2 / (d + s)) W, a sum of positive definite
        # terms. Subtracting gram from I directly loses all digits once step >> d (stiff priors).
        l_inv = torch.linalg.solve_triangular(self._chol, torch.eye(k, dtype=torch.float64), upper=False)
        terms = (torch.linalg.cholesky(l_inv @ l_inv.T + both[k:]), gram)
        self._prox_cache[key] = terms
        if len(self._prox_cache) > _PROX_CACHE_SIZE:
            self._prox_cache.popitem(last=False)
        return terms

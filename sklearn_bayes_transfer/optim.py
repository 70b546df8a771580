"""FOP: first-order preconditioning learned by hypergradient descent (Moskovitz et al., 2019).

Each weight matrix or convolution kernel ``W`` gets a learned preconditioner ``P = M M^T``
(positive semi-definite by construction) that right-multiplies its update direction, and ``M`` is
itself trained by gradient descent on the loss *after* the step it shaped, using only the
gradient that the next step computes anyway (arXiv 1910.08461; it generalises the scalar
hypergradient descent of Almeida et al., 1998 and Baydin et al., 2018).

Layout. A parameter is viewed as a matrix ``(n, d)`` whose ``d`` columns are preconditioned
together and whose ``n`` rows all share the preconditioner:

- 2-D weights (``nn.Linear``, ``d_out x d_in``): ``d = d_in``, rows are output units;
- weights with 3 or more dimensions (``nn.Conv1d/2d/3d``, ``out x in x k...``): ``d`` is the
  number of spatial kernel positions (``k^2`` for a ``k x k`` kernel) and the ``out * in`` rows
  are the 2-D slices of all filters.  One ``k^2 x k^2`` matrix per layer is shared by every
  filter and input channel, as in the paper's method section: it captures the correlations
  between neighbouring kernel taps that all filters have in common, it stays tiny (9 x 9 for a
  3 x 3 layer, whatever the width) so its cost is a fraction of the step, and it is fitted from
  ``out * in`` rows of evidence per step (a channel-wise ``in x in`` preconditioner would be up
  to 512 x 512 in a ResNet-18 and fitted from far fewer rows per entry).  A 1 x 1 convolution
  therefore learns one scalar: per-layer hypergradient descent of the learning rate;
- everything else (biases, normalisation scales, any 0-/1-D tensor) and matrices with more than
  ``max_precond_dim`` columns take the base update (SGD with momentum and weight decay).

Update, per preconditioned parameter, at step ``t`` with gradient ``g_t`` of the objective at
the current weights (weight decay included: ``g_t = grad + weight_decay * W_t``)::

    M_t     = M_{t-1} + precond_lr * lr * (U_{t-1}^T G_t + G_t^T U_{t-1}) M_{t-1}
    U_t     = momentum * U_{t-1} + G_t            (U_t = G_t when momentum = 0)
    W_{t+1} = W_t - lr * U_t M_t M_t^T

where ``G_t`` and ``U_{t-1}`` are the ``(n, d)`` views of ``g_t`` and of the direction applied
at the previous step, and ``M_0 = I``.  The ``M`` update is exactly
``M - precond_lr * dJ/dM`` for ``J(M) = L(W_{t-1} - lr U_{t-1} M M^T)``: with
``dW = -lr U_{t-1} (dM M^T + M dM^T)`` and ``dJ = <G_t, dW>``, the chain rule gives
``dJ/dM = -lr (U_{t-1}^T G_t + G_t^T U_{t-1}) M`` (the paper's rule for row-preconditioned
matrices; tests check it against finite differences).  As in hypergradient descent, the effect
of ``M`` on iterates before ``W_{t-1}`` is ignored, and the current ``lr`` stands in for the one
of the previous step (they differ only under a learning-rate schedule, by one step's change).

Link with hypergradient descent. When ``d = 1`` (a ``Linear`` with one input, a ``1 x 1``
convolution) ``M = m`` is a scalar and FOP's effective step size ``a = lr m^2`` follows, exactly,
HD's rule ``a_t = a_{t-1} + beta_t g_t . u_{t-1}`` taken in the ``sqrt(a)`` parametrisation::

    sqrt(a_t) = sqrt(a_{t-1}) + beta_t g_t . u_{t-1} / (2 sqrt(a_{t-1})),
    beta_t = 4 * precond_lr * lr * a_{t-1},

that is ``a_t = a_{t-1} + beta_t g.u + (beta_t g.u)^2 / (4 a_{t-1})``: HD's step plus a
second-order term.  (For ``d > 1`` the matrix ``M = sqrt(alpha) I`` leaves the scalar family
after one step: the hypergradient ``U^T G + G^T U`` is not a multiple of the identity.)

Guards (never poison the weights):

- A parameter whose gradient holds NaN or inf is left untouched (weights, momentum, ``M``) and a
  ``RuntimeWarning`` names it; detecting a diverged loss is the training loop's job.
- A non-finite candidate ``M`` (for example an overflowing hypergradient) is discarded: ``M``
  keeps its previous value, the step uses it, and a ``RuntimeWarning`` names the parameter.
- ``M`` is rescaled after each update so that the Hölder bound
  ``sqrt(||M||_1 ||M||_inf)`` (max absolute column sum times max absolute row sum, an upper
  bound of the spectral norm that costs two reductions instead of an SVD) is at most
  ``max_precond_norm``.  Hence ``||P||_2 <= max_precond_norm**2``: the step in any direction is
  at most ``max_precond_norm**2`` times plain SGD's.  ``M_0 = I`` sits exactly at bound 1.

Costs: per step and layer two ``(n x d) @ (d x d)``-sized products plus one ``d x d`` product
(for wide, short matrices, ``n < d``, the factors are applied one at a time so that the
``d x d`` matrices are never multiplied together), and one device synchronisation per step for
the finiteness checks.  ``M`` lives in ``optimizer.state[p]["precond"]`` next to the direction
buffer, so ``state_dict``/``load_state_dict`` round-trip them.

On the CPU, float32 parameters with at most 16 preconditioned columns (all 3 x 3 convolutions)
go through a small compiled kernel (``_kernels/fop.c``, see :mod:`._kernel`): one sweep for the
Gram products ``U^T G`` of all such layers, the ``d x d`` algebra batched over layers, and one
sweep that updates the momentum and the weights together.  torch's GEMMs stream these tall,
9-column matrices at a fraction of memory speed; the kernel brings FOP's step close to SGD's.
Without a C compiler, or with ``backend="torch"``, the same arithmetic runs as torch operations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, NamedTuple

import torch

from . import _kernel
from ._kernel import Backend
from ._validation import Integral, Interval, Real, check_choice, check_params
from .exceptions import ConfigError

__all__ = ["FOP", "OptimizerName", "optimizer_arguments"]


# Largest ||precond_lr * lr * S||_2 allowed in one preconditioner step (see _hyper_step).
_MAX_RELATIVE_STEP = 0.5
# The compiled kernel's limits: columns per parameter (its d x d blocks are 16 x 16) and
# elements per segment of rows (the unit of work of a thread).
_KERNEL_MAX_DIM = 16
_KERNEL_SEGMENT = 1 << 16


#: Constraints of FOP's options (its defaults and every param group's).
_OPTION_CONSTRAINTS: dict[str, list[Any]] = {
    "lr": [Interval(Real, 0, None)],
    "precond_lr": [Interval(Real, 0, None)],  # 0 keeps P = I: plain SGD
    "momentum": [Interval(Real, 0, 1, closed="left")],
    "weight_decay": [Interval(Real, 0, None)],
    "max_precond_norm": [Interval(Real, 0, None, closed="neither")],
    "max_precond_dim": [Interval(Integral, 1, None)],
}


def _validate(options: dict[str, Any]) -> None:
    try:
        check_params(options, _OPTION_CONSTRAINTS)
    except ConfigError as exc:
        raise ConfigError(f"FOP: {exc}") from None


def _precond_dim(param: torch.Tensor, max_precond_dim: int) -> int:
    """Number of preconditioned columns of ``param``'s matrix view, or 0 for the base update."""
    if param.ndim < 2 or param.numel() == 0:
        return 0
    d = param.shape[1] if param.ndim == 2 else math.prod(param.shape[2:])
    return d if d <= max_precond_dim else 0


def _apply_precond(u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``u @ M @ M^T`` for ``u`` of shape ``(n, d)``, in the cheaper association."""
    if u.shape[0] < u.shape[1]:
        return (u @ m) @ m.T
    return u @ (m @ m.T)


def _gram(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``u^T g`` for tall ``(n, d)`` matrices.

    One GEMM with a tiny ``d x d`` output and a huge inner dimension runs at about half the memory
    bandwidth on CPUs; a batch of 64 row blocks, summed, streams the inputs at full speed.
    """
    n, d = u.shape
    blocks = 64
    if n < 64 * blocks or n % blocks or not (u.is_contiguous() and g.is_contiguous()):
        return u.T @ g
    return torch.bmm(u.view(blocks, -1, d).transpose(1, 2), g.view(blocks, -1, d)).sum(0)


def _hyper_step(u_prev: torch.Tensor, g: torch.Tensor, m: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * S M`` with ``S = U^T G + G^T U``, shrunk so that ``||scale * S||_2 <= 1/2``.

    ``scale * S M`` is ``-precond_lr * dJ/dM`` (``scale = precond_lr * lr``).  The shrinking is a
    trust region: the update multiplies ``M`` by ``I + scale * S``, whose eigenvalues then stay in
    ``[1/2, 3/2]``, so one step can neither flip ``M`` through zero nor make it singular.
    """
    n, d = u_prev.shape
    if 3 * n < d:  # two thin products beat forming the d x d matrix and multiplying it by M
        step = u_prev.T @ (g @ m) + g.T @ (u_prev @ m)
        bound = 2 * torch.linalg.vector_norm(u_prev) * torch.linalg.vector_norm(g)
    else:
        h = _gram(u_prev, g)
        s = h + h.T
        step = s @ m
        abs_s = s.abs()
        bound = abs_s.sum(0).amax()  # = sqrt(||S||_1 ||S||_inf) for symmetric S, >= ||S||_2
    return step * torch.clamp(_MAX_RELATIVE_STEP / (scale * bound), max=1.0) * scale


def _cap_norm(m: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rescale ``m`` so that ``sqrt(||m||_1 ||m||_inf) <= max_norm`` (no host sync)."""
    abs_m = m.abs()
    bound = torch.sqrt(abs_m.sum(0).amax() * abs_m.sum(1).amax())
    return m * torch.clamp(max_norm / bound, max=1.0)


def _to_host(flags: list[torch.Tensor]) -> list[bool]:
    """Booleans of 0-d flag tensors with one device synchronisation per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(i)
    out = [True] * len(flags)
    for indices in by_device.values():
        values = torch.stack([flags[i] for i in indices]).tolist()
        for i, value in zip(indices, values):
            out[i] = bool(value)
    return out


class _Item(NamedTuple):
    """One parameter's share of a step: its gradient (with weight decay), preconditioned columns
    ``d`` (0: none), candidate preconditioner ``m_new`` (``None`` until computed), group and name."""

    param: torch.Tensor
    grad: torch.Tensor
    d: int
    m_new: torch.Tensor | None
    group: dict[str, Any]
    name: str


class _KernelUpdate(NamedTuple):
    """A parameter whose momentum and weight step the compiled kernel takes, with ``M M^T``."""

    param: torch.Tensor
    grad: torch.Tensor
    d: int
    group: dict[str, Any]
    precond: torch.Tensor


class _Plan:
    """Segments of rows ``(layer, first row, end row)`` over layers of ``(rows, d)``, split into
    contiguous ranges of about equal size, one per thread."""

    def __init__(self, layers: tuple[tuple[int, int], ...], n_threads: int) -> None:
        layer, first, end, sizes = [], [], [], []
        for i, (rows, d) in enumerate(layers):
            step = max(1, _KERNEL_SEGMENT // d)
            for r in range(0, rows, step):
                layer.append(i), first.append(r), end.append(min(rows, r + step)), sizes.append((end[-1] - r) * d)
        self.layer = torch.tensor(layer, dtype=torch.int64)
        self.first = torch.tensor(first, dtype=torch.int64)
        self.end = torch.tensor(end, dtype=torch.int64)
        self.count = len(layer)
        self.ranges = _kernel.balanced_ranges(sizes, n_threads)


def _kernel_eligible(p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], d: int) -> bool:
    """Whether the compiled kernel takes this parameter's FOP step (else the torch path)."""
    u, m = state.get("direction"), state.get("precond")
    return (
        0 < d <= _KERNEL_MAX_DIM and u is not None and m is not None
        and 3 * (p.numel() // d) >= d  # the torch path's Gram branch, whose bound the batch reproduces
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (p, g, u, m))
    )


class FOP(torch.optim.Optimizer):
    """SGD (with momentum and weight decay) with learned first-order preconditioning.

    Implements Moskovitz et al. (2019), "First-order Preconditioning via Hypergradient Descent"
    (arXiv 1910.08461): per weight matrix, ``W <- W - lr * U M M^T`` where ``U`` is the gradient
    (or momentum) direction and ``M`` is learned from the correlation of consecutive gradients.
    Convolution kernels share one ``k^2 x k^2`` spatial preconditioner per layer, linear layers
    one ``d_in x d_in``; biases and normalisation parameters take the plain SGD update.  See the
    module docstring for the derivation, the layout and the guards.

    Parameters
    ----------
    params : iterable of tensors or dicts
        Parameters to optimise, or param groups (dicts that may override any option below).
    lr : float, default=0.01
        Learning rate, ``>= 0``.
    precond_lr : float, default=1e-3
        Step size of the hypergradient descent on ``M``, ``>= 0``.  ``0`` keeps ``M = I``:
        the optimizer is then exactly SGD.  Its useful range shrinks with the gradient scale
        and the number of rows ``n`` sharing a preconditioner.
    momentum : float, default=0.0
        Heavy-ball momentum in ``[0, 1)`` (torch's SGD convention, no dampening); the momentum
        buffer is the direction ``U`` that gets preconditioned.
    weight_decay : float, default=0.0
        L2 coefficient added to the gradient (``g = grad + weight_decay * W``) before everything
        else, so the hypergradient sees the regularised objective too.
    max_precond_norm : float, default=10.0
        Bound on ``||M||_2`` (through a cheap upper bound; see the module docstring), so that
        ``||P||_2 <= max_precond_norm**2``.
    max_precond_dim : int, default=512
        Matrices with more preconditioned columns than this take the base update: ``M`` costs
        ``d^2`` memory and ``d^3`` work per step (512 covers ResNet-18's classifier).
    backend : {"auto", "compiled", "torch"}, default="auto"
        Who computes the steps of float32 CPU parameters with at most 16 columns (see
        :class:`~sklearn_bayes_transfer.Backend`): ``"auto"`` uses the compiled kernel when a C
        compiler can build it, ``"compiled"`` insists (an error if it cannot be built), ``"torch"``
        uses torch operations only.  Other parameters always take the torch path.

    Examples
    --------
    >>> import torch
    >>> from sklearn_bayes_transfer.optim import FOP
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
    ...                             torch.nn.Linear(4 * 6 * 6, 3))
    >>> opt = FOP(model.parameters(), lr=0.05, precond_lr=1e-3, momentum=0.9)
    >>> x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     torch.nn.functional.cross_entropy(model(x), y).backward()
    ...     opt.step()
    >>> opt.state[model[0].weight]["precond"].shape   # one 9 x 9 spatial factor for the conv
    torch.Size([9, 9])

    With skorch: ``NeuralNetClassifier(module, optimizer=FOP, lr=0.05,
    optimizer__precond_lr=1e-3, optimizer__momentum=0.9)``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        precond_lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_precond_norm: float = 10.0,
        max_precond_dim: int = 512,
        backend: Backend | str = Backend.AUTO,
    ) -> None:
        defaults = dict(
            lr=lr,
            precond_lr=precond_lr,
            momentum=momentum,
            weight_decay=weight_decay,
            max_precond_norm=max_precond_norm,
            max_precond_dim=max_precond_dim,
        )
        _validate(defaults)
        self.backend = check_choice(Backend, backend, "backend")
        if self.backend is Backend.COMPILED:
            try:
                _kernel.load_kernel()
            except _kernel.KernelUnavailable as exc:
                raise ConfigError(f"FOP: backend='compiled' but the kernel is unavailable: {exc}; "
                                  "use backend='auto' to fall back to torch") from None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after checking its options (overrides are validated like defaults)."""
        _validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one optimisation step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (called with gradients enabled).

        Returns
        -------
        loss : float or None
            What ``closure`` returned, if given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Phase 1: gradients, candidate preconditioners and one finiteness flag per parameter.
        # A non-finite gradient entry always reaches the candidate M (NaN * 0 is NaN, and an
        # infinite hypergradient makes the trust-region factor 0, hence inf * 0 = NaN), so a
        # finite candidate certifies the gradient too and the big tensor need not be scanned.
        items = []
        flags: list[torch.Tensor | None] = []
        fast: list[int] = []  # indices of items whose steps the compiled kernel computes
        lib: Any = None  # loaded (and, once per machine, built) only when a parameter qualifies
        for group_index, group in enumerate(self.param_groups):
            _validate(group)  # param_groups are public: skorch's set_params writes into them
            lr = float(group["lr"])
            names = group.get("param_names")
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("FOP does not support sparse gradients; use dense parameters")
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                d = _precond_dim(p, group["max_precond_dim"])
                m_new = None
                name = names[index] if names else f"param_groups[{group_index}]['params'][{index}]"
                if d and _kernel_eligible(p, g, state, d) and (lib := lib or self._kernel_library()):
                    fast.append(len(items))
                    flags.append(None)  # filled in by the batched hyper step below
                    items.append(_Item(p, g, d, None, group, name))
                    continue
                if d and "precond" in state:
                    step = _hyper_step(state["direction"].reshape(-1, d), g.reshape(-1, d),
                                       state["precond"], group["precond_lr"] * lr)
                    m_new = _cap_norm(state["precond"] + step, group["max_precond_norm"])
                    flags.append(torch.isfinite(m_new).all())
                else:
                    flags.append(torch.isfinite(g).all())
                items.append(_Item(p, g, d, m_new, group, name))
        preconditioners = {}
        if fast:
            for i, (m_new, flag, precond) in zip(fast, self._kernel_hyper_steps(lib, [items[i] for i in fast])):
                items[i], flags[i], preconditioners[i] = items[i]._replace(m_new=m_new), flag, precond
        finite = _to_host(flags)

        # Phase 2: apply.
        kernel_updates = []
        for i, ((p, g, d, m_new, group, name), ok) in enumerate(zip(items, finite)):
            if ok and i in preconditioners:
                self.state[p]["precond"].copy_(m_new)
                kernel_updates.append(_KernelUpdate(p, g, d, group, preconditioners[i]))
                continue
            if not ok and m_new is not None:
                ok = bool(torch.isfinite(g).all())  # rare path: was it M or the gradient?
                if ok:
                    warnings.warn(
                        f"FOP: non-finite hypergradient for {name} (shape {tuple(p.shape)}); "
                        "its preconditioner update was skipped. Lower precond_lr or lr if this "
                        "repeats.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    m_new = None
            if not ok:
                warnings.warn(
                    f"FOP: the gradient of {name} (shape {tuple(p.shape)}) holds NaN or inf; "
                    "its update was skipped. Lower lr or check the loss for overflow.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            state = self.state[p]
            if m_new is not None:
                state["precond"].copy_(m_new)
            elif d and "precond" not in state:
                state["precond"] = torch.eye(d, dtype=p.dtype, device=p.device)
            self._update(p, g, d, state, group)
        if kernel_updates:
            self._kernel_update(lib, kernel_updates)
        return loss

    # -- compiled kernel (CPU, float32, d <= 16) -------------------------------------------------
    def _kernel_library(self):
        """The FOP kernel library when this optimizer may use it, else ``None``."""
        backend = getattr(self, "backend", Backend.AUTO)  # optimizers unpickled from older versions
        if backend is Backend.TORCH or (backend is Backend.AUTO and _kernel.kernel_disabled()):
            return None
        try:
            return _kernel.load_kernel()
        except _kernel.KernelUnavailable:
            return None

    def _plan(self, layers: tuple[tuple[int, int], ...]) -> _Plan:
        plans = self.__dict__.setdefault("_kernel_plans", {})
        key = (layers, max(1, torch.get_num_threads()))
        if key not in plans:
            if len(plans) > 8:  # parameters come and go (param groups added): keep a few
                plans.clear()
            plans[key] = _Plan(*key)
        return plans[key]

    def _kernel_hyper_steps(self, lib, fast_items: list[_Item]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(M_new, finite flag, M_new M_new^T)`` per parameter, as :func:`_hyper_step` and
        :func:`_cap_norm` compute them one by one: Gram products in one compiled sweep over all
        the parameters, the ``d x d`` algebra batched over parameters with the same ``d``."""
        layers = tuple((item.param.numel() // item.d, item.d) for item in fast_items)
        plan = self._plan(layers)
        u_ptr = torch.tensor([self.state[item.param]["direction"].data_ptr() for item in fast_items], dtype=torch.int64)
        g_ptr = torch.tensor([item.grad.data_ptr() for item in fast_items], dtype=torch.int64)
        dims = torch.tensor([d for _, d in layers], dtype=torch.int64)
        width = _KERNEL_MAX_DIM * _KERNEL_MAX_DIM
        partial = torch.empty(plan.count, width)
        _kernel.run_segments(lib, lib.gram, plan.ranges, plan.layer.data_ptr(), plan.first.data_ptr(),
                             plan.end.data_ptr(), u_ptr.data_ptr(), g_ptr.data_ptr(), dims.data_ptr(),
                             partial.data_ptr())
        grams = torch.zeros(len(layers), width).index_add_(0, plan.layer, partial)
        out: list = [None] * len(layers)
        for d in sorted({d for _, d in layers}):
            idx = [i for i, (_, di) in enumerate(layers) if di == d]
            groups = [fast_items[i].group for i in idx]
            h = grams[idx, :d * d].view(-1, d, d)
            sym = h + h.transpose(1, 2)
            m = torch.stack([self.state[fast_items[i].param]["precond"] for i in idx])
            scale = torch.tensor([g["precond_lr"] * float(g["lr"]) for g in groups]).view(-1, 1, 1)
            bound = sym.abs().sum(1).amax(1).view(-1, 1, 1)
            m_new = m + torch.bmm(sym, m) * torch.clamp(_MAX_RELATIVE_STEP / (scale * bound), max=1.0) * scale
            abs_m = m_new.abs()
            norm = torch.sqrt(abs_m.sum(1).amax(1) * abs_m.sum(2).amax(1)).view(-1, 1, 1)
            max_norm = torch.tensor([float(g["max_precond_norm"]) for g in groups]).view(-1, 1, 1)
            m_new = m_new * torch.clamp(max_norm / norm, max=1.0)
            finite = torch.isfinite(m_new).flatten(1).all(1)
            precond = torch.bmm(m_new, m_new.transpose(1, 2))
            for j, i in enumerate(idx):
                out[i] = (m_new[j], finite[j], precond[j])
        return out

    def _kernel_update(self, lib, updates: list[_KernelUpdate]) -> None:
        """Momentum and preconditioned weight step of the parameters in ``updates``, in one sweep."""
        layers = tuple((u.param.numel() // u.d, u.d) for u in updates)
        plan = self._plan(layers)
        width = _KERNEL_MAX_DIM * _KERNEL_MAX_DIM
        pmat = torch.zeros(len(updates), width)
        for i, u in enumerate(updates):
            pmat[i, :u.d * u.d] = u.precond.reshape(-1)
        u_ptr = torch.tensor([self.state[u.param]["direction"].data_ptr() for u in updates], dtype=torch.int64)
        g_ptr = torch.tensor([u.grad.data_ptr() for u in updates], dtype=torch.int64)
        p_ptr = torch.tensor([u.param.data_ptr() for u in updates], dtype=torch.int64)
        dims = torch.tensor([d for _, d in layers], dtype=torch.int64)
        lrs = torch.tensor([float(u.group["lr"]) for u in updates])
        moms = torch.tensor([float(u.group["momentum"]) for u in updates])
        _kernel.run_segments(lib, lib.update, plan.ranges, plan.layer.data_ptr(), plan.first.data_ptr(),
                             plan.end.data_ptr(), u_ptr.data_ptr(), g_ptr.data_ptr(), p_ptr.data_ptr(),
                             dims.data_ptr(), pmat.data_ptr(), lrs.data_ptr(), moms.data_ptr())

    @staticmethod
    def _update(p: torch.Tensor, g: torch.Tensor, d: int, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        """Momentum, preconditioning and the weight step; keeps the direction for next time."""
        momentum = group["momentum"]
        u = state.get("direction")
        if u is None:
            u = state["direction"] = g.clone(memory_format=torch.preserve_format)
        elif momentum != 0:
            u.mul_(momentum).add_(g)
        else:
            u.copy_(g)
        lr = float(group["lr"])
        if not d:
            p.add_(u, alpha=-lr)
            return
        u = u.reshape(-1, d)
        m = state["precond"]
        # A product then an add streams faster than the fused addmm_ with a d x d right factor.
        p.add_(_apply_precond(u, m).view(p.shape), alpha=-lr)


class OptimizerName(str, Enum):
    """Optimizers selectable by name (estimators' ``optimizer``, the CLI's ``--optimizer``).

    - ``"sgd"``: :class:`torch.optim.SGD` with momentum; downstream, the prior is then applied
      as an exact proximal step, stable for every prior scale;
    - ``"adam"``: :class:`torch.optim.Adam` (no momentum argument);
    - ``"fop"``: :class:`FOP`, SGD with learned first-order preconditioning.
    """

    SGD = "sgd"
    ADAM = "adam"
    FOP = "fop"


def optimizer_arguments(optimizer: "OptimizerName | str | type[torch.optim.Optimizer]", *,
                        momentum: float = 0.0, weight_decay: float = 0.0) -> dict[str, Any]:
    """skorch keyword arguments (``optimizer``, ``optimizer__...``) for a named or given optimizer.

    Momentum is passed only to optimizers that take it (SGD, FOP).

    Examples
    --------
    >>> optimizer_arguments("fop", momentum=0.9)["optimizer"].__name__
    'FOP'
    """
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        cls = optimizer
    else:
        name = check_choice(OptimizerName, optimizer, "optimizer")
        cls = {OptimizerName.SGD: torch.optim.SGD, OptimizerName.ADAM: torch.optim.Adam, OptimizerName.FOP: FOP}[name]
    kwargs: dict[str, Any] = {"optimizer": cls}
    if cls is not torch.optim.Adam and cls is not torch.optim.AdamW:
        kwargs["optimizer__momentum"] = float(momentum)
    if weight_decay:
        kwargs["optimizer__weight_decay"] = float(weight_decay)
    return kwargs

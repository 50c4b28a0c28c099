"""``pcdeq_fixed_point``: plain fixed-point iteration under TorchDEQ's solver contract.

For a pcDEQ layer plain iteration ``z_{k+1} = f(z_k)`` converges from every ``z_0 >= 0``
(method.md, section 2); this solver does exactly that and reports, per sample, whether and when
it reached the tolerance. It is also usable as the implicit backward solver: ``func`` is only
ever called as ``func(z)``.

Convergence is checked at "check" iterations only, because a check costs about as much as a
small ``f`` and, on GPU, needs a host sync. With ``check_every="auto"`` (default) the first check
is at iteration 2 and the next one where the observed geometric rate predicts the tolerance will
be met (the iteration count at most triples between checks), so a solve of ``K`` iterations costs
about ``log3(K)`` checks; the final iteration is always checked. Traces therefore hold one column
per check; ``info["trace_steps"]`` gives their iteration numbers. Pass ``check_every=1`` for a
residual at every iteration (TorchDEQ's behaviour).

Example:
    >>> import torch
    >>> from torchdeq_pcdeq import PcDEQLinear, pcdeq_fixed_point
    >>> f = PcDEQLinear(8)
    >>> x = f.inject(torch.randn(3, 8))
    >>> z, _, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros(3, 8), max_iter=50, tol=1e-6)
    >>> info["converged"].tolist()
    [True, True, True]
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchdeq.solver.stat import SolverStat

from .errors import InvalidInputError, NotPositiveMonotoneError, PcDEQWarning, check_choice

__all__ = ["pcdeq_fixed_point", "GUARD_MODES", "STOP_MODES", "resolution_floor"]

GUARD_MODES = ("raise", "warn", "off")
STOP_MODES = ("rel", "abs")

# Successive iterates of a converged solve still differ by a few ulps per entry, so residuals
# below this many machine epsilons (relative to ||f(z)||) are unreachable in the state's dtype.
_RESOLUTION_ULPS = 8.0
# Rounding slack of the monotonicity guard, in ulps of the largest entry.
_GUARD_ULPS = 16.0
_warned_floors: set[tuple[torch.dtype, str, float]] = set()


def resolution_floor(dtype: torch.dtype) -> float:
    """The smallest relative residual that iterates of ``dtype`` can be trusted to reach."""
    return _RESOLUTION_ULPS * torch.finfo(dtype).eps


def pcdeq_fixed_point(
    func: Callable[[Tensor], Tensor],
    x0: Tensor,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    indexing: Sequence[int] | None = None,
    *,
    check_every: int | str = "auto",
    guard: str = "off",
    tau: float = 1.0,
    **kwargs,
) -> tuple[Tensor, list[Tensor], SolverStat]:
    """Solve ``z = func(z)`` by plain iteration from ``x0``.

    Args:
        func: the map; called as ``func(z)`` only.
        x0: initial state, shape ``(batch, ...)`` (batch dimension first).
        max_iter: maximum number of calls of ``func`` (>= 1).
        tol: tolerance (> 0) on the per-sample residual chosen by ``stop_mode``: ``"rel"``
            ``||f(z) - z|| / ||f(z)||`` or ``"abs"`` ``||f(z) - z||`` (2-norms over each sample).
            A tolerance finer than the dtype can resolve is raised to
            :func:`resolution_floor` (relative), with a warning.
        indexing: iterations at which to return the state (TorchDEQ contract).
        check_every: ``"auto"`` or a positive int: how often to evaluate the residual.
        guard: ``"off"`` (default), ``"warn"`` or ``"raise"``: at each check, verify that the
            iterates are nonnegative and, when ``x0 == 0``, nondecreasing, as a
            positive-monotone map guarantees.
        tau: accepted for TorchDEQ compatibility; only ``1.0`` (undamped) is supported.
        **kwargs: unknown options are reported with a warning, not silently dropped.

    Returns:
        ``(z, states, info)``: the final iterate, the states at ``indexing``, and a TorchDEQ
        ``SolverStat`` with per-sample ``abs_lowest``, ``rel_lowest``, ``nstep`` (the first
        checked iteration from which the sample stayed within tolerance, or the last iteration
        if it ended above), traces
        ``abs_trace`` / ``rel_trace`` of shape ``(batch, checks)``, ``trace_steps`` ``(checks,)``,
        ``sradius`` and ``converged`` (per-sample bool, at the returned state).

    Raises:
        InvalidInputError: invalid arguments (before any call of ``func``).
        NotPositiveMonotoneError: ``guard="raise"`` and the iterates betray a map that is not
            positive-monotone.
    """
    if kwargs:
        warnings.warn(
            f"pcdeq_fixed_point ignores unknown options {sorted(kwargs)}; valid options are "
            "max_iter, tol, stop_mode, indexing, check_every, guard.",
            PcDEQWarning,
            stacklevel=2,
        )
    _validate(x0, max_iter, tol, stop_mode, check_every, guard, tau)

    monitor = _Monitor(x0, tol, stop_mode, guard, check_every)
    pending = sorted(set(indexing or ()))  # iterations whose state is returned
    states: list[Tensor] = []
    next_check = monitor.first_check(max_iter)
    next_event = 1  # the first call's output is validated
    z, k = x0, 0
    while k < max_iter:
        fz = func(z)
        k += 1
        if k >= next_event:  # rare: keep the common path to one call and two comparisons
            if k == 1:
                _check_output(fz, z)
            if pending and pending[0] == k:
                states.append(fz)
                pending.pop(0)
            if k in (next_check, max_iter):
                done, gap = monitor.check(k, z, fz)
                if done:
                    z = fz
                    break
                next_check = min(k + gap, max_iter)
            next_event = min(next_check, pending[0]) if pending else next_check
        z = fz

    if indexing and not states:
        states.append(z)
    return z, states, monitor.stat(k, z.device)


class _Monitor:
    """Convergence checks of one solve.

    A check reduces the iterates on the device to per-sample residuals (kept on the device for
    ``info``) and copies one number to the host, the worst residual relative to its limit,
    together with the guard's scalars: the only host sync of the check. The stopping decision,
    the guard and the schedule of the next check use those few numbers; the per-sample
    statistics are assembled on the device when the solve ends.
    """

    def __init__(self, x0: Tensor, tol: float, stop_mode: str, guard: str, check_every):
        self.x0, self.tol, self.stop_mode, self.guard, self.check_every = (
            x0,
            tol,
            stop_mode,
            guard,
            check_every,
        )
        self.acc, self.tiny, self.floor, self.guard_slack = _dtype_constants(x0.dtype)
        if stop_mode == "rel" and tol < self.floor:
            _warn_floor(x0.dtype, stop_mode, tol, self.floor)
        self.rel_limit = max(tol, self.floor)
        self.dims = tuple(range(1, x0.dim()))
        self.from_zero: bool | None = None
        self.steps: list[int] = []
        self.abs: list[Tensor] = []
        self.rel: list[Tensor] = []
        self.abs_limit: list[Tensor] = []
        self.worst: list[float] = []

    def first_check(self, max_iter: int) -> int:
        # From z0 = 0 the first relative residual is exactly 1: start checking at the second.
        return min(2 if self.check_every == "auto" else self.check_every, max_iter)

    def check(self, k: int, z: Tensor, fz: Tensor) -> tuple[bool, int]:
        """Record iteration ``k`` (``fz = f(z)``); return (all converged, iterations to the next check)."""
        if fz.requires_grad or z.requires_grad:
            fz, z = fz.detach(), z.detach()
        diff = fz - z
        abs_res = torch.linalg.vector_norm(diff, dim=self.dims, dtype=self.acc)
        fz_norm = torch.linalg.vector_norm(fz, dim=self.dims, dtype=self.acc)
        rel_res = abs_res / (fz_norm + self.tiny)
        self.steps.append(k)
        self.abs.append(abs_res)
        self.rel.append(rel_res)
        if self.stop_mode == "rel":
            worst = rel_res.amax()
        else:  # residuals below the dtype's resolution count as converged whatever tol says
            self.abs_limit.append(torch.clamp_min(fz_norm * self.floor, self.tol))
            worst = (abs_res / self.abs_limit[-1]).amax()
        if self.guard == "off":
            worst = worst.item()  # the one host sync of this check
        else:
            low, high = torch.aminmax(fz)
            scalars = [worst, low.to(self.acc), high.to(self.acc), diff.amin().to(self.acc)]
            if self.from_zero is None:
                scalars.append(self.x0.detach().abs().amax().to(self.acc))
            worst, *values = torch.stack(scalars).tolist()  # the one host sync of this check
            self._apply_guard(values, k, fz, diff)
        # the worst residual over its limit: <= 1 when every sample has converged
        self.worst.append(worst / self.rel_limit if self.stop_mode == "rel" else worst)
        if self.worst[-1] <= 1.0:
            return True, 0
        if self.check_every != "auto":
            return False, self.check_every
        return False, self._auto_gap(k)

    def _apply_guard(self, values: list[float], k: int, fz: Tensor, diff: Tensor) -> None:
        low, high, drop = values[:3]
        if self.from_zero is None:
            self.from_zero = values[3] == 0
        negative = low < 0
        decreasing = self.from_zero and drop < -self.guard_slack * high
        if negative or decreasing:
            _report_guard(self.guard, fz, diff, k, negative=negative)
            self.guard = "off"  # report once per solve

    def _auto_gap(self, k: int) -> int:
        """Iterations until the worst residual is predicted to reach its limit.

        Assumes the geometric rate seen between the last two checks persists. The iteration
        count at most doubles while no rate is known and at most triples afterwards (it grows
        by half while the worst residual is not decreasing), so a long solve costs a
        logarithmic number of checks.
        """
        if len(self.steps) < 2:
            return k
        now, before = self.worst[-1], self.worst[-2]
        if not before > now > 0:
            return max(1, k // 2)
        need = (k - self.steps[-2]) * math.log(now) / math.log(before / now)
        return min(max(1, math.ceil(need)), 2 * k)

    def stat(self, k: int, device: torch.device) -> SolverStat:
        """TorchDEQ's ``SolverStat`` plus ``converged`` and ``trace_steps``.

        ``nstep`` is, per sample, the first checked iteration from which the sample stayed
        within tolerance to the end (the last iteration if it ended above).
        """
        n = len(self.steps)
        history = torch.stack(self.abs + self.rel, dim=1)  # (batch, 2n): one op for both traces
        abs_trace, rel_trace = history[:, :n], history[:, n:]
        lowest = history.view(-1, 2, n).amin(dim=2)
        if self.stop_mode == "rel":
            ok = rel_trace <= self.rel_limit
        else:
            ok = abs_trace <= torch.stack(self.abs_limit, dim=1)
        nstep = [_settled_step(row, self.steps, k) for row in ok.tolist()]
        # SolverStat's constructor builds a default tensor per key; every key is given here.
        info = SolverStat.__new__(SolverStat)
        dict.__init__(
            info,
            abs_lowest=lowest[:, 0],
            rel_lowest=lowest[:, 1],
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            nstep=torch.tensor(nstep, dtype=history.dtype, device=device),
            sradius=torch.full((1,), -1.0, device=device),
            trace_steps=torch.tensor(self.steps, dtype=torch.long, device=device),
            converged=ok[:, -1],
        )
        return info


def _settled_step(ok: list[bool], steps: list[int], last: int) -> int:
    """The step of the first check of the final run of successful checks (``last`` if none)."""
    first = len(ok)
    while first and ok[first - 1]:
        first -= 1
    return steps[first] if first < len(ok) else last


@functools.cache
def _dtype_constants(dtype: torch.dtype) -> tuple[torch.dtype, float, float, float]:
    """(accumulation dtype, its tiny, resolution floor, guard slack) for states of ``dtype``."""
    acc = torch.promote_types(dtype, torch.float32)
    return acc, torch.finfo(acc).tiny, resolution_floor(dtype), _GUARD_ULPS * torch.finfo(dtype).eps


def _report_guard(mode: str, fz: Tensor, diff: Tensor, k: int, negative: bool) -> None:
    if negative:
        message = (
            f"pcDEQ guard: iterate {k} has {int((fz < 0).sum())} negative entries (min "
            f"{fz.min().item():.3g}); a positive map never produces them. Likely causes: a "
            "negative or non-admissible injection (compute it with layer.inject(u)), a negative "
            "weight (use the pcDEQ layers or --norm_type pcdeq_nonneg), an activation that is "
            "negative on [0, inf), or a negative initial state."
        )
    else:
        message = (
            f"pcDEQ guard: the iteration started from 0 but iterate {k} is below iterate {k - 1} "
            f"in {int((diff < 0).sum())} entries (by up to {-diff.min().item():.3g}); a monotone "
            "map gives nondecreasing iterates from 0. Likely causes: a negative weight (use the "
            "pcDEQ layers or --norm_type pcdeq_nonneg) or an activation that decreases "
            "somewhere on [0, inf)."
        )
    message += " Set pcdeq_guard='warn' or 'off' to continue anyway, without the guarantees."
    if mode == "raise":
        raise NotPositiveMonotoneError(message)
    warnings.warn(message, PcDEQWarning, stacklevel=3)


def _warn_floor(dtype: torch.dtype, stop_mode: str, tol: float, floor: float) -> None:
    key = (dtype, stop_mode, tol)
    if key not in _warned_floors:
        _warned_floors.add(key)
        warnings.warn(
            f"tol={tol:g} ({stop_mode}) is below what {dtype} iterates can resolve; residuals "
            f"under {floor:.3g} count as converged. Use a wider dtype for a finer tolerance.",
            PcDEQWarning,
            stacklevel=3,
        )


def _check_output(fz, z: Tensor) -> None:
    if not isinstance(fz, Tensor) or fz.shape != z.shape:
        got = f"shape {tuple(fz.shape)}" if isinstance(fz, Tensor) else type(fz).__name__
        raise InvalidInputError(
            f"func must map a state of shape {tuple(z.shape)} to the same shape, got {got}. A "
            "fixed point needs f: R^n -> R^n; check the layer's output and the initial state."
        )


def _validate(x0, max_iter, tol, stop_mode, check_every, guard, tau) -> None:
    if not isinstance(x0, Tensor):
        raise InvalidInputError(
            f"pcdeq_fixed_point expects the initial state as one tensor, got {type(x0).__name__}. "
            "Multi-tensor states (MDEQ lists) are not supported: concatenate them."
        )
    if x0.dim() < 2:
        raise InvalidInputError(
            f"pcdeq_fixed_point expects a state of shape (batch, ...) with the batch dimension "
            f"first, got shape {tuple(x0.shape)}. Add a batch dimension with z.unsqueeze(0)."
        )
    if not x0.is_floating_point():
        raise InvalidInputError(f"pcdeq_fixed_point expects a floating-point state, got {x0.dtype}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InvalidInputError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < math.inf):
        raise InvalidInputError(f"tol must be a positive finite number, got {tol!r}.")
    check_choice("stop_mode", stop_mode, STOP_MODES)
    check_choice("guard mode", guard, GUARD_MODES)
    if check_every != "auto" and (
        isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
    ):
        raise InvalidInputError(f"check_every must be 'auto' or an integer >= 1, got {check_every!r}.")
    if tau != 1.0:
        raise InvalidInputError(
            f"pcdeq_fixed_point is undamped (tau=1.0); got tau={tau!r}. Plain iteration already "
            "converges for pcDEQ: drop tau."
        )

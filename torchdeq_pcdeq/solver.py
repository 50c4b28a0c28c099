"""``pcdeq_fixed_point``: plain fixed-point iteration under TorchDEQ's solver contract.

For a pcDEQ layer plain iteration ``z_{k+1} = f(z_k)`` converges from every ``z_0 >= 0``
(method.md, section 2); this solver does exactly that and reports, per sample, whether and when
it reached the tolerance. It is also usable as the implicit backward solver: ``func`` is only
ever called as ``func(z)``.

Convergence is checked at "check" iterations only, because a check costs about as much as a
small ``f`` and, on GPU, needs a host sync. With ``check_every="auto"`` (default) the next check
is scheduled where the observed geometric rate predicts the tolerance will be met (never more
than doubling the iteration count); the final iteration is always checked. Traces therefore
hold one column per check; ``info["trace_steps"]`` gives their iteration numbers. Pass
``check_every=1`` for a residual at every iteration.

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
        checked iteration at which the sample met the tolerance, or the last iteration), traces
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

    bsz = x0.shape[0]
    acc = torch.promote_types(x0.dtype, torch.float32)
    tiny = torch.finfo(acc).tiny
    floor = resolution_floor(x0.dtype)
    if stop_mode == "rel" and tol < floor:
        _warn_floor(x0.dtype, stop_mode, tol, floor)
    indexing = set(indexing or ())
    from_zero = (x0 == 0).all() if guard != "off" else None

    steps: list[int] = []
    abs_hist: list[Tensor] = []
    rel_hist: list[Tensor] = []
    ok_hist: list[Tensor] = []
    states: list[Tensor] = []
    z, k, next_check = x0, 0, 1 if check_every == "auto" else min(int(check_every), max_iter)
    while k < max_iter:
        fz = func(z)
        k += 1
        if k in indexing:
            states.append(fz)
        if k != next_check and k != max_iter:
            z = fz
            continue

        diff = fz - z
        abs_res = torch.linalg.vector_norm(diff.flatten(1), dim=1, dtype=acc)
        fz_norm = torch.linalg.vector_norm(fz.flatten(1), dim=1, dtype=acc)
        rel_res = abs_res / (fz_norm + tiny)
        # Residuals below the dtype's resolution count as converged whatever tol says.
        limit = torch.clamp_min(fz_norm * floor, tol) if stop_mode == "abs" else max(tol, floor)
        metric = abs_res if stop_mode == "abs" else rel_res
        ok = metric <= limit
        steps.append(k)
        abs_hist.append(abs_res)
        rel_hist.append(rel_res)
        ok_hist.append(ok)

        flags = [ok.all().to(acc)]
        if check_every == "auto":
            flags.append(_predicted_iterations(steps, abs_hist, rel_hist, stop_mode, limit, ok))
        if guard != "off":
            scale = fz.detach().abs().amax().to(acc)
            flags.append((fz.amin() < 0).to(acc))
            flags.append(
                (from_zero & (diff.amin().to(acc) < -_GUARD_ULPS * torch.finfo(fz.dtype).eps * scale)).to(acc)
            )
        values = torch.stack(flags).tolist()  # the one host sync of this check

        if guard != "off" and (values[-2] or values[-1]):
            _report_guard(guard, fz, diff, k, negative=bool(values[-2]))
            guard = "off"  # report once per solve
        z = fz
        if values[0]:
            break
        if check_every == "auto":
            need = values[1]
            gap = max(1, k // 2) if not math.isfinite(need) else min(max(1, math.ceil(need)), max(1, k))
        else:
            gap = int(check_every)
        next_check = min(k + gap, max_iter)

    if indexing and not states:
        states.append(z)
    return z, states, _stat(steps, abs_hist, rel_hist, ok_hist, k, bsz, z.device)


def _predicted_iterations(
    steps: list[int], abs_hist: list[Tensor], rel_hist: list[Tensor], stop_mode: str, limit, ok: Tensor
) -> Tensor:
    """Further iterations until the slowest unconverged sample meets ``limit``, on the device.

    Assumes the geometric rate observed between the last two checks persists; ``inf`` when
    there is no previous check or a sample is not contracting.
    """
    hist = abs_hist if stop_mode == "abs" else rel_hist
    now = hist[-1]
    if len(steps) < 2:
        return torch.full((), math.inf, dtype=now.dtype, device=now.device)
    tiny = torch.finfo(now.dtype).tiny
    log_now = now.clamp_min(tiny).log()
    log_rate = (log_now - hist[-2].clamp_min(tiny).log()) / (steps[-1] - steps[-2])
    limit = torch.as_tensor(limit, dtype=now.dtype, device=now.device)
    log_gap = limit.clamp_min(tiny).log() - log_now  # < 0 for unconverged samples
    need = torch.where(log_rate < 0, log_gap / log_rate.clamp_max(-tiny), math.inf)
    return torch.where(ok, 0.0, need).max()


def _stat(steps, abs_hist, rel_hist, ok_hist, k, bsz, device) -> SolverStat:
    abs_trace = torch.stack(abs_hist, dim=1)
    rel_trace = torch.stack(rel_hist, dim=1)
    ok = torch.stack(ok_hist, dim=1)
    trace_steps = torch.tensor(steps, dtype=torch.long, device=device)
    ever = ok.any(dim=1)
    first = torch.where(ever, ok.to(torch.uint8).argmax(dim=1), len(steps) - 1)
    nstep = torch.where(ever, trace_steps[first], k).to(abs_trace.dtype)
    info = SolverStat(
        abs_lowest=abs_trace.min(dim=1).values,
        rel_lowest=rel_trace.min(dim=1).values,
        abs_trace=abs_trace,
        rel_trace=rel_trace,
        nstep=nstep,
    )
    info["trace_steps"] = trace_steps
    info["converged"] = ok[:, -1]
    return info


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

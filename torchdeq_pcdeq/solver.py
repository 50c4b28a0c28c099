"""``pcdeq_fixed_point``: plain fixed-point iteration under TorchDEQ's solver contract.

For a pcDEQ layer plain iteration ``z_{k+1} = f(z_k)`` converges from every ``z_0 >= 0``
(docs/method.md, section 2); this solver does exactly that and reports, per sample, whether and when
it reached the tolerance. It is also usable as the implicit backward solver: ``func`` is only
ever called as ``func(z)``.

Three ways to measure convergence, all per sample:

* residual (default): ``||f(z) - z||`` and ``||f(z) - z|| / ||f(z)||`` in the 2-norm;
* certified enclosure (``enclosure=True``): iterate from ``0`` and from ``upper * 1`` together;
  the two sequences bracket the fixed point, the midpoint is returned and
  ``info["error_bound"]`` bounds ``max_i |z_i - z*_i|`` (docs/method.md, section 3);
* certified contraction (``weights=w, rate=q``): for a map that contracts by ``q`` in the
  ``w``-weighted l1 norm (the adjoint of a pcDEQ layer: ``q, w = rate_certificate(f, z*)``),
  the a-posteriori bound ``q / (1 - q) ||y_k - y_{k-1}||_w`` on ``||y_k - y*||_w`` is
  ``info["error_bound"]``.

In the certified modes the solve stops on the bound (``abs``) or on the bound relative to the
state's size (``rel``: the inf-norm for the enclosure, the ``w``-norm for the contraction), and
the traces hold the bounds.

Convergence is checked at "check" iterations only, because a check costs about as much as a
small ``f`` and, on GPU, needs a host sync. With ``check_every="auto"`` (default) the first check
is at iteration 2 and the next one where the observed geometric rate predicts the tolerance will
be met (the iteration count at most doubles between checks), so a solve of ``K`` iterations costs
about ``log2(K)`` checks at worst; the final iteration is always checked. Traces therefore hold one column
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
    >>> z, _, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros(3, 8), enclosure=True, upper=1.0)
    >>> bool((info["error_bound"] <= 1e-4 * z.amax(dim=1)).all())
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchdeq.solver.stat import SolverStat

from .certify import rate_certificate
from .conv_kernels import sign_exact_products
from .errors import (
    InvalidInputError,
    NonFiniteError,
    as_integer,
    check_choice,
    positive_float,
    positive_int,
    warn,
    warn_once,
    warned_once,
)
from .guard import Guard, Rejudge
from .reductions import extremes, sample_dims
from .rounding import GUARD_ULPS, arithmetic_dtype, dtype_constants, resolution_floor

__all__ = ["pcdeq_fixed_point", "GUARD_MODES", "STOP_MODES", "NONFINITE_MODES", "resolution_floor"]

GUARD_MODES = ("raise", "warn", "off")
STOP_MODES = ("rel", "abs")
NONFINITE_MODES = ("raise", "report")


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
    enclosure: bool = False,
    upper: float | Callable[[], float] | None = None,
    weights: Tensor | None = None,
    rate: Tensor | None = None,
    tau: float = 1.0,
    nonfinite: str = "raise",
    **kwargs,
) -> tuple[Tensor, list[Tensor], SolverStat]:
    """Solve ``z = func(z)`` by plain iteration.

    Args:
        func: the map; called as ``func(z)`` only.
        x0: initial state, shape ``(batch, ...)`` (batch dimension first). With
            ``enclosure=True`` only its shape, dtype and device are used (the sequences start
            at 0 and at ``upper``).
        max_iter: maximum number of iterations (>= 1); an enclosure iteration calls ``func``
            twice.
        tol: tolerance (> 0) on the per-sample measure chosen by ``stop_mode`` (``"rel"`` or
            ``"abs"``, see the module docstring). A tolerance finer than the dtype can resolve
            is raised to :func:`resolution_floor` (relative), with a warning; with ``"abs"``,
            a residual below that floor times the sample's ``||f(z)||`` counts as converged,
            per sample and without a warning.
        indexing: iterations (each ``>= 1``) at which to return the state (TorchDEQ contract):
            one state per entry, in increasing order of iteration; an entry beyond the iteration
            at which the solve stopped (converged, or ``max_iter``) gets the final state, so that
            TorchDEQ's ``indexing`` core applies every gradient it was configured with.
        check_every: ``"auto"`` or a positive int: how often to evaluate convergence.
        guard: ``"off"`` (default), ``"warn"`` or ``"raise"``: at each check, look for iterates
            that a positive-monotone map cannot produce (negative values; from ``x0 = 0`` a
            decrease; with the enclosure a falling lower or rising upper sequence, crossing
            sequences, or two sequences settled on different fixed points). A plain solve that
            fails it after making Winograd products (:mod:`~torchdeq_pcdeq.conv_kernels`), whose
            rounding is not sign-exact, is solved again with sign-exact products, whose verdict
            stands.
        enclosure: iterate from 0 and from ``upper`` together; return the midpoint with a
            certified ``info["error_bound"]``. The certified solves (enclosure, contraction)
            run inside :func:`~torchdeq_pcdeq.conv_kernels.sign_exact_products`.
        upper: with the enclosure, the start of the upper sequence: a float, checked exactly
            (``f(upper) <= upper``; the activation's supremum, or any value known to bound
            ``z*``), or a zero-argument callable evaluated after the first call of ``func``
            that returns the supremum of the activations ``func`` calls (the pcdeq core's
            default), whose check allows the rounding of ``f``.
        weights: with ``rate``, the positive weights of the l1 norm in which ``func``
            contracts (shape of ``x0``); for the adjoint of a pcDEQ layer,
            :func:`~torchdeq_pcdeq.certify.rate_certificate` gives both.
        rate: per-sample contraction factor (shape ``(batch,)``); ``>= 1`` gives an infinite
            bound, so the sample cannot be certified.
        tau: accepted for TorchDEQ compatibility; only ``1.0`` (undamped) is supported.
        nonfinite: what a check does with samples whose measure is NaN (an iterate holding NaN
            or Inf, or one so large that its norm overflows). ``"raise"`` (default):
            :class:`NonFiniteError` (iterating a pcDEQ layer from a finite state stays finite
            unless its weights or data are not). ``"report"``, for maps that may legitimately
            diverge (the adjoint at a state where ``J`` does not contract): a sample diverges
            when its measure is NaN or its state's norm grows past ``1 / eps**2`` (of the
            accumulation dtype: float32, or float64 for float64 states) times its norm at the
            first check, which float64 would otherwise reach only after hundreds of iterations of
            growth. (A convergent map whose iterates grow that much on the way, a strongly
            non-normal one, is reported as diverged too; the adjoint of a pcDEQ layer grows by
            at most the spread of ``z*``'s entries over ``1 - q``, far below it.) Those samples are
            flagged in ``info["diverged"]``, the final state holds their initial state ``x0``
            (the states at ``indexing`` are left as computed), they never count as converged,
            and the solve goes on until the others converge. An ``x0`` that is not finite in
            such a sample is still a :class:`NonFiniteError`. Plain solves only.
        **kwargs: unknown options are reported with a warning, not silently dropped.

    Returns:
        ``(z, states, info)``: the final state, the states at ``indexing``, and a TorchDEQ
        ``SolverStat`` with per-sample ``abs_lowest``, ``rel_lowest``, ``nstep`` (the first
        checked iteration from which the sample stayed within tolerance, or the last iteration
        if it ended above), traces ``abs_trace`` / ``rel_trace`` of shape ``(batch, checks)``,
        ``trace_steps`` ``(checks,)``, ``sradius``, ``converged`` (per-sample bool: the last
        checked step, the one into the returned state, met the tolerance), in the certified
        modes ``error_bound`` ``(batch,)`` and with ``nonfinite="report"`` ``diverged``
        (per-sample bool).

    Raises:
        InvalidInputError: invalid arguments (before any call of ``func``).
        NonFiniteError: an iterate holds NaN or Inf (with ``nonfinite="report"``: a sample
            whose ``x0`` does).
        PreconditionError: ``guard="raise"`` and the iterates betray a map that is not a
            pcDEQ map (:class:`~torchdeq_pcdeq.errors.NotPositiveMonotoneError`,
            :class:`~torchdeq_pcdeq.errors.NonUniqueFixedPointError`; see
            :mod:`torchdeq_pcdeq.guard`).

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import PcDEQLinear
        >>> f = PcDEQLinear(8)
        >>> x = f.inject(torch.randn(3, 8))
        >>> z, _, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros(3, 8), tol=1e-5)
        >>> bool(info["converged"].all()), bool((info["rel_lowest"] <= 1e-5).all())
        (True, True)
        >>> z_tight, _, _ = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros(3, 8), tol=1e-6)
        >>> z, _, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros(3, 8), enclosure=True, upper=1.0)
        >>> error = (z - z_tight).abs().amax(dim=1)  # (z_tight within about 1e-6 of z*)
        >>> bool((error <= info["error_bound"] + 1e-6).all())
        True
    """
    if kwargs:
        warn(
            f"pcdeq_fixed_point ignores unknown options {sorted(kwargs)}; valid options are "
            "max_iter, tol, stop_mode, indexing, check_every, guard, enclosure, upper, weights, rate, "
            "nonfinite."
        )
    max_iter, tol, check_every, indexing = _validated(
        func, x0, max_iter, tol, stop_mode, check_every, guard, tau, indexing
    )
    _validate_certificates(x0, enclosure, upper, weights, rate)
    check_choice("nonfinite mode", nonfinite, NONFINITE_MODES)
    if enclosure and nonfinite != "raise":
        raise InvalidInputError(
            f"nonfinite={nonfinite!r} returns diverged samples at their initial state, which the "
            "enclosure does not have (it iterates from 0 and from upper, and a pcDEQ map keeps both "
            "finite). Use nonfinite='raise' with enclosure=True."
        )
    certified = "enclosure" if enclosure else "contraction" if weights is not None else None
    monitor = functools.partial(_Monitor, x0, tol, stop_mode, check_every, certified, nonfinite == "report")
    if certified:
        # The certificates' rounding margins cover sign-exact products only (conv_kernels).
        with sign_exact_products():
            if enclosure:
                return _enclosure_solve(func, x0, max_iter, indexing, monitor(), Guard(guard, x0), upper)
            measure = functools.partial(_contraction_bound, weights, rate)
            return _plain_solve(func, x0, max_iter, indexing, monitor(), Guard(guard, x0), measure)
    try:
        first_look = Guard(guard, x0, rejudge=True)
        return _plain_solve(func, x0, max_iter, indexing, monitor(), first_look, _residuals)
    except Rejudge:
        pass  # (solved again outside this block: a real violation's traceback is its own)
    # The guard saw a violation in a solve that made Winograd products, whose rounding can mimic
    # a small one: the same solve with sign-exact products has the last word.
    with sign_exact_products():
        return _plain_solve(func, x0, max_iter, indexing, monitor(), Guard(guard, x0), _residuals)


def _plain_solve(func, x0, max_iter, indexing, monitor, guard, measure):
    pending = sorted(indexing or ())  # iterations whose state is returned, one per entry
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
            while pending and pending[0] == k:
                states.append(fz)
                pending.pop(0)
            if k in (next_check, max_iter):
                z_, fz_ = (z.detach(), fz.detach()) if fz.requires_grad else (z, fz)
                diff = fz_ - z_
                abs_res, scale = measure(diff, fz_, monitor)
                flagged = monitor.diverged
                if flagged is not None and guard.mode != "off":  # rare: the guard watches the others
                    diff, fz_ = _without(flagged, diff, fz_)
                done, gap = monitor.check(k, abs_res, scale, guard.plain(k, diff, fz_))
                if monitor.diverged is not flagged and guard.mode != "off":
                    # rare: samples diverged at this check, and the guard saw NaN; look again
                    guard.recheck(k, *_without(monitor.diverged, diff, fz_))
                if done:
                    z = fz
                    break
                next_check = min(k + gap, max_iter)
            next_event = min(next_check, pending[0]) if pending else next_check
        z = fz
    if monitor.diverged is not None:  # rare: such samples restart where they began
        z = torch.where(_per_sample(monitor.diverged, z), x0, z)
    states += [z] * len(pending)  # iterations after the solve stopped: its final state
    return z, states, monitor.stat(k, z.device)


def _per_sample(samples: Tensor, like: Tensor) -> Tensor:
    """The per-sample bool ``samples`` as a mask that broadcasts over ``like``'s entries."""
    return samples.view(-1, *(1,) * (like.dim() - 1))


def _without(samples: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` with the entries of ``samples`` (per-sample bool) zeroed."""
    mask = _per_sample(samples, tensors[0])
    return tuple(t.masked_fill(mask, 0) for t in tensors)


def _enclosure_solve(func, x0, max_iter, indexing, monitor, guard, upper):
    pending = sorted(indexing or ())
    states: list[Tensor] = []
    next_check = monitor.first_check(max_iter)
    # Directed rounding: each computed step is moved outward by more than f's rounding, so that
    # the lower sequence stays below z* and the upper one above it in floating point too.
    down, up = 1.0 - monitor.margin, 1.0 + monitor.margin
    low, high, k = torch.zeros_like(x0), None, 0
    while k < max_iter:
        low_next = func(low)
        first = high is None
        if first:  # the first call revealed f's layers, hence the upper bound
            _check_output(low_next, low)
            start = _resolve_upper(upper, x0.dtype)
            high = torch.full_like(x0, start)
            if up != 1.0:  # (computed as each step is: a saturated entry maps to it exactly)
                high = high * up
        high_next = func(high)
        if up != 1.0:
            low_next, high_next = low_next * down, high_next * up
        if first:
            _check_upper_start(start, high.detach(), high_next.detach(), read_from_layers=callable(upper))
        k += 1
        while pending and pending[0] == k:
            states.append((low_next + high_next) / 2)
            pending.pop(0)
        if k in (next_check, max_iter):
            low_, high_, low_next_, high_next_ = (t.detach() for t in (low, high, low_next, high_next))
            bound, scale = _enclosure_bound(low_next_, high_next_, monitor)
            done, gap = monitor.check(
                k, bound, scale, guard.enclosure(k, low_, high_, low_next_, high_next_, monitor, func)
            )
            if done:
                low, high = low_next, high_next
                break
            # The bound stopped shrinking above the limit: the sequences stalled at the distance
            # rounding and the margins allow, (33 eps / (1 - q)), or at two fixed points (the
            # guard's verdict, when on). Stop at the floor that q certifies.
            stalled = monitor.margin and len(monitor.worst) > 1 and monitor.worst[-1] >= monitor.worst[-2]
            if stalled and _raise_to_enclosure_floor(func, low_next_, monitor):
                gap = 1  # (the next check judges the bound against the raised limit)
            next_check = min(k + gap, max_iter)
        low, high = low_next, high_next
    z = (low + high) / 2
    states += [z] * len(pending)
    info = monitor.stat(k, z.device)
    info["lower"], info["upper"] = low.detach(), high.detach()  # the certified bracket of z*
    return z, states, info


# -- measures: per-sample (absolute measure, scale of the state) --------------------------------


def _residuals(diff: Tensor, fz: Tensor, monitor: _Monitor) -> tuple[Tensor, Tensor]:
    """``||f(z) - z||_2`` and ``||f(z)||_2``, from ``diff = f(z) - z``."""
    # (naming the dtype that is already the state's costs a conversion check)
    widen = {} if fz.dtype == monitor.acc else {"dtype": monitor.acc}
    norm = torch.linalg.vector_norm
    return norm(diff, dim=monitor.dims, **widen), norm(fz, dim=monitor.dims, **widen)


def _contraction_bound(weights: Tensor, rate: Tensor, diff: Tensor, fz: Tensor, monitor: _Monitor):
    """``(q ||f(z) - z||_w + r) / (1 - q)`` (infinite where ``q >= 1``) and ``||f(z)||_w``.

    ``r``, a few ulps of ``||f(z)||_w`` (and as many of the smallest subnormal number per unit
    of weight, for float16's absolute rounding there), bounds the rounding of one application of ``f``: a
    solve stalled by rounding (``f(z) == z`` in floating point) still gets a nonzero bound. The
    bound can therefore never go below ``r / (1 - q)``: each sample's limit is at least twice
    that (:attr:`_Monitor.bound_floor`), and the relative limit is raised to twice its relative
    part with a warning (see :meth:`_Monitor.contraction_floor`). The absolute part matters
    where a sample's values approach float16's subnormal range (a gradient without loss scaling).
    """
    dims, acc = monitor.dims, monitor.acc
    step = (diff.abs() * weights).sum(dim=dims, dtype=acc)
    scale = (fz.abs() * weights).sum(dim=dims, dtype=acc)
    rate = rate.to(acc)
    if monitor.weight_mass is None:  # once per solve: the absolute rounding's weight
        monitor.weight_mass = weights.sum(dim=dims, dtype=acc)
    # (an exactly zero sample is computed exactly: no absolute term, so that it converges)
    rounding = GUARD_ULPS * (monitor.eps * scale + monitor.subnormal * monitor.weight_mass * (scale > 0))
    certifiable = rate < 1
    bound = torch.where(certifiable, (rate * step + rounding) / (1 - rate), math.inf)
    # (0 where q >= 1: the infinite bound over it stays infinite, never NaN)
    monitor.bound_floor = torch.where(certifiable, 2 * rounding / (1 - rate), 0.0)
    monitor.contraction_floor(rate)
    return bound, scale


def _raise_to_enclosure_floor(func, low: Tensor, monitor: _Monitor) -> bool:
    """Raise the enclosure's limit to its certifiable floor at the rate bound ``q`` taken at the
    lower sequence (below ``z*``, where it bounds the rate at ``z*``); whether it rose. Once per
    solve: two forward-mode products. An ``f`` without them keeps its limit."""
    if monitor.rate_floor is not None:
        return False
    try:
        rate = rate_certificate(func, low).rate
    except InvalidInputError:  # an operation in f without a forward-mode product
        monitor.rate_floor = math.inf
        return False
    before = monitor.rel_limit, monitor.floor
    monitor.enclosure_floor(rate)
    return (monitor.rel_limit, monitor.floor) != before


def _enclosure_bound(low: Tensor, high: Tensor, monitor: _Monitor) -> tuple[Tensor, Tensor]:
    """``max_i (high - low)_i / 2`` plus a rounding margin, and ``max_i high_i``.

    The midpoint is within half the gap of the fixed point. The margin (a few ulps of the
    largest entry, and as many of the smallest subnormal number) covers the rounding of the
    computed sequences.
    """
    top = high.amax(dim=monitor.dims).to(monitor.acc)
    gap = (high - low).amax(dim=monitor.dims).to(monitor.acc)
    return gap / 2 + GUARD_ULPS * (monitor.eps * top + monitor.subnormal * (top > 0)), top


# -- convergence checks --------------------------------------------------------------------------


class _Monitor:
    """Convergence checks of one solve.

    A check receives per-sample measures on the device (kept there for ``info``) and copies one
    number to the host, the worst measure relative to its limit, together with the guard's
    scalars: the only host sync of the check. The stopping decision and the schedule of the next
    check use those few numbers; the per-sample statistics are assembled when the solve ends.
    """

    def __init__(
        self,
        x0: Tensor,
        tol: float,
        stop_mode: str,
        check_every,
        certified: str | None,
        report_nonfinite: bool,
    ):
        self.tol, self.stop_mode, self.check_every, self.certified = tol, stop_mode, check_every, certified
        self.start = x0  # (read only when an iterate is not finite, to say whether it began so)
        self.x0 = x0 if report_nonfinite else None  # a diverged sample is reported, a bad start raised
        self.diverged: Tensor | None = None  # per sample, once a check saw NaN measures (growth)
        self.acc, self.tiny = dtype_constants(x0.dtype)
        # nonfinite="report": per sample, the state's norm beyond which it diverged (first check)
        self.growth_limit: Tensor | None = None
        self.arithmetic = arithmetic = arithmetic_dtype(x0)
        self.eps = torch.finfo(arithmetic).eps
        # Below the smallest normal number rounding is absolute: the certified margins add
        # GUARD_ULPS of the smallest subnormal (float16: 2^-24; negligible in wider dtypes).
        self.subnormal = torch.finfo(arithmetic).tiny * self.eps
        # The enclosure's directed rounding, relative per entry: above f's rounding (GUARD_ULPS),
        # and above the rounding of the multiplication that applies it. Not in half-precision
        # arithmetic, where 17 ulps a step (13% in bfloat16) would leave no bound: there the
        # enclosure's bound is an estimate (docs/guarantees.md).
        self.margin = (GUARD_ULPS + 1) * self.eps if arithmetic.itemsize >= 4 else 0.0
        # The certified measures include a rounding margin of GUARD_ULPS ulps, and the enclosure's
        # sequences stay its margin apart: no tolerance below these can be met.
        certified_floor = GUARD_ULPS * self.eps + (self.margin if certified == "enclosure" else 0.0)
        self.floor = resolution_floor(arithmetic) + (certified_floor if certified else 0.0)
        if stop_mode == "rel" and tol < self.floor:
            _warn_floor(arithmetic, stop_mode, tol, self.floor, autocast=arithmetic != x0.dtype)
        self.rel_limit = max(tol, self.floor)
        self.rate_floor: float | None = None
        self.weight_mass: Tensor | None = None  # the contraction bound's sum of weights
        # per sample, the least limit that a certified measure can meet (its rounding, doubled)
        self.bound_floor: Tensor | None = None
        self.dims = sample_dims(x0)
        self.steps: list[int] = []
        self.abs: list[Tensor] = []
        self.rel: list[Tensor] = []
        self.abs_limit: list[Tensor] = []
        self.worst: list[float] = []

    def contraction_floor(self, rate: Tensor) -> None:
        """Raise the relative limit to what a contraction by ``rate`` can certify, once per solve.

        With ``q`` close to 1 (a slow layer, or one in low precision), rounding alone
        keeps the certified bound above ``16 eps / (1 - q)`` relative to the state; the limit
        becomes twice that, ``32 eps / (1 - q)``, so that a converging solve can meet it.
        """
        if self.rate_floor is not None:
            return
        # samples with q >= 1 get an infinite bound anyway: the others set the floor
        worst = torch.where(rate < 1, rate, -math.inf).amax().item()
        self.rate_floor = 2 * GUARD_ULPS * self.eps / (1 - worst) if worst > -math.inf else math.inf
        # (with stop_mode="abs" each sample's limit already covers its rounding: bound_floor)
        if self.stop_mode == "rel" and self.rate_floor > self.rel_limit and math.isfinite(self.rate_floor):
            _warn_certifiable(worst, self.rel_limit, self.rate_floor, self.arithmetic)
            self.rel_limit = self.rate_floor
            self.floor = max(self.floor, self.rate_floor)

    def enclosure_floor(self, rate: Tensor) -> None:
        """Raise the limit to what the enclosure can certify at contraction ``rate``, once per solve.

        Each sequence can stop ``(f's rounding + margin) / (1 - q)`` from ``z*``, that is up to
        ``(16 + 17) eps / (1 - q)`` relative to the largest entry, and the bound adds 16 eps:
        with ``q`` close to 1 no tolerance below that can be met. Called when the bound stopped
        shrinking above the limit.
        """
        if self.rate_floor is not None:
            return
        worst = torch.where(rate < 1, rate, -math.inf).amax().item()
        if not worst > -math.inf:
            self.rate_floor = math.inf
            return
        step = GUARD_ULPS * self.eps + self.margin
        self.rate_floor = resolution_floor(self.arithmetic) + step / (1 - worst) + GUARD_ULPS * self.eps
        if self.stop_mode == "rel" and self.rate_floor > self.rel_limit:
            _warn_certifiable(worst, self.rel_limit, self.rate_floor, self.arithmetic)
            self.rel_limit = self.rate_floor
        self.floor = max(self.floor, self.rate_floor)  # (abs: each sample's limit follows its size)

    def first_check(self, max_iter: int) -> int:
        # From z0 = 0 the first relative residual is exactly 1: start checking at the second.
        return min(2 if self.check_every == "auto" else self.check_every, max_iter)

    def check(self, k: int, abs_res: Tensor, scale: Tensor, guard) -> tuple[bool, int]:
        """Record the measures of iteration ``k``; return (all converged, iterations to the next check).

        ``guard`` is ``None`` or ``(scalars, report)``: device scalars synced with the check,
        then passed to ``report`` on the host.
        """
        # NaN where the state's norm overflowed (a diverging iteration, whose step's norm may
        # still be finite): the measure must not read as 0, that is, as converged. (inf - inf is
        # NaN; an op between tensors costs about half of one with a Python number.)
        poison = scale - scale
        if self.x0 is not None:  # nonfinite="report": growth past 1/eps^2 diverges too
            if self.growth_limit is None:
                self.growth_limit = scale / torch.finfo(self.acc).eps ** 2
            else:
                poison = poison.masked_fill(scale > self.growth_limit, math.nan)
        rel_res = torch.addcdiv(poison, abs_res, scale.clamp_min(self.tiny))  # (0 for a zero sample)
        self.steps.append(k)
        self.abs.append(abs_res)
        self.rel.append(rel_res)
        if self.stop_mode == "rel" and self.bound_floor is None:
            measure = rel_res
        else:  # measures below what the dtype resolves count as converged whatever tol says
            if self.stop_mode == "rel":
                limit = scale * self.rel_limit
            else:
                limit = torch.clamp_min(scale * self.floor, self.tol)
            if self.bound_floor is not None:  # (clamped: 0 / 0 for an exactly zero sample)
                limit = torch.maximum(limit, self.bound_floor).clamp_min_(self.tiny)
            self.abs_limit.append(limit)
            measure = torch.addcdiv(poison, abs_res, limit)
        if self.diverged is not None:  # rare: samples that diverged no longer decide the stop
            measure = measure.masked_fill(self.diverged, -math.inf)
        worst = measure.amax()
        if guard is None:
            worst = worst.item()  # the one host sync of this check
        else:
            scalars, report = guard
            worst, *values = torch.stack([worst, *(s.to(self.acc) for s in scalars)]).tolist()
            report(values)
        if worst != worst:  # NaN: some iterate is not finite
            worst = self._nonfinite(k, measure)
        # the worst measure over its limit: <= 1 when every sample has converged
        self.worst.append(worst if self.abs_limit else worst / self.rel_limit)
        if self.worst[-1] <= 1.0:
            return True, 0
        if self.check_every != "auto":
            return False, self.check_every
        return False, self._auto_gap(k)

    def _nonfinite(self, k: int, measure: Tensor) -> float:
        """Raise, or flag the samples whose measure is NaN and return the worst of the others."""
        if self.x0 is None:
            if not bool(torch.isfinite(self.start).all()):
                raise NonFiniteError(_nonfinite_start_message(self.start))
            first = self.steps[-2] + 1 if len(self.steps) > 1 else 1  # (iterates since the last check)
            skipped = f"; the checks skip iterates: it may have arisen from iterate {first} on"
            since = "" if first == k else skipped
            raise NonFiniteError(
                f"Iterate {k} of the fixed-point solve holds NaN or Inf (or values so large that "
                f"their norm overflows){since}. f produced non-finite values: either the iterates grew "
                "without bound, which a bounded activation (tanh, relu6) rules out and an "
                "unbounded one (relu) allows once rows of W sum to 1 or more, or NaN reached f: "
                "check the weights and the injection for NaN (a diverged optimizer step, often "
                "from a too large learning rate) and the data for Inf."
            )
        lost = measure.isnan()
        if not bool(torch.isfinite(self.x0[lost]).all()):
            raise NonFiniteError(
                _nonfinite_start_message(self.x0) + " Their iterates were never finite, so they did "
                "not diverge."
            )
        self.diverged = lost if self.diverged is None else self.diverged | lost
        # Samples that diverged cannot come back: the others decide when the solve ends.
        return measure.masked_fill(self.diverged, -math.inf).amax().item()

    def _auto_gap(self, k: int) -> int:
        """Iterations until the worst measure is predicted to reach its limit.

        Assumes the geometric rate seen between the last two checks persists. The iteration
        count at most doubles between checks (it grows by half while the worst measure is not
        decreasing), so a long solve costs a logarithmic number of checks; on random instances
        this schedule overshoots the iterations needed by about 5% on average
        (benchmarks/results/solver_overhead_cpu.md).
        """
        if len(self.steps) < 2:
            return k
        now, before = self.worst[-1], self.worst[-2]
        if not (math.isfinite(now) and before > now > 0):
            return max(1, k // 2)
        need = (k - self.steps[-2]) * math.log(now) / math.log(before / now)
        return min(max(1, math.ceil(need)), k)

    def _warn_abs_floor(self, converged: Tensor, abs_lowest: Tensor) -> None:
        """Say (once per dtype and tolerance) that samples counted as converged at their rounding
        floor, above the absolute tolerance (one host sync per solve until it has been said)."""
        key = _floor_warning(self.arithmetic, "abs", self.tol)
        if warned_once(key):
            return
        raised = converged & (abs_lowest > self.tol)  # (met their floor, never tol)
        count = int(raised.sum())
        if not count:
            return
        worst = float(self.abs_limit[-1][raised].max())
        wider = "" if self.arithmetic == torch.float64 else ", or a wider dtype"
        warn_once(
            key,
            f"tol={self.tol:g} (abs) is below what {self.arithmetic} iterates can resolve in {count} "
            f"of {raised.numel()} samples, whose rounding floor (it grows with a sample's size) is up "
            f"to {worst:.3g}: they count as converged at that floor, with info['abs_lowest'] above "
            f"tol. For a tolerance that follows each sample's size, use the relative stop mode "
            f"('rel'){wider}.",
        )

    def stat(self, k: int, device: torch.device) -> SolverStat:
        """TorchDEQ's ``SolverStat`` plus ``converged``, ``trace_steps`` (and ``error_bound``).

        ``nstep`` is, per sample, the first checked iteration from which the sample stayed
        within tolerance to the end (the last iteration if it ended above).
        """
        n = len(self.steps)
        # (abs|rel, check, sample) in one op: a stack would first unsqueeze every measure
        history = torch.cat(self.abs + self.rel).view(2, n, -1)
        finite = history if self.diverged is None else history.nan_to_num(nan=math.inf, posinf=math.inf)
        abs_lowest, rel_lowest = finite.amin(dim=1)
        abs_trace, rel_trace = history.transpose(1, 2).contiguous()  # (sample, check) each
        if self.abs_limit:  # per-sample limits: abs stopping, or certified bounds
            ok = history[0] <= torch.cat(self.abs_limit).view(n, -1)
        else:
            ok = history[1] <= self.rel_limit
        # nstep: the check after the sample's last failed one (the first check if none failed);
        # a column of [first check, then the one after each check (k after the last)]
        marks = torch.tensor([[step] for step in (*self.steps, k)], dtype=history.dtype, device=device)
        entries = dict(
            abs_lowest=abs_lowest,
            rel_lowest=rel_lowest,
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            nstep=torch.where(ok, marks[:1], marks[1:]).amax(dim=0),
            sradius=torch.full((1,), -1.0, device=device),
            trace_steps=torch.tensor(self.steps, device=device),
            converged=ok[-1],
        )
        if self.certified:
            entries["error_bound"] = history[0, -1]
        if self.x0 is not None:  # nonfinite="report"
            if self.diverged is None:
                entries["diverged"] = torch.zeros(history.shape[-1], dtype=torch.bool, device=device)
            else:  # a flagged sample's later measures may be finite (an overflowed norm)
                entries["diverged"] = self.diverged
                entries["converged"] = entries["converged"] & ~self.diverged
        if self.stop_mode == "abs":
            self._warn_abs_floor(entries["converged"], abs_lowest)
        # SolverStat's constructor builds a default tensor per key; every key is given here.
        info = SolverStat.__new__(SolverStat)
        dict.__init__(info, entries)
        return info


def _nonfinite_start_message(x0: Tensor) -> str:
    bad = int((~torch.isfinite(x0)).flatten(1).any(1).sum())
    return (
        f"The initial state of the fixed-point solve holds NaN or Inf in {bad} of {x0.shape[0]} "
        "samples. Start from a finite state (zeros, for a pcDEQ layer)."
    )


# -- validation ----------------------------------------------------------------------------------


def _resolve_upper(upper, dtype: torch.dtype) -> float:
    value = upper() if callable(upper) else upper
    if value is None:
        raise InvalidInputError(
            "The enclosure starts its upper sequence at the activation's supremum, which is "
            "unknown here. Pass upper=<supremum> (e.g. 1.0 for tanh, sigmoid and softsign, 6.0 "
            "for relu6), or pcdeq_enclosure_upper in the pcdeq core's config."
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise InvalidInputError(
            f"The enclosure needs a finite positive upper bound (the activation's supremum), got "
            f"{value!r}. An activation without a finite supremum has no certified enclosure: use "
            "the plain solve."
        )
    if value * 2 > torch.finfo(dtype).max:  # (its margin and first step must stay finite)
        raise InvalidInputError(
            f"The enclosure's upper start {value:g} is beyond what the state's dtype {dtype} holds "
            f"(up to {torch.finfo(dtype).max:.3g}, and half of it for the sequence's margin). Start "
            "at the activation's supremum (1.0 for tanh, sigmoid and softsign, 6.0 for relu6)."
        )
    return float(value)


def _check_upper_start(start: float, high: Tensor, high_next: Tensor, read_from_layers: bool) -> None:
    """The enclosure's premise, checked whatever the guard: ``f(u) <= u`` at the upper start ``u``.

    For a monotone ``f`` it makes the upper sequence fall to ``z*`` and so stay above it; an
    upper start below ``z*`` somewhere would make the sequence rise, and the certified bound,
    the gap between the two sequences, would be no bound at all. ``high`` is the start as the
    sequence holds it (``start`` moved up by the directed margin, in float32 and wider) and
    ``high_next`` the first step, moved up alike. A start given as a number is checked exactly:
    under the margin, ``high_next <= high`` means that ``f(u) <= u`` for the exact ``f`` too,
    and a start just below ``z*``, whose computed ``f(u)`` can round below ``u``, fails it. A
    saturated entry, mapped to the supremum itself, passes exactly. A start read from the
    layers (a callable ``upper``: the pcdeq core's default) is their activations' supremum,
    above ``z*`` whatever ``f`` rounds to, and a registered activation may compute an ulp above
    it: rounding up to the margins' ulps is allowed there. One host sync per solve. A NaN in
    ``f(u)`` makes the excess NaN, which passes here: the convergence check raises
    :class:`NonFiniteError`.
    """
    excess = (high_next - high).amax().item()
    allowed = GUARD_ULPS * torch.finfo(arithmetic_dtype(high_next)).eps * start if read_from_layers else 0.0
    if excess > allowed:
        cause = (
            "Here f is not a pcDEQ layer call: its output exceeds the supremum of the activations it calls"
            if read_from_layers
            else "If upper is the activation's supremum, either f is not a pcDEQ layer call or the "
            "activation computes above its supremum (a registered one can, by an ulp): then start a "
            "few ulps above it"
        )
        raise InvalidInputError(
            f"The enclosure's upper start {start:.6g} is not an upper bound of the fixed point: "
            f"f(upper) exceeds it by up to {excess:.3g}, so the upper sequence would rise and the "
            "certified bound would not hold. Start at the activation's supremum (1.0 for tanh, "
            "sigmoid and softsign, 6.0 for relu6), which is always valid: the pcdeq core takes it "
            f"from f's layers when pcdeq_enclosure_upper is unset. {cause}."
        )


def _floor_warning(dtype: torch.dtype, stop_mode: str, tol: float) -> tuple:
    """The once-per-process key of a tolerance below the rounding floor (both kinds of warning)."""
    return ("tolerance below the rounding floor", dtype, stop_mode, tol)


def _warn_floor(dtype: torch.dtype, stop_mode: str, tol: float, floor: float, autocast: bool = False) -> None:
    # Under autocast the solve is judged by autocast's dtype, which it cannot see f turn off inside.
    remedy = (
        "Solve outside autocast for a finer tolerance (an f that turns autocast off inside is "
        "judged by autocast's dtype all the same: call the core outside it)."
        if autocast
        else "Use a wider dtype for a finer tolerance."
    )
    what = f"{dtype} arithmetic under autocast" if autocast else f"{dtype} iterates"
    warn_once(
        _floor_warning(dtype, stop_mode, tol),
        f"tol={tol:g} ({stop_mode}) is below what {what} can resolve; residuals under {floor:.3g} "
        f"count as converged. {remedy}",
    )


def _warn_certifiable(rate: float, tol: float, floor: float, dtype: torch.dtype) -> None:
    # Said once per order of magnitude of 1 - q: up to q = 0.68 (1 / (1 - q) < 3.2) the
    # dtype's resolution, not q, sets the floor.
    magnitude = round(math.log10(max(1 - rate, 1e-300)))
    widest = dtype == torch.float64
    if magnitude < 0:
        cause = "q close to 1 sets this floor (q approaches 1 on slow layers, whose spectral radius does)"
        cause += "." if widest else "; a wider dtype rounds less."
    else:
        cause = "The dtype's resolution sets this floor"
        cause += "." if widest else ": certify in a wider dtype for a finer tolerance."
    warn_once(
        ("certified floor", dtype, magnitude),
        f"The certified bound cannot go below {floor:.3g} (relative) in {dtype} arithmetic, where "
        f"each step rounds by up to {GUARD_ULPS:g} ulps (eps {torch.finfo(dtype).eps:.3g}) and "
        f"the bound counts that 1 / (1 - q) times, with the contraction factor q = {rate:.6g}. "
        f"The tolerance {tol:g} is raised to it. {cause}",
    )


def _check_output(fz, z: Tensor) -> None:
    if not isinstance(fz, Tensor) or fz.shape != z.shape:
        got = f"shape {tuple(fz.shape)}" if isinstance(fz, Tensor) else type(fz).__name__
        raise InvalidInputError(
            f"func must map a state of shape {tuple(z.shape)} to the same shape, got {got}. A "
            "fixed point needs f: R^n -> R^n; check the layer's output and the initial state."
        )
    if fz.dtype != z.dtype or fz.device != z.device:
        raise InvalidInputError(
            f"func must keep the state's dtype and device ({z.dtype} on {z.device}), got "
            f"{fz.dtype} on {fz.device}. Cast inside f, or start from a state of the dtype f returns."
        )


def _validated(func, x0, max_iter, tol, stop_mode, check_every, guard, tau, indexing):
    """``(max_iter, tol, check_every, indexing)`` as Python numbers (whole numbers, such as NumPy
    integers or a config's ``50.0``, are accepted as the core accepts them); a typed error for
    anything invalid."""
    if not callable(func):
        raise InvalidInputError(
            f"pcdeq_fixed_point expects func, the map to iterate, as a callable z -> f(z), got "
            f"{type(func).__name__}."
        )
    if not isinstance(x0, Tensor):
        raise InvalidInputError(
            f"pcdeq_fixed_point expects the initial state as one tensor, got {type(x0).__name__}. "
            "For several states (MDEQ's lists), flatten each from dim 1 and concatenate them into "
            "one (batch, N) tensor, as the pcdeq core does when it is given a list."
        )
    if x0.dim() < 2:
        raise InvalidInputError(
            f"pcdeq_fixed_point expects a state of shape (batch, ...) with the batch dimension "
            f"first, got shape {tuple(x0.shape)}. Add a batch dimension with z.unsqueeze(0)."
        )
    if not x0.is_floating_point():
        raise InvalidInputError(f"pcdeq_fixed_point expects a floating-point state, got {x0.dtype}.")
    if x0.numel() == 0:
        raise InvalidInputError(
            f"pcdeq_fixed_point got an empty state of shape {tuple(x0.shape)}; expected at least "
            "one sample with at least one entry."
        )
    iterations, tol = positive_int("max_iter", max_iter), positive_float("tol", tol)
    check_choice("stop_mode", stop_mode, STOP_MODES)
    check_choice("guard mode", guard, GUARD_MODES)
    every = check_every if check_every == "auto" else as_integer(check_every)
    if every is None or (every != "auto" and every < 1):
        raise InvalidInputError(f"check_every must be 'auto' or an integer >= 1, got {check_every!r}.")
    try:
        entries = [] if indexing is None else list(indexing)  # (a NumPy array has no truth value)
    except TypeError:
        raise InvalidInputError(
            f"indexing must be a sequence of iterations (ints >= 1), got {indexing!r}; for one "
            f"iteration pass [{indexing!r}]."
        ) from None
    steps = [as_integer(i) for i in entries]
    bad = [i for i, step in zip(entries, steps) if step is None or step < 1]
    if bad:
        raise InvalidInputError(
            f"indexing holds iterations that no solve reaches: {bad}. Each entry is an iteration "
            "(an int >= 1) whose state is returned; the initial state is not an iterate."
        )
    if tau != 1.0:
        raise InvalidInputError(
            f"pcdeq_fixed_point is undamped (tau=1.0); got tau={tau!r}. Plain iteration already "
            "converges for pcDEQ: drop tau."
        )
    return iterations, tol, every, None if indexing is None else steps


def _validate_certificates(x0, enclosure, upper, weights, rate) -> None:
    if (weights is None) != (rate is None):
        raise InvalidInputError(
            "weights and rate go together (the weighted l1 norm and the contraction factor in "
            f"it); got weights={'a tensor' if weights is not None else None}, "
            f"rate={'a tensor' if rate is not None else None}."
        )
    if enclosure and weights is not None:
        raise InvalidInputError("Choose one certificate: enclosure=True or weights/rate, not both.")
    if upper is not None and not enclosure:
        raise InvalidInputError("upper is the enclosure's starting bound; pass enclosure=True with it.")
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != x0.shape:
            raise InvalidInputError(
                f"weights must be a tensor of the state's shape {tuple(x0.shape)}, got "
                f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}."
            )
        if not isinstance(rate, Tensor) or rate.shape != (x0.shape[0],):
            raise InvalidInputError(
                f"rate must be a tensor of shape ({x0.shape[0]},), one factor per sample, got "
                f"{tuple(rate.shape) if isinstance(rate, Tensor) else type(rate).__name__}."
            )
        if weights.device != x0.device or rate.device != x0.device:
            raise InvalidInputError(
                f"weights and rate must be on the state's device ({x0.device}), got {weights.device} "
                f"and {rate.device}. Move them with .to(x0.device)."
            )
        with torch.no_grad():  # (one host sync per certified solve)
            w_low, w_high, q_low, q_high = torch.stack([*extremes(weights), *extremes(rate)]).tolist()
        if not (w_low > 0 and w_high < math.inf):
            raise InvalidInputError(
                f"weights must be positive and finite (the weighted norm of the contraction), got "
                f"entries from {w_low:.3g} to {w_high:.3g}. Take them from rate_certificate(f, z), "
                "whose v is positive."
            )
        if not (q_low >= 0 and q_high == q_high):  # (q >= 1, inf included, certifies nothing: allowed)
            raise InvalidInputError(
                f"rate must hold one contraction factor q >= 0 per sample (NaN not allowed), got "
                f"values from {q_low:.3g} to {q_high:.3g}. Take it from rate_certificate(f, z)."
            )

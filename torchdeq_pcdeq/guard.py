"""The runtime guard: what a positive-monotone map guarantees about its iterates, checked.

A pcDEQ layer is positive (it maps ``z >= 0`` to ``f(z) >= 0``) and monotone (``z <= z'``
gives ``f(z) <= f(z')``). Its iterates from ``0`` therefore rise, the enclosure's sequence from
an upper bound falls, the two never cross, and, the map being concave, they meet at the one
fixed point. A map that breaks one of these (a negative weight, a normalization layer inside
``f``, a non-concave activation) is not a pcDEQ map and its solve has none of the guarantees:
:class:`Guard` checks them at each convergence check of ``pcdeq_fixed_point`` (``guard=``,
the core's ``pcdeq_guard``) and raises :class:`~torchdeq_pcdeq.errors.NotPositiveMonotoneError`
or :class:`~torchdeq_pcdeq.errors.NonUniqueFixedPointError`, or warns, with the likely cause.
Its scalars travel to the host with the check's own, so the guard adds no host sync.

Example (a negative weight makes the iterates from 0 fall):
    >>> import torch
    >>> from torchdeq_pcdeq import pcdeq_fixed_point
    >>> from torchdeq_pcdeq.errors import NotPositiveMonotoneError
    >>> W = torch.tensor([[0.0, -0.5], [0.0, 0.0]])
    >>> x = torch.tensor([[0.5, 1.0]])
    >>> try:
    ...     _ = pcdeq_fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), guard="raise")
    ... except NotPositiveMonotoneError as error:
    ...     print(str(error)[:70])
    pcDEQ guard: the iteration started from 0 but iterate 2 is below itera
"""

from __future__ import annotations

import torch
from torch import Tensor

from .certify import rate_certificate
from .conv_kernels import winograd_products
from .errors import InvalidInputError, NonUniqueFixedPointError, NotPositiveMonotoneError, warn, warn_once
from .reductions import extremes
from .rounding import GUARD_ULPS, arithmetic_dtype

__all__ = ["Guard", "Rejudge"]


class Rejudge(Exception):
    """The guard failed a solve that made Winograd products: solve again with sign-exact ones."""


class Guard:
    """What a positive-monotone map guarantees about its iterates, checked at each check.

    Each method returns ``None`` (guard off) or ``(device scalars, report)`` for
    the solver's ``_Monitor.check``, which syncs the scalars with its own and calls ``report``.
    """

    def __init__(self, mode: str, x0: Tensor, rejudge: bool = False):
        self.mode, self.x0 = mode, x0
        # With rejudge, a failure in a solve that made Winograd products raises Rejudge instead.
        self.winograd_at_start = winograd_products() if rejudge else None
        self.slack = GUARD_ULPS * torch.finfo(arithmetic_dtype(x0)).eps
        self.from_zero: bool | None = None
        self.previous_gap: Tensor | None = None
        self.rounding_stalled: Tensor | None = None  # per sample: the gap stalled within rounding

    def plain(self, k: int, diff: Tensor, fz: Tensor):
        if self.mode == "off":
            return None
        low, high = extremes(fz)
        scalars = [low, high, diff.amin()]
        if self.from_zero is None:
            scalars.extend(extremes(self.x0.detach()))

        def report(values: list[float]) -> None:
            low, high, drop = values[:3]
            if self.from_zero is None:
                self.from_zero = values[3] == values[4] == 0
            if low < 0:
                self._fail(NotPositiveMonotoneError, negative_message(k, fz))
            elif self.from_zero and drop < -self.slack * high:
                self._fail(NotPositiveMonotoneError, decrease_message(k, diff))

        return scalars, report

    def recheck(self, k: int, diff: Tensor, fz: Tensor) -> None:
        """Check again at once, with its own host sync (the solver's rare paths)."""
        scalars, report = self.plain(k, diff, fz)
        report([s.item() for s in scalars])

    def enclosure(
        self, k: int, low: Tensor, high: Tensor, low_next: Tensor, high_next: Tensor, monitor, func
    ):
        if self.mode == "off":
            return None
        dims = monitor.dims
        top = high_next.amax(dim=dims)
        gap = (high_next - low_next).amax(dim=dims)
        # Settled apart: the gap, which shrinks at every iteration while the two sequences head for
        # one fixed point (however slowly), did not shrink at all since the previous check, and
        # is still well above what the tolerance asks.
        previous, self.previous_gap = self.previous_gap, gap
        settled = gap > 8 * monitor.rel_limit * top
        if previous is None:
            settled = torch.zeros_like(settled)
        else:
            settled = settled & (gap >= previous)
            if self.rounding_stalled is not None:  # rare: already judged, and explained
                settled = settled & ~self.rounding_stalled
        scalars = [
            low_next.amin(),
            (low_next - low).amin(),
            (high_next - high).amax(),
            (high_next - low_next).amin(),
            high_next.amax(),
            torch.where(settled, gap, 0.0).amax(),
        ]

        def report(values: list[float]) -> None:
            low_min, rise, fall, crossing, scale, stuck_gap = values
            slack = self.slack * scale
            if low_min < 0:
                self._fail(NotPositiveMonotoneError, negative_message(k, low_next))
            elif rise < -slack or fall > slack or crossing < -slack:
                self._fail(NotPositiveMonotoneError, enclosure_message(k, rise, fall, crossing))
            elif stuck_gap > 0:
                # A gap can also round to the same value while the lower sequence still rises
                # from a tiny injection by less than half an ulp of the gap: only samples whose
                # sequences stopped moving (each entry within rounding of itself) settled.
                still = self._still_moving(low, high, low_next, high_next)
                stuck_gap = self._beyond_rounding(func, low_next, gap, top, settled & ~still, monitor)
                if stuck_gap > 0:
                    self._fail(NonUniqueFixedPointError, non_unique_message(k, stuck_gap))

        return scalars, report

    def _still_moving(self, low: Tensor, high: Tensor, low_next: Tensor, high_next: Tensor) -> Tensor:
        """Per sample: an entry of either sequence moved by more than rounding of itself."""
        rising = (low_next - low) > self.slack * low_next
        falling = (high - high_next) > self.slack * high_next
        return (rising | falling).flatten(1).any(dim=1)

    def _beyond_rounding(
        self, func, low: Tensor, gap: Tensor, top: Tensor, settled: Tensor, monitor
    ) -> float:
        """The largest settled gap that rounding cannot explain (0 if none); the rare path.

        Each computed iterate carries a rounding error of a few ulps of ``top``, and the directed
        margin moves it outward by as many more; near the fixed point a step gains only
        ``(1 - q)`` of the remaining distance (``q`` bounds the contraction there), so in floating
        point each sequence stops moving up to about ``(rounding + margin) / (1 - q)`` away from
        ``z*``: with ``q`` near 1 (a slow but valid pcDEQ) their gap stalls apart. Two fixed
        points (a non-concave activation) leave a gap beyond that. ``q``
        is taken at the lower sequence, below ``z*``, where a concave map's Jacobian dominates
        the one at ``z*``, with ``v = low`` (no power step). That ``q``, the looser one, errs on
        the side of rounding: a stall it does not explain raises, so a wrong verdict there
        stops a valid model, while the gap it does explain is at most twice that distance.
        """
        try:
            q = rate_certificate(func, low, power_step=False).rate  # (inference mode too)
        except InvalidInputError:  # an operation in f without a forward-mode product
            # Without q a slow layer's rounding stall cannot be told from two fixed points: no
            # verdict (a false one would stop a valid model); the samples end unconverged.
            warn_no_verdict(
                "q cannot be computed here: it needs a forward-mode product, which an operation in f "
                "does not support"
            )
            explained = settled
        else:
            # q >= 1 (or NaN) bounds nothing: such a gap is not explained by rounding
            # Each sequence can stop up to (f's rounding + the directed margin) / (1 - q) from z*.
            reach = 2 * (self.slack + monitor.margin) * top / (1 - q.to(gap.dtype))
            explained = settled & (q < 1) & (gap <= reach)
            if q.dtype.itemsize < 4 and bool((settled & ~(q < 1)).any()):
                # A half-precision q keeps three digits: a valid layer's 0.999 rounds to 1. No
                # verdict for those samples (a false one would stop a valid model).
                warn_no_verdict(f"q, computed in {q.dtype}, rounds to 1 or more, which bounds nothing")
                explained = explained | (settled & ~(q < 1))
        stalled = self.rounding_stalled
        self.rounding_stalled = explained if stalled is None else stalled | explained
        beyond = settled & ~explained
        return torch.where(beyond, gap, 0.0).amax().item()

    def _fail(self, error: type[Exception], message: str) -> None:
        if self.winograd_at_start is not None and winograd_products() != self.winograd_at_start:
            raise Rejudge
        message += " Set pcdeq_guard='warn' or 'off' to continue anyway, without the guarantees."
        mode, self.mode = self.mode, "off"  # report once per solve
        if mode == "raise":
            raise error(message)
        warn(message)


def negative_message(k: int, fz: Tensor) -> str:
    return (
        f"pcDEQ guard: iterate {k} has {int((fz < 0).sum())} negative entries (min "
        f"{fz.min().item():.3g}); a positive map never produces them. Likely causes: a negative "
        "or non-admissible injection (compute it with layer.inject(u), or in a plain f as "
        "softplus(u, beta=5) + 1e-6 for tanh, softsign and relu6), a negative weight (use "
        "the pcDEQ layers or --norm_type pcdeq_nonneg), a bias or a normalization layer "
        "(BatchNorm, GroupNorm, LayerNorm) inside f, whose outputs can be negative (move them "
        "into the injection), an activation that is negative on [0, inf), or a negative "
        "initial state."
    )


def decrease_message(k: int, diff: Tensor) -> str:
    return (
        f"pcDEQ guard: the iteration started from 0 but iterate {k} is below iterate {k - 1} in "
        f"{int((diff < 0).sum())} entries (by up to {-diff.min().item():.3g}); a monotone map "
        "gives nondecreasing iterates from 0. Likely causes: a negative weight (use the pcDEQ "
        "layers or --norm_type pcdeq_nonneg), a normalization layer inside f (BatchNorm, "
        "GroupNorm, LayerNorm are not monotone: move them into the injection), or an activation "
        "that decreases somewhere on [0, inf)."
    )


def enclosure_message(k: int, rise: float, fall: float, crossing: float) -> str:
    found = []
    if rise < 0:
        found.append(f"the lower sequence fell by {-rise:.3g}")
    if fall > 0:
        found.append(f"the upper sequence rose by {fall:.3g}")
    if crossing < 0:
        found.append(f"the lower sequence passed the upper one by {-crossing:.3g}")
    return (
        f"pcDEQ guard: at iteration {k} of the enclosure {', '.join(found)}; for a monotone map "
        "the sequence from 0 rises and the one from the upper bound falls. Likely causes: a "
        "negative weight (use the pcDEQ layers or --norm_type pcdeq_nonneg), an activation that "
        "decreases somewhere on [0, inf), or an upper bound below the activation's supremum."
    )


def non_unique_message(k: int, gap: float) -> str:
    return (
        f"pcDEQ guard: at iteration {k} the gap between the enclosure's lower and upper sequences "
        f"({gap:.3g}) has stopped shrinking: they reached two different fixed points, which a "
        "positive concave map cannot have. Likely cause: an activation that is not concave on "
        "[0, inf) (register activations with torchdeq_pcdeq.register_activation, which checks)."
    )


def warn_no_verdict(why: str) -> None:
    warn_once(
        ("guard without a verdict", why),
        "pcDEQ guard: the gap between the enclosure's two sequences stopped shrinking while still "
        "above the tolerance. That is a slow layer's rounding stall or two fixed points (a "
        f"non-concave activation), which the rate bound q tells apart, and {why}. The "
        "guard gives no verdict; samples whose gap stays open end unconverged.",
    )

"""Activations admissible in a pcDEQ layer, and their registry.

A pcDEQ activation ``sigma`` must be nonnegative, nondecreasing and concave on ``[0, inf)``
(docs/method.md, section 1). Each one is described by an :class:`Activation` record that also
carries what the rest of the package needs to know about it:

* ``value_at_zero``: ``sigma(0)``. It decides the variant: pcDEQ-1 (``sigma(0) = 0``) needs a
  strictly positive injection, pcDEQ-2 (``sigma(0) > 0``) a nonnegative one.
* ``supremum``: ``sup sigma`` on ``[0, inf)``, the starting point of the decreasing iteration
  and of the certified enclosure (``math.inf`` when unbounded).
* ``slope``: ``sigma'`` as a function of ``sigma``'s value, for the built-ins. It lets the pcdeq
  core differentiate a solve in closed form; activations without it (user-registered ones,
  which may hold parameters or compute in place) get the recorded implicit gradient.

Example:
    >>> import torch
    >>> from torchdeq_pcdeq import get_activation, register_activation, unregister_activation
    >>> get_activation("tanh").variant
    1
    >>> record = register_activation("expsat", lambda x: 1 - torch.exp(-x), supremum=1.0)
    >>> (record.value_at_zero, record.variant)
    (0.0, 1)
    >>> unregister_activation("expsat")  # the registry is the process's
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ActivationCheckError, InvalidInputError, UnknownNameError, quote_all

__all__ = [
    "Activation",
    "register_activation",
    "unregister_activation",
    "get_activation",
    "available_activations",
]

# The numerical admissibility check samples [0, CHECK_RANGE] on CHECK_POINTS points in float64.
CHECK_RANGE = 100.0
CHECK_POINTS = 20_001


@dataclass(frozen=True)
class Activation:
    """A pcDEQ activation record.

    Attributes:
        name: registry key.
        function: elementwise map ``Tensor -> Tensor``.
        value_at_zero: ``function(0)``.
        supremum: ``sup function`` on ``[0, inf)``; ``math.inf`` when unbounded.
        variant: 1 when ``value_at_zero == 0`` (needs a strictly positive injection),
            2 when ``value_at_zero > 0`` (a nonnegative injection suffices).
        slope: ``s -> sigma'(u)`` for ``s = sigma(u)``, elementwise, or ``None``: what the
            closed-form gradient reads, as autograd does.
        derivative: ``u -> sigma'(u)``, elementwise, or ``None``: what the certificates read.
            Where ``sigma`` saturates the slope from the output keeps no digits (``1 - s^2``
            is 0 once ``tanh(u)`` rounds to 1, for ``u > 9`` in float32) while the derivative
            from ``u`` stays within a few ulps.

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import get_activation
        >>> get_activation("sigmoid")(torch.zeros(1))
        tensor([0.5000])
    """

    name: str
    function: Callable[[Tensor], Tensor] = field(repr=False)
    value_at_zero: float
    supremum: float
    variant: int
    slope: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)
    derivative: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)

    def __call__(self, x: Tensor) -> Tensor:
        return self.function(x)

    @property
    def bounded(self) -> bool:
        """Whether the supremum is finite (the fixed point then always exists)."""
        return math.isfinite(self.supremum)


def _relu6(x: Tensor) -> Tensor:
    return F.relu6(x)


# Derivatives from the output, as autograd computes them (module-level: records are pickled).
def _tanh_slope(s: Tensor) -> Tensor:
    return 1 - s * s


def _softsign_slope(s: Tensor) -> Tensor:
    return (1 - s.abs()).square()  # 1 / (1 + |u|)^2 with |s| = |u| / (1 + |u|)


def _relu6_slope(s: Tensor) -> Tensor:
    return ((s > 0) & (s < 6)).to(s.dtype)  # 1 strictly inside (0, 6), like relu6's backward


def _sigmoid_slope(s: Tensor) -> Tensor:
    return s * (1 - s)


# Derivatives from the pre-activation, each within 2.4 ulps of float64's over [-1, 100] in
# float32 where normal (the slopes above lose every digit where the output rounds to its limit).
def _tanh_derivative(u: Tensor) -> Tensor:
    return torch.cosh(u).reciprocal().square()  # (cosh overflows where sech^2 underflows anyway)


def _softsign_derivative(u: Tensor) -> Tensor:
    return (1 + u.abs()).reciprocal().square()


def _relu6_derivative(u: Tensor) -> Tensor:
    return ((u > 0) & (u < 6)).to(u.dtype)


def _sigmoid_derivative(u: Tensor) -> Tensor:
    return torch.sigmoid(u) * torch.sigmoid(-u)


_BUILTINS = {
    "tanh": Activation("tanh", torch.tanh, 0.0, 1.0, 1, _tanh_slope, _tanh_derivative),
    "softsign": Activation("softsign", F.softsign, 0.0, 1.0, 1, _softsign_slope, _softsign_derivative),
    "relu6": Activation("relu6", _relu6, 0.0, 6.0, 1, _relu6_slope, _relu6_derivative),
    "sigmoid": Activation("sigmoid", torch.sigmoid, 0.5, 1.0, 2, _sigmoid_slope, _sigmoid_derivative),
}
_REGISTRY: dict[str, Activation] = dict(_BUILTINS)


def available_activations() -> list[str]:
    """Names of the registered activations, sorted.

    Example:
        >>> from torchdeq_pcdeq import available_activations
        >>> available_activations()
        ['relu6', 'sigmoid', 'softsign', 'tanh']
    """
    return sorted(_REGISTRY)


def get_activation(name: str | Activation) -> Activation:
    """Return the registered record for ``name`` (a record passes through unchanged).

    Raises:
        UnknownNameError: ``name`` is not registered; the message lists the valid names.
        InvalidInputError: ``name`` is neither a string nor an :class:`Activation`.

    Example:
        >>> from torchdeq_pcdeq import get_activation
        >>> get_activation("sigmoid")  # pcDEQ-2: positive at 0
        Activation(name='sigmoid', value_at_zero=0.5, supremum=1.0, variant=2)
        >>> get_activation("tahn")
        Traceback (most recent call last):
        ...
        torchdeq_pcdeq.errors.UnknownNameError: Unknown activation 'tahn'. ...
    """
    if isinstance(name, Activation):
        return name
    _check_is_name(name)
    if name not in _REGISTRY:
        raise UnknownNameError("activation", name, _REGISTRY)
    return _REGISTRY[name]


def register_activation(
    name: str,
    function: Callable[[Tensor], Tensor],
    *,
    supremum: float,
    overwrite: bool = False,
) -> Activation:
    """Check ``function`` numerically and register it under ``name``.

    The check samples ``[0, 100]`` on a fine float64 grid and requires the function to be
    finite, nonnegative, nondecreasing, concave and not above ``supremum``. It is a necessary
    check, not a proof: a function that passes it is still the caller's responsibility.

    Args:
        name: registry key (not one of the built-ins).
        function: elementwise map; must accept float64 tensors.
        supremum: ``sup function`` on ``[0, inf)``; pass ``math.inf`` when unbounded (the
            fixed point then exists only when the spectral radius of ``W`` is below 1, and the
            certified enclosure is unavailable).
        overwrite: replace an existing user registration of the same name.

    Returns:
        The new :class:`Activation` record.

    Raises:
        ActivationCheckError: which property failed and at which ``x``.
        InvalidInputError: ``name`` is taken (or is a built-in), or ``supremum`` is not positive.

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import register_activation
        >>> register_activation("bad", torch.sin, supremum=1.0)
        Traceback (most recent call last):
        ...
        torchdeq_pcdeq.errors.ActivationCheckError: Activation 'bad' is not nonnegative on [0, 100]: ...
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"Activation name must be a non-empty string, got {name!r}.")
    if name in _BUILTINS:
        raise InvalidInputError(
            f"Activation name {name!r} is a built-in and cannot be replaced. Choose another name."
        )
    if name in _REGISTRY and not overwrite:
        raise InvalidInputError(
            f"Activation {name!r} is already registered. Pass overwrite=True to replace it, or "
            "choose another name."
        )
    if not (isinstance(supremum, (int, float)) and supremum > 0):
        raise InvalidInputError(
            f"supremum must be a positive number (math.inf when unbounded), got {supremum!r}."
        )
    value_at_zero = check_activation(name, function, float(supremum))
    record = Activation(name, function, value_at_zero, float(supremum), 1 if value_at_zero == 0 else 2)
    _REGISTRY[name] = record
    return record


def unregister_activation(name: str) -> None:
    """Remove a user-registered activation (built-ins cannot be removed).

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import available_activations, register_activation, unregister_activation
        >>> _ = register_activation("atan", torch.atan, supremum=torch.pi / 2)
        >>> "atan" in available_activations()
        True
        >>> unregister_activation("atan")
        >>> "atan" in available_activations()
        False
    """
    _check_is_name(name)
    if name in _BUILTINS:
        raise InvalidInputError(f"Activation {name!r} is a built-in and cannot be removed.")
    if name not in _REGISTRY:
        raise UnknownNameError("activation", name, _REGISTRY)
    del _REGISTRY[name]


def _check_is_name(name: object) -> None:
    if not isinstance(name, str):  # (a list or dict would fail the registry lookup with a TypeError)
        raise InvalidInputError(
            f"An activation is given by its registered name (a str, e.g. 'tanh') or its Activation "
            f"record, got {type(name).__name__} {name!r}. Valid names: {quote_all(sorted(_REGISTRY))}."
        )


def check_activation(name: str, function: Callable[[Tensor], Tensor], supremum: float) -> float:
    """Numerically verify the pcDEQ requirements on a grid of ``[0, 100]``.

    Returns:
        ``function(0)`` as a float.

    Raises:
        ActivationCheckError: naming the first property that fails and where.
    """
    x = torch.linspace(0.0, CHECK_RANGE, CHECK_POINTS, dtype=torch.float64)
    try:
        y = function(x)
    except Exception as exc:
        raise ActivationCheckError(
            f"Activation {name!r} failed on a float64 tensor: {exc!r}. It must be an elementwise "
            "torch function accepting float64."
        ) from exc
    if not isinstance(y, Tensor) or y.shape != x.shape:
        raise ActivationCheckError(
            f"Activation {name!r} must map a tensor to a tensor of the same shape, got "
            f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))} for input shape {tuple(x.shape)}."
        )
    y = y.to(torch.float64)

    def fail(prop: str, where: str) -> ActivationCheckError:
        return ActivationCheckError(
            f"Activation {name!r} is not {prop} on [0, {CHECK_RANGE:g}]: {where}. A pcDEQ "
            "activation must be nonnegative, nondecreasing and concave on [0, inf)."
        )

    finite = torch.isfinite(y)
    if not finite.all():
        i = _first(~finite)
        raise fail("finite", f"it is {y[i].item()} at x={x[i].item():.5g}")
    # Rounding noise of a correct float64 implementation stays far below this slack.
    slack = 1e-10 * max(1.0, y.abs().max().item())
    if y.min() < -slack:
        i = _first(y < -slack)
        raise fail("nonnegative", f"it is {y[i].item():.3g} at x={x[i].item():.5g}")
    step = y[1:] - y[:-1]
    if step.min() < -slack:
        i = _first(step < -slack)
        raise fail(
            "nondecreasing",
            f"it decreases by {-step[i].item():.3g} between x={x[i].item():.5g} and x={x[i + 1].item():.5g}",
        )
    curvature = step[1:] - step[:-1]
    if curvature.max() > slack:
        i = _first(curvature > slack) + 1
        raise fail(
            "concave",
            f"its slope increases by {curvature[i - 1].item():.3g} around x={x[i].item():.5g}",
        )
    if y.max() > supremum + slack:
        i = _first(y > supremum + slack)
        raise fail(
            f"bounded by the declared supremum {supremum:g}",
            f"it reaches {y[i].item():.6g} at x={x[i].item():.5g}; declare a larger supremum",
        )
    # f(0) within rounding of 0 is 0: the activation is pcDEQ-1 and needs positive injections.
    return 0.0 if abs(y[0].item()) <= slack else float(y[0].item())


def _first(mask: Tensor) -> int:
    """Index of the first True entry (the failure closest to 0 is the most telling)."""
    return int(mask.nonzero()[0])

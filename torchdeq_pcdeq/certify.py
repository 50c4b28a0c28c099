"""Run-time certificates of a pcDEQ solve: the Jacobian rate bound and the layer reports.

* :func:`rate_bound`: for ``f`` with a nonnegative Jacobian ``J`` at a positive state ``z``,
  ``q = max_i (J z)_i / z_i`` bounds the spectral radius of ``J`` (Collatz-Wielandt), hence the
  local rate of the forward iteration and of the adjoint iteration ``y = J^T y + g``, which
  contracts by ``q`` in the ``z``-weighted l1 norm (docs/method.md, section 3). One forward-mode
  Jacobian-vector product; ``q < 1`` for a valid pcDEQ.
* :func:`upper_bound` and :func:`min_injection` read what the pcDEQ layers called by ``f``
  reported (:func:`~torchdeq_pcdeq.layers.observe_layer_calls`): the activation's supremum,
  where the enclosure's upper sequence starts, and the smallest injection per sample, the
  positivity margin of the pcDEQ-1 guarantee.

Example:
    >>> import torch
    >>> from torchdeq_pcdeq import PcDEQLinear
    >>> from torchdeq_pcdeq.certify import rate_bound
    >>> f = PcDEQLinear(6, "sigmoid")
    >>> x = f.inject(torch.randn(2, 6))
    >>> z = torch.full((2, 6), 0.5)
    >>> bool((rate_bound(lambda v: f(v, x), z) < 1).all())
    True
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from .errors import InvalidInputError
from .layers import PcDEQLayer
from .reductions import sample_dims

__all__ = ["rate_bound", "upper_bound", "min_injection"]


def under_autocast(state: Tensor) -> bool:
    """Whether autocast is on for ``state``'s device (it exists for CPU and CUDA only)."""
    device = state.device.type
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)


def rate_bound(func: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Per-sample ``q = max_i (J z)_i / z_i`` with ``J = d func / dz`` at ``z``.

    For ``J >= 0`` and ``z > 0``, ``q`` is at least the spectral radius of ``J``. Entries with
    ``z_i = 0`` count as 0 when ``(J z)_i = 0`` and make ``q`` infinite otherwise. Under
    autocast the product is taken in float32 when ``f`` can run so, else in autocast's dtype.

    Args:
        func: the map, evaluated once with forward-mode automatic differentiation.
        z: the state, batch dimension first.

    Returns:
        A tensor of shape ``(batch,)``.
    """
    if torch.is_inference_mode_enabled():
        raise InvalidInputError(
            "The rate bound needs a forward-mode Jacobian-vector product, which "
            "torch.inference_mode() disables. Evaluate under torch.no_grad() instead."
        )
    z = z.detach()
    if under_autocast(z):
        # q is a property of the exact map: under autocast, take the product in float32 (the
        # weights' dtype) when f allows it, rather than in bfloat16 / float16, whose rounding
        # can push q past 1 or below its true value. The iteration's own rounding is the
        # solver's margin. An f that cannot run in float32 outside autocast (bfloat16 weights,
        # a low-precision tensor in a product) gets q in the forward's arithmetic.
        try:
            with torch.autocast(z.device.type, enabled=False):
                return _collatz_wielandt(func, z.to(torch.promote_types(z.dtype, torch.float32)))
        except (RuntimeError, InvalidInputError):
            pass
    return _collatz_wielandt(func, z)


def _collatz_wielandt(func: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    try:
        with torch.no_grad(), forward_ad.dual_level(), warnings.catch_warnings():
            # forward AD's first use compiles a helper with torch.jit.script, which warns
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            tangent = forward_ad.unpack_dual(func(forward_ad.make_dual(z, z))).tangent
    except (RuntimeError, NotImplementedError) as exc:
        raise InvalidInputError(
            f"The rate bound needs a forward-mode Jacobian-vector product of f, which failed: "
            f"{exc}. Every operation in f must support torch.autograd.forward_ad; the pcDEQ "
            "layers and built-in activations do."
        ) from exc
    if tangent is None:  # f does not depend on z
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    positive = z > 0
    ratio = torch.where(positive, tangent / torch.where(positive, z, 1.0), 0.0)
    ratio = torch.where(~positive & (tangent != 0), math.inf, ratio)
    return ratio.amax(dim=sample_dims(ratio))


def upper_bound(seen: dict) -> float:
    """The largest activation supremum among the pcDEQ layers in ``seen``.

    Raises:
        InvalidInputError: no pcDEQ layer was called, or one has no finite supremum.
    """
    layers: list[PcDEQLayer] = [layer for layer, _ in seen.values()]
    if not layers:
        raise InvalidInputError(
            "The enclosure starts its upper sequence at the activation's supremum, but f called "
            "no pcDEQ layer to read it from. Set pcdeq_enclosure_upper to the supremum of f's "
            "activation (1.0 for tanh, sigmoid and softsign, 6.0 for relu6)."
        )
    unbounded = [layer.activation.name for layer in layers if not layer.activation.bounded]
    if unbounded:
        raise InvalidInputError(
            f"The enclosure needs an activation with a finite supremum; {unbounded[0]!r} has none, "
            "so no upper sequence can start above the fixed point. Use the plain solve "
            "(pcdeq_enclosure off) with this activation."
        )
    return max(layer.activation.supremum for layer in layers)


def min_injection(seen: dict, like: Tensor) -> Tensor:
    """Per-sample smallest injection over the pcDEQ layers in ``seen`` (NaN without any)."""
    minima = [x.detach().amin(dim=sample_dims(x)) for _, x in seen.values() if x.shape[0] == like.shape[0]]
    if not minima:
        return torch.full(like.shape[:1], math.nan, dtype=like.dtype, device=like.device)
    return functools.reduce(torch.fmin, minima).to(like.dtype)

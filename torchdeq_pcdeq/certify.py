"""Run-time certificates of a pcDEQ solve: the Jacobian rate bound and the layer reports.

* :func:`rate_bound`: for ``f`` with a nonnegative Jacobian ``J`` at a positive state ``z``,
  ``q = max_i (J v)_i / v_i`` bounds the spectral radius of ``J`` for any positive ``v``
  (Collatz-Wielandt), hence the local rate of the forward iteration and of the adjoint iteration
  ``y = J^T y + g``, which contracts by ``q`` in the ``v``-weighted l1 norm (docs/method.md,
  section 3). ``v = z`` gives ``q`` close to 1 wherever pcDEQ-1 injections sit at their floor,
  however small the spectral radius; one power step, ``v = J z + eps z``, gives a ``q`` that is
  never larger and is usually close to the radius (0.03 against 0.9998 on a ``PcDEQLinear(64)``
  whose radius is 0.024). Two forward-mode Jacobian-vector products; ``q < 1`` for a valid pcDEQ.
  :func:`rate_certificate` also returns the ``v`` that its ``q`` holds for;
  :func:`closed_form_certificate` computes the same from two products with ``W`` at a step of
  one pcDEQ layer, as the pcdeq core does where a solve iterates one layer call.
* :func:`upper_bound` and :func:`min_injection` read what the pcDEQ layers called by ``f``
  reported (:func:`~torchdeq_pcdeq.layers.observe_layer_calls`): the activation's supremum,
  where the enclosure's upper sequence starts, and the smallest injection per sample, the
  positivity margin of the pcDEQ-1 guarantee.

Example (injections at the floor: ``v = z`` bounds nothing useful, the power step does):
    >>> import torch
    >>> from torchdeq_pcdeq import PcDEQLinear, pcdeq_fixed_point
    >>> _ = torch.manual_seed(0)
    >>> f = PcDEQLinear(64)
    >>> x = f.inject(torch.randn(8, 64))
    >>> with torch.no_grad():
    ...     z, _, _ = pcdeq_fixed_point(lambda v: f(v, x), torch.zeros_like(x), tol=1e-6)
    >>> one_product = rate_certificate(lambda v: f(v, x), z, power_step=False).rate.max()
    >>> bool(one_product > 0.999), bool(rate_bound(lambda v: f(v, x), z).max() < 0.05)
    (True, True)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from .errors import InvalidInputError
from .layers import PcDEQLayer
from .reductions import sample_dims
from .rounding import under_autocast

__all__ = [
    "RateCertificate",
    "rate_bound",
    "rate_certificate",
    "closed_form_certificate",
    "closed_form_slope",
    "upper_bound",
    "min_injection",
]


class RateCertificate(NamedTuple):
    """A certified rate: per sample, ``J v <= rate * v`` entrywise with ``v = weights > 0``.

    Then ``rate`` bounds the spectral radius of ``J`` (Collatz-Wielandt), and ``J^T`` contracts
    by ``rate`` in the ``weights``-weighted l1 norm ``sum_i weights_i |y_i|``.

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import PcDEQLinear
        >>> f = PcDEQLinear(8)
        >>> x, z = f.inject(torch.randn(3, 8)), torch.full((3, 8), 0.5)
        >>> rate, weights = rate_certificate(lambda z: f(z, x), z)
        >>> _, jv = torch.func.jvp(lambda z: f(z, x), (z,), (weights,))
        >>> bool((jv <= rate[:, None] * weights * (1 + 1e-6)).all())  # J v <= rate v, with rounding
        True
    """

    rate: Tensor  # (batch,)
    weights: Tensor  # the state's shape


# The power step's share of z in v = J z + eps z: small, so that v follows J z (the tight
# vector); positive, so that v > 0 where a row of J vanishes. Measured on PcDEQLinear(64):
# q = 0.033 (eps = 0), 0.031 (1e-4), 0.032 (1e-3), 0.040 (1e-2), radius 0.024.
_POWER_STEP_SHARE = 1e-3

# q is raised by this many ulps of its dtype for the rounding of the products it is computed
# from: near 1, a bound built on a q one ulp below the exact ratio fails by 25%. Audits saw up
# to 3 ulps, over sums of up to 2,048 terms; the worst case of a sum of n nonnegative terms, n
# ulps, is not covered beyond 12 terms (blocked and pairwise summation stay far below it). The
# same margin on every path, so that a map's q does not depend on how it is computed.
_RATE_ULPS = 16


def rate_bound(func: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Per-sample ``q >= rho(J)`` with ``J = d func / dz`` at ``z``: :func:`rate_certificate`'s rate.

    Args:
        func: the map, evaluated twice with forward-mode automatic differentiation.
        z: the state, batch dimension first; nonnegative.

    Returns:
        A tensor of shape ``(batch,)``.

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import PcDEQLinear, pcdeq_fixed_point
        >>> f = PcDEQLinear(8)
        >>> x = f.inject(torch.randn(3, 8))
        >>> z, _, _ = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros(3, 8))
        >>> q = rate_bound(lambda z: f(z, x), z)  # each error shrinks by q per iteration at z*
        >>> q.shape, bool((q < 1).all())
        (torch.Size([3]), True)
    """
    return rate_certificate(func, z).rate


def rate_certificate(func: Callable[[Tensor], Tensor], z: Tensor, power_step: bool = True) -> RateCertificate:
    """Per-sample ``q = max_i (J v)_i / v_i`` and the positive vector ``v`` it holds for.

    ``v`` is ``z`` (``power_step=False``: one Jacobian-vector product) or, per sample where it
    gives the smaller ``q``, ``J z + eps z`` (two products). For ``J >= 0`` and ``v > 0``, ``q``
    is at least the spectral radius of ``J``, and ``J^T`` contracts by ``q`` in the
    ``v``-weighted l1 norm. Since ``J z <= q_z z`` gives ``J (J z + eps z) <= q_z (J z + eps z)``,
    the power step never loosens the bound; it tightens it where ``z`` is a poor Perron vector
    (pcDEQ-1 units whose injection sits at the floor, where ``(J z)_i / z_i`` is close to 1).
    Entries with ``v_i = 0`` make ``q`` infinite: Collatz-Wielandt needs ``v > 0``, and ``J``'s
    block on such entries is unseen by ``J v`` (at ``z = 0``, ``q`` would read 0 for any map).
    Under autocast the products are taken in float32 when ``f`` can run so, else in autocast's
    dtype. Under ``torch.inference_mode()`` they are taken on a copy of ``z`` made
    outside it.

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import PcDEQLinear
        >>> from torchdeq_pcdeq.certify import rate_certificate
        >>> f = PcDEQLinear(6, "sigmoid")
        >>> x = f.inject(torch.randn(2, 6))
        >>> q, v = rate_certificate(lambda z: f(z, x), torch.full((2, 6), 0.5))
        >>> bool((q < 1).all()), bool((v > 0).all())
        (True, True)
    """
    if torch.is_inference_mode_enabled() or z.is_inference():
        # Inference tensors take no forward-mode product (the tangent is dropped); a copy of z
        # made outside inference mode does (f's inference tensors, its injection and cached
        # weights, act as constants).
        with torch.inference_mode(False):
            return rate_certificate(func, z.detach().clone(), power_step)
    z = z.detach()
    if under_autocast(z):
        # q is a property of the exact map: under autocast, take the products in float32 (the
        # weights' dtype) when f allows it, rather than in bfloat16 / float16, whose rounding
        # can push q past 1 or below its true value. The iteration's own rounding is the
        # solver's margin. An f that cannot run in float32 outside autocast (bfloat16 weights,
        # a low-precision tensor in a product) gets q in the forward's arithmetic.
        try:
            with torch.autocast(z.device.type, enabled=False):
                return _certificate(func, z.to(torch.promote_types(z.dtype, torch.float32)), power_step)
        except (RuntimeError, InvalidInputError):
            pass
    return _certificate(func, z, power_step)


def _certificate(func: Callable[[Tensor], Tensor], z: Tensor, power_step: bool) -> RateCertificate:
    return _from_products(lambda direction: _jvp(func, z, direction), z, power_step)


def closed_form_slope(layer: PcDEQLayer, weight: Tensor, z_in: Tensor, x: Tensor) -> Tensor:
    """``sigma'(W z_in + x)`` from the pre-activation (the activation's ``derivative``), one
    product with ``W``: within a few ulps where the slope read from the output, as autograd and
    the uncertified closed-form gradient read it, keeps no digits (saturated units, whose
    ``sigma'`` is then below the output's rounding). The certificates' Jacobian.
    """
    activation = layer.activation
    with torch.no_grad():  # (not through the layer: a call of it would join the solve's chain)
        pre = layer.apply_operator(z_in.detach(), weight.detach()) + x.detach()
        if activation.derivative is None:  # (a record built without one: the output's slope)
            return activation.slope(activation(pre))
        return activation.derivative(pre)


def closed_form_certificate(
    layer: PcDEQLayer, weight: Tensor, z_in: Tensor, slope: Tensor
) -> RateCertificate:
    """:func:`rate_certificate` of ``J = diag(slope) W`` at a step ``layer(z_in, x)`` made with
    ``weight``, from two products with ``W`` instead of automatic differentiation, with
    ``slope = sigma'(W z_in + x)`` from :func:`closed_form_slope`. For a layer with
    :meth:`~torchdeq_pcdeq.layers.PcDEQLayer.has_closed_form_gradient`.

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import PcDEQLinear, rate_certificate
        >>> f = PcDEQLinear(6)
        >>> x = f.inject(torch.randn(2, 6))
        >>> z = torch.full((2, 6), 0.5)
        >>> slope = closed_form_slope(f, f.weight, z, x)
        >>> q, _ = closed_form_certificate(f, f.weight, z, slope)
        >>> bool(torch.allclose(q, rate_certificate(lambda v: f(v, x), z).rate))
        True
    """
    z_in, weight = z_in.detach(), weight.detach()
    with torch.no_grad():
        return _from_products(lambda direction: slope * layer.apply_operator(direction, weight), z_in, True)


def _from_products(jvp: Callable[[Tensor], Tensor], z: Tensor, power_step: bool) -> RateCertificate:
    """The certificate from ``jvp(d) = J d``."""
    jz = jvp(z)
    rate = _collatz_wielandt(jz, z)
    if not power_step:
        return RateCertificate(rate, z)
    v = jz + _POWER_STEP_SHARE * z
    # Any positive vector certifies: where eps z underflowed on a vanishing row of J, z stays.
    v = torch.where(v > 0, v, z)
    stepped = _collatz_wielandt(jvp(v), v)
    # Below the normal range rounding is absolute, up to an ulp of the smallest normal number:
    # relative to an entry v_i that small, (J v)_i can round to nothing (v ~ q z underflows in
    # float16 where z ~ 1e-5), and q with it. A v within the normal range keeps each ratio
    # within a few ulps, as z itself does (pcDEQ-1 injections are floored at the normal range).
    smallest = torch.where(v > 0, v, math.inf).amin(dim=sample_dims(v))
    normal = smallest >= torch.finfo(v.dtype).tiny
    better = (stepped < rate) & normal  # (False where NaN: the one-product bound stays)
    per_sample = better.view(-1, *(1,) * (z.dim() - 1))
    return RateCertificate(torch.where(better, stepped, rate), torch.where(per_sample, v, z))


def _jvp(func: Callable[[Tensor], Tensor], z: Tensor, direction: Tensor) -> Tensor:
    """``J direction`` with ``J = d func / dz`` at ``z``."""
    try:
        with torch.no_grad(), forward_ad.dual_level(), warnings.catch_warnings():
            # forward AD's first use compiles a helper with torch.jit.script, which warns
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            tangent = forward_ad.unpack_dual(func(forward_ad.make_dual(z, direction))).tangent
    except (RuntimeError, NotImplementedError) as exc:
        raise InvalidInputError(
            f"The rate bound needs a forward-mode Jacobian-vector product of f, which failed: "
            f"{exc}. Every operation in f must support torch.autograd.forward_ad; the pcDEQ "
            "layers and built-in activations do."
        ) from exc
    if tangent is None:
        # Reading no tangent as J = 0 would certify q = 0 for any map whose f cuts the path.
        raise InvalidInputError(
            "The rate bound's forward-mode product found no path from z to f(z): f ignores z, or "
            "cuts the path (detach(), .data, torch.inference_mode() inside f, a tensor rebuilt "
            "from numbers), and which one cannot be told, so no bound is given. Keep f "
            "differentiable in z."
        )
    return tangent


def _collatz_wielandt(jv: Tensor, v: Tensor) -> Tensor:
    """Per-sample ``max_i (J v)_i / v_i`` from ``jv = J v``, raised by ``_RATE_ULPS`` (an
    exact 0, from products that are all exactly 0, stays 0). In float16 and bfloat16, where
    ``q`` is an estimate (the slope itself keeps few digits), it is not raised."""
    positive = v > 0
    # v_i = 0 leaves J's block on those entries unseen, whatever (J v)_i: no bound there.
    ratio = torch.where(positive, jv / torch.where(positive, v, 1.0), math.inf)
    rate = ratio.amax(dim=sample_dims(ratio))
    return rate * (1 + _RATE_ULPS * torch.finfo(rate.dtype).eps) if rate.dtype.itemsize >= 4 else rate


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
            "so no upper sequence starts above the fixed point by itself. Set pcdeq_enclosure_upper "
            "to a value known to bound z* (the enclosure checks that f does not rise above it), or "
            "use the plain solve (pcdeq_enclosure off) with this activation."
        )
    return max(layer.activation.supremum for layer in layers)


def min_injection(seen: dict, like: Tensor) -> Tensor:
    """Per-sample smallest injection over the pcDEQ layers in ``seen`` (NaN without any)."""
    minima = [x.detach().amin(dim=sample_dims(x)) for _, x in seen.values() if x.shape[0] == like.shape[0]]
    if not minima:
        return torch.full(like.shape[:1], math.nan, dtype=like.dtype, device=like.device)
    return functools.reduce(torch.fmin, minima).to(like.dtype)

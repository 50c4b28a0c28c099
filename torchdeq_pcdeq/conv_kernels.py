"""The kernel behind a pcDEQ convolution's untracked products: PyTorch's dispatch or NNPACK.

A solve applies one convolution ``W`` many times without recording a graph: the forward
iterations, and the adjoint products ``W^T y`` of the implicit gradient (``W^T`` of a stride-1
"same" convolution is the convolution with the kernel's channels swapped and its taps flipped).
On CPU, PyTorch sends ``F.conv2d`` to oneDNN whenever oneDNN is built in and enabled (else
larger batches to NNPACK, which "PyTorch's kernel" here then turns off). NNPACK, also built
into PyTorch's CPU wheels, computes 3x3 convolutions with Winograd transforms and so with fewer
multiplications. Whether that wins depends on the machine and on the layout: on the 2-core AVX2
machine of ``benchmarks/results/micro_cpu.md`` (MNIST single-conv layer, batch 64, 82 channels,
28x28, channels-last states), NNPACK's ``W z`` took 51.2 ms with the conversion to NCHW against
oneDNN's 49.0, and its ``W^T y`` 43.5 against 49.0; an earlier machine measured 0.56x for
``W z``. Timing each product where it runs, as ``"auto"`` does, is what holds across machines.

Winograd is not sign-preserving: its transforms subtract, so a product of a nonnegative kernel
and a nonnegative state can come out negative, and its rounding error reaches tens of ulps of
the largest entry where a direct convolution stays within a few (measured: a spike of 6 on a
background of 1e-6, 3x3 kernel, gives entries down to -1.6e-4 where the exact minimum is
+1.1e-5, 65 ulps of the maximum against 7 for ``F.conv2d``; on the MNIST single-conv layer's
own states, 4 ulps of the maximum and no negative entry over 50 training steps). Two places
rely on the sign of ``W z``:

* the certificates: the enclosure's rounding margin (16 ulps) covers direct products only. The
  certified solves run inside :func:`sign_exact_products`, where every ``W z`` is PyTorch's (and
  every ``W^T y``: the certified backward's margin covers direct products too);
* the iterates and the guard. A pcDEQ layer's state and kernel are nonnegative, so its exact
  ``W z`` is: :class:`~torchdeq_pcdeq.layers.PcDEQConv2d` clamps its Winograd products of a
  nonnegative state at 0 (``nonnegative=True``), and its iterates stay nonnegative, guard or
  not; a negative state, which no pcDEQ map produces, keeps its products' sign. The guard also
  reports an iterate that falls from ``z_init = 0``, which Winograd's rounding can mimic where
  the iterates barely move. A verdict against a solve that made Winograd products
  (:func:`winograd_products` counts them) is not trusted: the solver solves again inside
  :func:`sign_exact_products`, and that solve's verdict stands (``pcdeq_fixed_point``).
  Rounding never makes a guard fail, and a real violation is still reported, at the cost of a
  second solve.

The adjoint products ``W^T y`` have no sign to keep (``y`` is a gradient), and the closed-form
gradient that makes them is, unless certified, a plain iteration to a relative tolerance (1e-4)
far above NNPACK's error; a certified backward (``pcdeq_rate_bound``) makes them inside
:func:`sign_exact_products`, whose rounding its margin covers. Hence the three choices:

* ``"auto"`` (default; PyTorch's kernel under ``torch.use_deterministic_algorithms(True)``, since
  a timing can choose otherwise in the next run): each product, ``W z`` and ``W^T y``, on the
  faster of PyTorch's kernel (in the input's layout) and NNPACK (in NCHW, its layout), timed at
  the first use for each
  direction, input shape and layout (a warm-up and three interleaved runs each, once per
  process), NNPACK kept only when at least 10% faster, as ``torch.backends.cudnn.benchmark``
  does for cuDNN. Like it, ``"auto"`` suits states of a few shapes (a training batch, the last
  smaller one, an evaluation batch).
* ``"pytorch"``: PyTorch's kernels everywhere; bitwise reproducible across processes.
* ``"nnpack"``: NNPACK wherever it applies, untimed.

NNPACK is used only where it computes what ``F.conv2d`` would, to rounding: CPU, plain float32
tensors, a nonempty batch, odd kernels up to 15x15 with "same" padding, no gradient to record,
no CPU autocast, no forward-mode AD or ``torch.func`` transform, not under ``torch.compile``,
not with ``torch.backends.nnpack.flags(enabled=False)``, and not inside
:func:`sign_exact_products`.
Anything else, and every tracked application, goes through ``F.conv2d`` and autograd as usual.

NNPACK reads and writes NCHW. In a solve, ``W z + x`` takes its first operand's layout, so after
the first Winograd product the iterates are NCHW (with a channels-last injection, each such
addition reads two layouts). An iteration of adjoint products in a channels-last layout would
convert every input and mix layouts in every elementwise operation between products (16 ms of
copies and mixed-layout arithmetic per product on the MNIST state, against 4 ms in one layout):
:func:`transposed_layout` tells the closed-form gradient to iterate in NCHW instead.

Example:
    >>> import torch
    >>> from torchdeq_pcdeq.conv_kernels import same_conv2d
    >>> z, w = torch.rand(16, 8, 6, 6), torch.rand(8, 8, 3, 3)
    >>> out = same_conv2d(z, w, padding=1, algorithm="nnpack")
    >>> torch.allclose(out, torch.nn.functional.conv2d(z, w, padding=1), rtol=1e-5, atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

from .errors import InvalidInputError, check_choice

__all__ = [
    "CONV_ALGORITHMS",
    "Choice",
    "same_conv2d",
    "same_conv2d_transposed",
    "transposed_layout",
    "weight_gradient",
    "sign_exact_products",
    "winograd_products",
    "choices",
    "check_algorithm",
]

CONV_ALGORITHMS = ("auto", "pytorch", "nnpack")
_NNPACK_MAX_KERNEL = 15  # NNPACK takes kernels up to 16x16; pcDEQ kernels are odd
_MARGIN = 0.9  # NNPACK must beat PyTorch's dispatch by 10%: near-ties keep the standard path
_TRIALS = 3


@dataclass(frozen=True)
class Choice:
    """The kernel ``auto`` chose for one shape, and the best time of each, in milliseconds."""

    algorithm: str
    pytorch_ms: float
    nnpack_ms: float


_CHOICES: dict[tuple, Choice] = {}


class _ThreadState(threading.local):
    sign_exact = 0  # depth of sign_exact_products() blocks
    winograd = 0  # W z products made by NNPACK


_STATE = _ThreadState()


@contextlib.contextmanager
def sign_exact_products() -> Iterator[None]:
    """Inside the block, every ``W z`` of :func:`same_conv2d` and ``W^T y`` of
    :func:`same_conv2d_transposed` runs on PyTorch's kernel, whatever the algorithm: for
    computations that rely on the sign or the rounding of the products (certificates, the certified
    backward, the guard's second look; see the module docstring). Per thread; blocks nest.

    Example:
        >>> import torch
        >>> z, w = torch.rand(2, 3, 5, 5), torch.rand(3, 3, 3, 3)
        >>> before = winograd_products()
        >>> with sign_exact_products():
        ...     out = same_conv2d(z, w, padding=1, algorithm="nnpack")
        >>> winograd_products() == before
        True
    """
    _STATE.sign_exact += 1
    try:
        yield
    finally:
        _STATE.sign_exact -= 1


def winograd_products() -> int:
    """How many ``W z`` products :func:`same_conv2d` has made by NNPACK in this thread so far
    (the difference between two readings says whether a computation made any)."""
    return _STATE.winograd


@functools.cache
def nnpack_available() -> bool:
    """Whether this PyTorch build has NNPACK (the call also initialises it, which it needs)."""
    return bool(torch._nnpack_available())


def check_algorithm(algorithm: str) -> str:
    """Return ``algorithm`` if it is one of :data:`CONV_ALGORITHMS` usable here; raise otherwise."""
    check_choice("conv_algorithm", algorithm, CONV_ALGORITHMS)
    if algorithm == "nnpack" and not nnpack_available():
        raise InvalidInputError(
            "conv_algorithm='nnpack' was asked for, but this PyTorch build has no NNPACK "
            "(torch._nnpack_available() is False). Use 'auto' (NNPACK where available and "
            "faster) or 'pytorch'."
        )
    return algorithm


def same_conv2d(
    z: Tensor, weight: Tensor, padding: int, algorithm: str = "auto", nonnegative: bool = False
) -> Tensor:
    """``F.conv2d(z, weight, padding=padding)`` (stride 1), by the kernel ``algorithm`` selects.

    Args:
        z: ``(batch, C, H, W)`` input.
        weight: ``(C_out, C, k, k)`` kernel, ``k`` odd, ``padding = k // 2``.
        padding: zero padding on each side.
        algorithm: ``"nnpack"`` uses NNPACK where it applies, ``"auto"`` where it applies and
            was timed faster, ``"pytorch"`` never; inside :func:`sign_exact_products` none does
            (see the module docstring).
        nonnegative: the caller guarantees ``weight >= 0`` (a pcDEQ layer's kernel), so the
            exact product is ``>= 0`` wherever ``z >= 0``: a Winograd product of a nonnegative
            ``z`` is then clamped at 0, which removes its rounding below 0 and nothing else (one
            reduction over ``z``, which a negative ``z``, no pcDEQ state, leaves unclamped).
    """
    if (
        algorithm != "pytorch"
        and not _STATE.sign_exact
        and _nnpack_applies(z, weight, padding)
        and _nnpack_chosen(z, weight, padding, algorithm, transposed=False)
    ):
        _STATE.winograd += 1
        out = _nnpack(z, weight, padding)
        if nonnegative:
            # Only where z really is >= 0: a negative state (an f that is no pcDEQ map, say a
            # normalization before the layer) keeps its products' sign for the guard to see.
            floor = torch.where(z.amin() >= 0, 0.0, -math.inf).to(out.dtype)
            out = out.clamp_min_(floor)
        return out
    return _pytorch(z, weight, padding)


def same_conv2d_transposed(
    v: Tensor, z: Tensor, weight: Tensor, padding: int, algorithm: str = "auto"
) -> Tensor:
    """``W^T v`` for ``W z = F.conv2d(z, weight, padding=padding)``: the gradient of
    ``<v, W z>`` with respect to ``z``, by the kernel ``algorithm`` selects.

    ``z`` gives the result's shape, and its layout on PyTorch's kernel (NNPACK returns NCHW);
    its values are not read. Hold ``v`` in :func:`transposed_layout`'s format: NNPACK converts
    any other input on every call, and ``"auto"`` timed it without that copy.

    Example:
        >>> import torch
        >>> z, v, w = torch.rand(2, 3, 5, 5), torch.rand(2, 4, 5, 5), torch.rand(4, 3, 3, 3)
        >>> lhs = (v * torch.nn.functional.conv2d(z, w, padding=1)).sum()
        >>> rhs = (same_conv2d_transposed(v, z, w, 1) * z).sum()
        >>> bool(torch.isclose(lhs, rhs))
        True
    """
    if _nnpack_applies(v, weight, padding) and transposed_layout(z, weight, padding, algorithm) is not None:
        return _nnpack(v, _transposed_kernel(weight), padding)
    return _pytorch_transposed(v, z, weight, padding)


def transposed_layout(
    z: Tensor, weight: Tensor, padding: int, algorithm: str = "auto"
) -> torch.memory_format | None:
    """The memory format in which to hold ``v`` for :func:`same_conv2d_transposed` with states
    like ``z``: ``torch.contiguous_format`` (NCHW) where the product runs on NNPACK, which reads
    and writes NCHW, else ``None`` (``z``'s own layout, which PyTorch's kernel keeps).

    For an iteration of products (the adjoint solve): hold its iterates in this layout.

    Example:
        >>> import torch
        >>> z, w = torch.rand(16, 8, 6, 6), torch.rand(8, 8, 3, 3)
        >>> transposed_layout(z, w, 1, "pytorch") is None  # PyTorch's kernel keeps z's layout
        True
    """
    if (
        not _STATE.sign_exact
        and _nnpack_applies(z, weight, padding)
        and _nnpack_chosen(z, weight, padding, algorithm, transposed=True)
    ):
        return torch.contiguous_format
    return None


def weight_gradient(v: Tensor, z: Tensor, weight: Tensor, padding: int) -> Tensor:
    """``d<v, W z>/dW`` for ``W z = F.conv2d(z, weight, padding=padding)``: PyTorch's kernel
    always (it is one product per backward, and it reads ``z``, whose sign it does not touch)."""
    return _convolution_backward(v, z, weight, padding, state=False)


def _direct() -> contextlib.AbstractContextManager:
    """Where PyTorch's dispatch stays off NNPACK's Winograd: with oneDNN off or not built in,
    it sends float32 convolutions of 16 samples or more to NNPACK, whose products are not
    sign-exact; PyTorch's own kernel must be, for the certificates and the guard."""
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return contextlib.nullcontext()
    return torch.backends.nnpack.flags(enabled=False)


def _pytorch(z: Tensor, weight: Tensor, padding: int) -> Tensor:
    with _direct():
        return F.conv2d(z, weight, padding=padding)


def _pytorch_transposed(v: Tensor, z: Tensor, weight: Tensor, padding: int) -> Tensor:
    # The kernel autograd runs for F.conv2d's input gradient (oneDNN's is faster than the
    # transposed convolution F.conv_transpose2d dispatches to: 100 against 130 ms on MNIST).
    with _direct():
        return _convolution_backward(v, z, weight, padding, state=True)


def _convolution_backward(v: Tensor, z: Tensor, weight: Tensor, padding: int, state: bool) -> Tensor:
    """One gradient output of ``F.conv2d``'s backward: the input's (``state``) or the weight's."""
    mask = [state, not state, False]
    grads = torch.ops.aten.convolution_backward(
        v, z, weight, None, [1, 1], [padding] * 2, [1, 1], False, [0, 0], 1, mask
    )
    return grads[0] if state else grads[1]


def choices() -> dict[tuple, Choice]:
    """What ``"auto"`` chose so far in this process, by ``(product, state shape, kernel shape,
    whether the state is NCHW, threads)``, the product being ``"W z"`` or ``"W^T y"``: for
    reports (the benchmarks print it)."""
    return dict(_CHOICES)


def _nnpack_chosen(z: Tensor, weight: Tensor, padding: int, algorithm: str, transposed: bool) -> bool:
    """Whether ``W z`` (or ``W^T v``, ``transposed``) runs on NNPACK for states like ``z``,
    where NNPACK applies."""
    if algorithm != "auto":
        return algorithm == "nnpack"
    if torch.are_deterministic_algorithms_enabled():  # (a timing can choose otherwise next run)
        return False
    product = "W^T y" if transposed else "W z"
    key = (product, tuple(z.shape), tuple(weight.shape), z.is_contiguous(), torch.get_num_threads())
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _time_both(z, weight, padding, transposed)
    return choice.algorithm == "nnpack"


_nnpack_enabled = getattr(torch._C, "_get_nnpack_enabled", lambda: True)


def _nnpack_applies(z: Tensor, weight: Tensor, padding: int) -> bool:
    return (
        type(z) is Tensor  # not a subclass (fake, functional or user tensors)
        and type(weight) in (Tensor, torch.nn.Parameter)
        and z.device.type == "cpu"
        and z.dtype == torch.float32
        and weight.dtype == torch.float32
        and z.dim() == 4
        and z.numel() > 0
        and weight.shape[-1] == weight.shape[-2] <= _NNPACK_MAX_KERNEL
        and weight.shape[-1] % 2 == 1
        and padding == weight.shape[-1] // 2
        and not (torch.is_grad_enabled() and (z.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and _nnpack_enabled()  # (torch.backends.nnpack.flags(enabled=False) turns it off)
        # NNPACK has no forward-mode derivative and no torch.func batching rule.
        and getattr(forward_ad, "_current_level", 0) < 0
        and not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling()
        and nnpack_available()
    )


def _nnpack(z: Tensor, weight: Tensor, padding: int) -> Tensor:
    # Only reached after nnpack_available(), whose torch._nnpack_available() initialises NNPACK:
    # without it the first call fails ("NNPACK SpatialConvolution_updateOutput failed").
    # NNPACK reads NCHW: a channels-last input is converted (see transposed_layout).
    return torch._nnpack_spatial_convolution(z.contiguous(), weight.contiguous(), None, [padding] * 2, [1, 1])


def _transposed_kernel(weight: Tensor) -> Tensor:
    return weight.transpose(0, 1).flip(2, 3).contiguous()


def _time_both(z: Tensor, weight: Tensor, padding: int, transposed: bool) -> Choice:
    """Time ``W^T v`` (``transposed``) or ``W z`` for states like ``z`` by both kernels.

    ``W^T v``: ``v`` in the layout each kernel would iterate in (:func:`transposed_layout`:
    NCHW for NNPACK, ``z``'s for PyTorch's kernel, channels-last standing for any other), and
    NNPACK's time includes transposing the kernel. ``W z``: the input in ``z``'s layout for
    both, NNPACK's time including its conversion to NCHW (the solve's later iterates are NCHW,
    and timed under their own key).
    """
    # A private generator: timing inside the first solve must not advance the user's RNG.
    generator = torch.Generator(device=z.device).manual_seed(0)
    if transposed:
        shape = (z.shape[0], weight.shape[0], *z.shape[2:])  # W z's
        v_nchw = torch.rand(shape, generator=generator, dtype=z.dtype, device=z.device)
        v = v_nchw if z.is_contiguous() else v_nchw.contiguous(memory_format=torch.channels_last)
        candidates = {
            "pytorch": lambda: _pytorch_transposed(v, z, weight, padding),
            "nnpack": lambda: _nnpack(v_nchw, _transposed_kernel(weight), padding),
        }
    else:
        state = torch.rand(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        state = state if z.is_contiguous() else state.contiguous(memory_format=torch.channels_last)
        candidates = {
            "pytorch": lambda: _pytorch(state, weight, padding),
            "nnpack": lambda: _nnpack(state, weight, padding),
        }
    best = {name: float("inf") for name in candidates}
    with torch.no_grad():
        for run in candidates.values():
            run()  # the first call of each allocates its workspace
        for _ in range(_TRIALS):
            for name, run in candidates.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    faster = best["nnpack"] < _MARGIN * best["pytorch"]
    return Choice("nnpack" if faster else "pytorch", 1e3 * best["pytorch"], 1e3 * best["nnpack"])

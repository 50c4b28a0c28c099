"""pcDEQ layers: ``f(z, x) = sigma(W z + x)`` with ``W >= 0`` at every call.

Each layer owns a bias-free ``nn.Linear`` or ``nn.Conv2d`` (``.linear`` / ``.conv``) holding
``W``, an :class:`~torchdeq_pcdeq.activations.Activation`, and a nonnegativity mechanism
(:mod:`torchdeq_pcdeq.constraints`). The operator is of a subclass of its own
(:class:`LinearOperator`, :class:`Conv2dOperator`): TorchDEQ's ``apply_norm`` matches exact
types, so the norm of a stock script (``weight_norm`` by default) leaves it, and its
mechanism, alone. ``inject(u)`` turns any real tensor into an admissible injection for the
layer's activation.

Layers know nothing of TorchDEQ: they are plain modules called as ``f(z, x)``.

Example:
    >>> import torch
    >>> from torchdeq_pcdeq import PcDEQLinear
    >>> f = PcDEQLinear(16, activation="tanh")
    >>> x = f.inject(torch.randn(4, 16))
    >>> z = torch.zeros(4, 16)
    >>> for _ in range(30):
    ...     z = f(z, x)
    >>> bool(torch.allclose(f(z, x), z, atol=1e-6))
    True
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_lib
from torch.nn.utils import parametrize

from .activations import Activation, get_activation
from .constraints import (
    NONNEGATIVITY_MODES,
    cached_weight,
    constrain_nonnegative,
    is_nonnegative_by_construction,
    reference_init_,
)
from .conv_kernels import (
    check_algorithm,
    same_conv2d,
    same_conv2d_transposed,
    transposed_layout,
    weight_gradient,
)
from .errors import InvalidInputError, NegativeWeightError, check_choice
from .reductions import extremes

if TYPE_CHECKING:  # (certify imports this module)
    from .certify import RateCertificate

__all__ = [
    "PcDEQLayer",
    "PcDEQLinear",
    "PcDEQConv2d",
    "LinearOperator",
    "Conv2dOperator",
    "observe_layer_calls",
    "zero_state",
    "record_layer_chain",
    "LayerChain",
    "LastStep",
    "DEFAULT_INJECTION_FLOOR",
    "DEFAULT_NONNEGATIVITY",
    "INJECTION_BETA",
]

INJECTION_BETA = 5.0
DEFAULT_INJECTION_FLOOR = 1e-6
DEFAULT_NONNEGATIVITY = "weight_norm"


class _SolveContext(threading.local):
    """What the solves running in this thread tell the layers; empty outside a pcdeq solve.

    Per thread, so that solves in several threads neither see nor unregister each other's.
    """

    def __init__(self):
        self.observers: list[dict] = []  # see observe_layer_calls
        self.zero_states: list[tuple[Tensor, int]] = []  # (state, its version); see zero_state
        self.chains: list[LayerChain] = []  # see record_layer_chain


_CONTEXT = _SolveContext()


@contextlib.contextmanager
def observe_layer_calls() -> Iterator[dict]:
    """Record the pcDEQ layers called inside the block, with the injection each received.

    Yields a dict ``{id(layer): (layer, injection)}`` filled as the block runs (first call of
    each layer). The certificates use it to read the activation's supremum and the smallest
    injection of whatever ``f`` the user wrote.

    Example:
        >>> import torch
        >>> f = PcDEQLinear(4, "relu6")
        >>> with observe_layer_calls() as seen:
        ...     _ = f(torch.zeros(1, 4), f.inject(torch.zeros(1, 4)))
        >>> [layer.activation.supremum for layer, _ in seen.values()]
        [6.0]
    """
    seen: dict = {}
    with _registered(_CONTEXT.observers, seen):
        yield seen


@contextlib.contextmanager
def zero_state(z: Tensor | None) -> Iterator[None]:
    """Tell the pcDEQ layers that ``z`` (this very tensor object) holds only zeros.

    A solve from ``z_0 = 0`` starts with ``f(0) = sigma(W 0 + x) = sigma(x)``: a layer called
    inside the block on ``z`` itself skips the product with ``W`` (exactly zero for finite
    weights). The pcdeq core uses it after verifying that its initial state is zero. ``None`` is
    a no-op. The product is computed in full for a ``z`` that requires grad (its gradient is
    kept), that was changed in place since (its version counter moved; edits through ``z.data``
    or NumPy do not move it, so do not make them), that is an inference tensor (which has no
    version counter to tell), or whose memory layout differs from the injection's. A weight
    holding Inf or NaN still makes the first iterate NaN, as the product would.

    Example:
        >>> import torch
        >>> f = PcDEQLinear(4)
        >>> z, x = torch.zeros(2, 4), f.inject(torch.randn(2, 4))
        >>> with zero_state(z):
        ...     first = f(z, x)
        >>> torch.equal(first, f(z, x)), torch.equal(first, torch.tanh(x))
        (True, True)
    """
    if z is None or z.is_inference():
        yield
        return
    with _registered(_CONTEXT.zero_states, (z, z._version)):
        yield


@dataclass(frozen=True)
class LastStep:
    """The last step ``out = sigma(W z_in + x)`` of a solve that only iterated one layer."""

    layer: PcDEQLayer
    x: Tensor
    z_in: Tensor
    out: Tensor
    # The W of that step where the chain computed it (see LayerChain.weights), else None
    weight: Tensor | None = None
    # With pcdeq_rate_bound: the certificate of the step's Jacobian, taken by the core's forward,
    # and the sigma' it was taken with (certify.closed_form_slope)
    certificate: RateCertificate | None = None
    slope: Tensor | None = None

    @property
    def operator_weight(self) -> Tensor:
        """The step's ``W``: the chain's where it computed it, else the layer's, computed now."""
        return self.layer.weight if self.weight is None else self.weight


class LayerChain:
    """The calls of pcDEQ layers in a block, kept only while they form one chain.

    A chain is what a plain solve of ``f = lambda z: layer(z, x)`` produces: every call is made
    by the same layer with the same injection ``x`` (this very tensor object, unchanged) on the
    previous call's output, or on the first call's input (the solve started again from its
    initial state: the guard's second look, see ``pcdeq_fixed_point``). Only the last call is
    kept (its input and output); any other call breaks the chain for good. :meth:`last_step`
    then says whether a returned state is the chain's last output, so that the implicit
    gradient can use the layer's closed form ``df/dz = diag(sigma'(W z_in + x)) W`` at that
    step instead of recording ``f`` again.
    """

    def __init__(self, track_weights: bool = True):
        self.track_weights = track_weights
        self.calls = 0
        self.broken = False
        self._layer = self._x = self._last = self._first = None
        self._x_version = 0
        self._versions: tuple[int, ...] = ()
        # The weight of each layer called without grad in the block (PcDEQLayer._weight_in): with
        # track_weights computed once and tracked, so that the closed form differentiates the W
        # the solve used; without, the W of the solve's cache, untracked.
        self.weights: dict[PcDEQLayer, Tensor] = {}

    def record(self, layer: PcDEQLayer, z: Tensor, x: Tensor, out: Tensor) -> None:
        if self.broken:
            return
        if z.is_inference() or x.is_inference() or out.is_inference():
            self._break()  # inference tensors have no version counter to tell an edit in place
            return
        if self._layer is None:
            self._layer, self._x, self._x_version, self._first = layer, x, x._version, z
        elif layer is not self._layer or x is not self._x or z is not self._last[1]:
            if not (layer is self._layer and x is self._x and z is self._first):
                self._break()
                return
            self.calls = 0  # a restart from the initial state: the chain begins again
        self.calls += 1
        self._last = (z, out)
        self._versions = (z._version, out._version)

    def _break(self) -> None:
        self.broken = True
        self._layer = self._x = self._last = self._first = None  # keep no state alive

    def last_step(self, state: Tensor) -> LastStep | None:
        """The chain's last step if ``state`` is its last output (or a detached alias), unchanged.

        ``None`` when the chain is broken, has fewer than two calls (the first call's input is
        not known to be ``f``'s), or anything was edited in place since.
        """
        if self.broken or self.calls < 2:
            return None
        z_in, out = self._last
        same = (
            state.data_ptr() == out.data_ptr()
            and state.shape == out.shape
            and state.stride() == out.stride()
            and state.dtype == out.dtype
        )
        versions = (z_in._version, out._version)
        if not same or versions != self._versions or self._x._version != self._x_version:
            return None
        return LastStep(self._layer, self._x, z_in, out, self.weights.get(self._layer))


@contextlib.contextmanager
def record_layer_chain(track_weights: bool = True) -> Iterator[LayerChain]:
    """Record the pcDEQ layer calls of the block in a :class:`LayerChain` (this thread only).

    ``track_weights``: no-grad calls in the block compute their layer's weight once, recording
    its graph, for a gradient through the last step (the closed-form gradient); ``False`` for a
    chain read without gradients (the closed-form rate bound).

    Example:
        >>> import torch
        >>> f = PcDEQLinear(4)
        >>> x = f.inject(torch.randn(2, 4))
        >>> with record_layer_chain() as chain:
        ...     z = torch.zeros(2, 4)
        ...     for _ in range(3):
        ...         z = f(z, x)
        >>> step = chain.last_step(z.detach())
        >>> step.layer is f, step.x is x
        (True, True)
    """
    chain = LayerChain(track_weights)
    with _registered(_CONTEXT.chains, chain):
        yield chain


@contextlib.contextmanager
def _registered(entries: list, entry) -> Iterator[None]:
    """``entry`` in ``entries`` for the duration of the block."""
    entries.append(entry)
    try:
        yield
    finally:
        # by identity: list.remove would compare tensors elementwise
        del entries[next(i for i, known in enumerate(entries) if known is entry)]


def _option(args, key: str, default):
    """``args[key]`` for a dict, an argparse Namespace or a TorchDEQ DEQConfig; else ``default``."""
    if args is None:
        return default
    if isinstance(args, dict):
        return args.get(key, default)
    if hasattr(args, "get") and callable(args.get):
        return args.get(key, default)
    return getattr(args, key, default)


# How each nonnegativity mode stores W in a state_dict, under the operator's prefix.
_STORED_AS = {
    "weight_norm": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    "parametrize": ("parametrizations.weight.original",),
    "project": ("weight",),
}


class PcDEQLayer(nn.Module):
    """Base class: ``sigma(W z + x)`` for a nonnegative linear operator ``W`` held by ``operator``.

    Subclasses give the operator module and implement :meth:`apply_operator` and
    :meth:`check_state`. See CONTRIBUTING.md, "Adding a layer".

    Args:
        operator: a bias-free module whose ``weight`` is ``W`` (initialised here).
        activation: a registered activation name or an :class:`Activation` record.
        nonnegativity: one of ``NONNEGATIVITY_MODES``; ``None`` reads ``pcdeq_nonnegativity``
            from ``args``, else ``"weight_norm"``.
        injection_floor: the positive floor added by :meth:`inject` for pcDEQ-1 activations;
            ``None`` reads ``pcdeq_injection_floor`` from ``args``, else ``1e-6``.
        args: a dict, argparse ``Namespace`` or ``DEQConfig`` (see ``add_pcdeq_args``).

    Example:
        A 1-D convolutional layer (no closed-form gradient without ``operator_vjp``: it gets
        the recorded implicit gradient):

        >>> import torch
        >>> from torch import nn
        >>> from torchdeq_pcdeq import InvalidInputError, pcdeq_fixed_point
        >>> class PcDEQConv1d(PcDEQLayer):
        ...     def __init__(self, channels, activation="tanh"):
        ...         super().__init__(nn.Conv1d(channels, channels, 3, padding=1, bias=False), activation)
        ...     def apply_operator(self, z, weight):
        ...         return nn.functional.conv1d(z, weight, padding=1)
        ...     def check_state(self, z):
        ...         if z.dim() != 3:
        ...             raise InvalidInputError(f"expected (batch, channels, length), got {tuple(z.shape)}")
        >>> f = PcDEQConv1d(4)
        >>> x = f.inject(torch.randn(2, 4, 16))
        >>> z, _, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros(2, 4, 16))
        >>> bool(info["converged"].all()), bool((f.weight >= 0).all())
        (True, True)
    """

    def __init__(
        self,
        operator: nn.Module,
        activation: str | Activation,
        nonnegativity: str | None = None,
        injection_floor: float | None = None,
        args=None,
    ):
        super().__init__()
        if nonnegativity is None:
            nonnegativity = _option(args, "pcdeq_nonnegativity", DEFAULT_NONNEGATIVITY)
        if injection_floor is None:
            injection_floor = _option(args, "pcdeq_injection_floor", DEFAULT_INJECTION_FLOOR)
        self.activation = get_activation(activation)
        self.nonnegativity = check_choice("nonnegativity mode", nonnegativity, NONNEGATIVITY_MODES)
        if isinstance(injection_floor, bool) or not (
            isinstance(injection_floor, (int, float)) and 0 < injection_floor < math.inf
        ):
            raise InvalidInputError(
                f"injection_floor must be a positive finite number, got {injection_floor!r}; it "
                "keeps pcDEQ-1 injections strictly positive where softplus underflows."
            )
        self.injection_floor = float(injection_floor)
        reference_init_(operator.weight)
        self._operator_name = "linear" if isinstance(operator, nn.Linear) else "conv"
        self.add_module(self._operator_name, constrain_nonnegative(operator, nonnegativity))
        if parametrize.is_parametrized(operator, "weight"):  # (named as the user reaches it)
            operator.parametrizations.weight[0].target = (
                f"{type(self).__name__}.{self._operator_name}",
                "weight",
            )
        # Checks that need a host sync run once per weight version / per injection tensor.
        self._verified_weight: tuple | None = None
        self._verified_call: tuple | None = None
        self._check_weight = nonnegativity == "project"

    # -- the operator -------------------------------------------------------------------------

    @property
    def operator(self) -> nn.Module:
        """The module holding ``W`` (``self.linear`` or ``self.conv``)."""
        return self._modules[self._operator_name]

    @property
    def weight(self) -> Tensor:
        """The effective nonnegative weight ``W`` used by :meth:`forward`.

        In the ``"weight_norm"`` and ``"parametrize"`` modes it is computed from the stored
        parameters at each access: an in-place edit of it (``layer.weight.copy_(W)``,
        ``nn.init.*(layer.weight)``) changes a copy and nothing else. Assign instead:
        ``layer.weight = W`` stores ``W`` (through the parametrization, or, in ``"project"``
        mode, copied into the parameter once checked to be nonnegative).
        """
        return self.operator.weight

    @weight.setter
    def weight(self, value: Tensor) -> None:
        operator = self.operator
        if not isinstance(value, Tensor) or value.shape != operator.weight.shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise InvalidInputError(
                f"{type(self).__name__}.weight takes a tensor of the weight's shape "
                f"{tuple(operator.weight.shape)}, got {got}."
            )
        value = value.detach()
        if parametrize.is_parametrized(operator, "weight"):
            # through the parametrization's right_inverse (whose set_ needs the stored dtype and
            # device: converted as copy_ converts below)
            operator.weight = value.to(operator.weight.device, operator.weight.dtype)
            return
        negative = 0 if value.is_meta else int((value < 0).sum())
        if negative:
            raise NegativeWeightError(
                f"{type(self).__name__} (nonnegativity={self.nonnegativity!r}): the assigned weight "
                f"has {negative} negative {'entry' if negative == 1 else 'entries'}; pcDEQ needs "
                "W >= 0, and this mode does not change what it is given. Assign a nonnegative weight "
                "(value.clamp(min=0), or torchdeq_pcdeq.reference_init_), or use "
                "nonnegativity='weight_norm' or 'parametrize'."
            )
        with torch.no_grad():
            operator.weight.copy_(value)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and isinstance(value, nn.Parameter):
            # (nn.Module would register a second parameter named like the property)
            type(self).weight.fset(self, value)
            return
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of another mode has none of this layer's keys: strict loading names
        # PyTorch's keys only, and strict=False would keep the initial W without a word.
        operator, where = f"{prefix}{self._operator_name}.", f" at {prefix[:-1]!r}" if prefix else ""
        # The parameters that hold W here (whatever else parametrizes it, such as a spectral
        # norm; buffers have the same keys in every mode), and how this layer stores W now (a
        # parametrization removed by hand leaves a plain weight, as folding does).
        own = [name for name, _ in self.operator.named_parameters()]
        current = self.nonnegativity if parametrize.is_parametrized(self.operator, "weight") else "project"
        if not any(operator + key in state_dict for key in own):
            for mode, keys in _STORED_AS.items():
                if mode != current and all(operator + key in state_dict for key in keys):
                    raise InvalidInputError(
                        f"{type(self).__name__}{where}: the checkpoint holds W under the keys of "
                        f"nonnegativity={mode!r} ({', '.join(operator + key for key in keys)}), and "
                        f"this layer stores it as nonnegativity={current!r} does. Build the layer "
                        f"with nonnegativity={mode!r} to load it; to change modes afterwards, assign "
                        "its W to a layer of the other mode (other.weight = layer.weight)."
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fold_nonnegativity(self) -> Tensor:
        """Replace the weight's parametrization by a plain parameter holding ``W >= 0``; return it.

        For export, or to continue training with the projection: afterwards the layer is in
        ``"project"`` mode, so attach :func:`~torchdeq_pcdeq.attach_projection` to the
        optimizer (or keep the weight fixed), and a negative entry is reported by the next
        forward. A layer already in ``"project"`` mode is left as it is. Calling
        ``torch.nn.utils.parametrize.remove_parametrizations`` directly does the same to ``W``
        and its checks, but leaves ``nonnegativity`` at its old name.

        Example:
            >>> import torch
            >>> f = PcDEQLinear(4, nonnegativity="weight_norm")
            >>> before = f.weight.detach().clone()
            >>> w = f.fold_nonnegativity()
            >>> (f.nonnegativity, type(w).__name__, torch.equal(w.detach(), before))
            ('project', 'Parameter', True)
        """
        if parametrize.is_parametrized(self.operator, "weight"):
            parametrize.remove_parametrizations(self.operator, "weight", leave_parametrized=True)
        self.nonnegativity = "project"
        self._check_weight = True
        self._verified_weight = None
        return self.operator.weight

    def projection_targets(self) -> list[Tensor]:
        """Parameters that :func:`~torchdeq_pcdeq.attach_projection` must clamp (project mode)."""
        return [] if is_nonnegative_by_construction(self.operator) else [self.operator.weight]

    def apply_operator(self, z: Tensor, weight: Tensor) -> Tensor:
        """``W z`` for this layer's operator."""
        raise NotImplementedError

    def operator_vjp(
        self, v: Tensor, z: Tensor, weight: Tensor, *, state: bool = True, weight_grad: bool = False
    ) -> tuple[Tensor | None, Tensor | None]:
        """Pull ``v`` back through ``W z``: ``(W^T v, d<v, W z>/dW)``, each only when asked for.

        Optional for subclasses: a layer that implements it gets the closed-form implicit
        gradient (no recorded application of ``f``; see :meth:`has_closed_form_gradient`).
        """
        raise NotImplementedError

    def adjoint_layout(self, z: Tensor, weight: Tensor) -> torch.memory_format | None:
        """The memory format in which :meth:`operator_vjp` pulls back states like ``z`` fastest
        (``torch.contiguous_format``, or ``torch.channels_last`` for 4-D states), or ``None``
        for ``z``'s own: the closed-form gradient holds its adjoint iterates in it."""
        return None

    def has_closed_form_gradient(self) -> bool:
        """Whether a solve of ``lambda z: self(z, x)`` may be differentiated in closed form.

        It needs :meth:`operator_vjp` from the class that defines :meth:`apply_operator` (or a
        subclass of it; a subclass that changes the operator and inherits the VJP does not
        qualify), an activation with a known ``slope``, and no hooks that a recorded
        application of the layer would run.
        """
        if self.activation.slope is None or _has_hooks(self):
            return False
        if "apply_operator" in self.__dict__ or "operator_vjp" in self.__dict__:
            return False  # patched on the instance
        if type(self).operator_vjp is PcDEQLayer.operator_vjp:
            return False
        mro = type(self).__mro__
        owner = next(c for c in mro if "apply_operator" in c.__dict__)
        vjp_owner = next(c for c in mro if "operator_vjp" in c.__dict__)
        return issubclass(vjp_owner, owner)

    def check_state(self, z: Tensor) -> None:
        """Raise :class:`InvalidInputError` unless ``z`` has this layer's state shape."""
        raise NotImplementedError

    # -- injections ---------------------------------------------------------------------------

    @property
    def variant(self) -> int:
        """1 (``sigma(0) = 0``: strictly positive injection) or 2 (nonnegative injection)."""
        return self.activation.variant

    def inject(self, u: Tensor) -> Tensor:
        """The admissible injection for this layer's activation.

        pcDEQ-1: ``softplus(u, beta=5) + floor`` (strictly positive even where softplus
        underflows, e.g. ``u < -21`` in float32), the floor raised to the dtype's smallest normal
        number where it is below it (float16: ``6.1e-5``), so that no injection is subnormal;
        pcDEQ-2: ``relu(u)``.

        Raises:
            InvalidInputError: ``u`` is not a floating tensor or has the wrong shape (NaN or Inf
                in ``u`` are reported by the first call of :meth:`forward` with the result).
        """
        if not isinstance(u, Tensor) or not u.is_floating_point():
            raise InvalidInputError(
                f"{type(self).__name__}.inject expects a floating-point tensor, got "
                f"{type(u).__name__}{'' if not isinstance(u, Tensor) else ' of dtype ' + str(u.dtype)}."
            )
        self.check_state(u)
        # NaN and Inf in u reach the injection, which the first call of forward verifies.
        if self.variant == 1:
            floor = max(self.injection_floor, torch.finfo(u.dtype).tiny)
            return F.softplus(u, beta=INJECTION_BETA) + floor
        return F.relu(u)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """``sigma(W z + x)``.

        Args:
            z: the state, batch dimension first; nonnegative, as every pcDEQ state is (the
                core checks ``z_init``, and the layers keep iterates nonnegative; a layer's
                untracked products may rely on it, as :class:`PcDEQConv2d`'s Winograd ones do).
            x: the injection, same shape as ``z``; admissible (see :meth:`inject`).

        Raises:
            InvalidInputError: wrong shape, dtype or device, or a non-admissible injection.
            NegativeWeightError: ``"project"`` mode and the weight has negative entries.
        """
        context = None if torch.compiler.is_compiling() else _CONTEXT
        weight = self._weight_in(context)
        if not (isinstance(x, Tensor) and isinstance(z, Tensor)):
            self._verify_call(z, x, weight, None)  # raises with the expected shape
        if context is not None:
            # A solve calls f many times with one injection: the checks that need a host sync
            # (and those of dtypes and devices) run once per injection tensor and kind of state
            # (shape, dtype, device, with the weight's and autocast's); a cheap comparison covers
            # the other calls. Inference tensors have no version counter.
            key = (
                0 if x.is_inference() else x._version,
                z.shape,
                z.dtype,
                z.device,
                weight.dtype,
                weight.device,
                torch.is_autocast_enabled(weight.device.type),  # (z's may be one autocast lacks)
            )
            verified = self._verified_call
            if verified is None or verified[0]() is not x or verified[1] != key:
                self._verify_call(z, x, weight, key)
            # A plain parameter ("project" mode, or a folded parametrization) is checked; so is
            # any parametrization other than ours (looked up once per injection: it is slow).
            if self._check_weight or isinstance(weight, nn.Parameter):
                if context.observers and id(self) not in context.observers[-1]:
                    # Edits through .data, or under no_grad on a detached alias, can keep the
                    # weight's version counter: checked again at the first call of each solve.
                    self._verified_weight = None
                self._verify_weight(weight)
            for seen in context.observers:
                seen.setdefault(id(self), (self, x))
            if context.zero_states and _is_known_zero(z, x, context.zero_states):
                # W 0 + x == x exactly, unless W holds Inf or NaN (Inf * 0 is NaN): the product
                # is skipped, and a non-finite weight still poisons the iterate.
                pre = x + weight.amax() * 0
            else:
                pre = self.apply_operator(z, weight) + x
            out = self.activation.function(pre)
            for chain in context.chains:
                chain.record(self, z, x, out)
            return out
        return self.activation.function(self.apply_operator(z, weight) + x)

    def _weight_in(self, context: _SolveContext | None) -> Tensor:
        """``W`` for a call made in ``context`` (``None``: while compiling).

        Inside a no-grad solve that records its layer chain for the closed-form gradient, ``W``
        is computed once per solve, tracked, and kept by the chain: the closed form then
        differentiates the ``W`` the solve used instead of computing it again (a weight norm is
        about 10 operations forward). Inside any other no-grad solve it is computed once,
        untracked, and kept in the solve's :func:`~torchdeq_pcdeq.constraints.weight_cache`
        (per thread: unlike ``parametrize.cached()``, no other thread can read it).
        """
        if context is None or torch.is_grad_enabled():
            return self.weight
        # (a solve recording no chain, the common case, skips the scan)
        tracking = [chain for chain in context.chains if chain.track_weights] if context.chains else ()
        if not tracking:
            weight = cached_weight(self.operator)
            for chain in context.chains:  # a chain read without gradients keeps the W it read
                chain.weights.setdefault(self, weight)
            return weight
        for chain in reversed(tracking):
            weight = chain.weights.get(self)
            if weight is not None:
                return weight
        operator = self.operator
        if parametrize.is_parametrized(operator, "weight"):
            with torch.enable_grad():
                weight = operator.parametrizations.weight()
        else:
            weight = operator.weight
        for chain in tracking:
            chain.weights.setdefault(self, weight)
        return weight

    def _verify_call(self, z: Tensor, x: Tensor, weight: Tensor, key: tuple) -> None:
        self.check_state(z)
        if not isinstance(x, Tensor) or x.shape != z.shape:
            raise InvalidInputError(
                f"{type(self).__name__}: the injection must have the state's shape "
                f"{tuple(z.shape)}, got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}. "
                "Compute it with layer.inject(u) from a tensor of the state's shape."
            )
        self._check_compatible(z, x, weight)
        self._verify_injection(x)
        self._check_weight = not is_nonnegative_by_construction(self.operator)
        # (and once per new injection outside a solve: see forward)
        self._verified_weight = None
        self._verified_call = (weakref.ref(x), key)

    def _check_compatible(self, z: Tensor, x: Tensor, weight: Tensor) -> None:
        if z.device != weight.device or x.device != weight.device:
            raise InvalidInputError(
                f"{type(self).__name__}: state on {z.device} and injection on {x.device}, "
                f"weights on {weight.device}. Move them to one device (model.to(device) and "
                "tensor.to(device))."
            )
        if torch.is_autocast_enabled(z.device.type):
            # autocast mixes float32 with its own dtype, and nothing else (float64 is not cast,
            # and another half dtype fails in its cast rules with PyTorch's raw error)
            fast = torch.get_autocast_dtype(z.device.type)
            dtypes = {z.dtype, x.dtype, weight.dtype}
            if len(dtypes) == 1 or dtypes <= {torch.float32, fast}:
                return
            raise InvalidInputError(
                f"{type(self).__name__} under {fast} autocast: state {z.dtype} and injection "
                f"{x.dtype}, weights {weight.dtype}; autocast mixes float32 with {fast} only. "
                "Keep the model and its inputs in float32 (model.float()) and let autocast lower "
                "them, or run outside autocast."
            )
        if z.dtype != weight.dtype or x.dtype != weight.dtype:
            raise InvalidInputError(
                f"{type(self).__name__}: state {z.dtype} and injection {x.dtype}, weights "
                f"{weight.dtype}. Use one dtype (model.to(dtype)), or run under torch.autocast."
            )

    def _verify_weight(self, weight: Tensor) -> None:
        # (an inference tensor has no version counter to tell an edit: checked at every call)
        version = None if weight.is_inference() else weight._version
        key = (id(weight), version, weight.data_ptr())
        if key == self._verified_weight:
            return
        with torch.no_grad():
            negative = int((weight < 0).sum())
        if negative:
            raise NegativeWeightError(
                f"{type(self).__name__} (nonnegativity={self.nonnegativity!r}): the weight has "
                f"{negative} negative {'entry' if negative == 1 else 'entries'} "
                f"(min {weight.min().item():.3g}); pcDEQ needs W >= 0. "
                "Attach the projection to the optimizer once "
                "(torchdeq_pcdeq.attach_projection(optimizer, model)), do not edit the weight by "
                "hand, or use nonnegativity='weight_norm' or 'parametrize'."
            )
        self._verified_weight = key if version is not None else None

    def _verify_injection(self, x: Tensor) -> None:
        strict = self.variant == 1
        if x.numel() == 0:  # an empty batch holds nothing to check (and has no extremes)
            return
        with torch.no_grad():
            # One reduction and one host sync: NaN propagates to both extremes and fails both tests.
            low, high = torch.stack(extremes(x)).tolist()
            if not ((low > 0 if strict else low >= 0) and high < math.inf):
                _require_finite(x, f"{type(self).__name__} injection")
                count = int(((x <= 0) if strict else (x < 0)).sum())
                need = "strictly positive" if strict else "nonnegative"
                raise InvalidInputError(
                    f"{type(self).__name__} with activation {self.activation.name!r} (pcDEQ-"
                    f"{self.variant}) needs a {need} injection, got {count} entries that are not "
                    f"(min {low:.3g}). Pass x = layer.inject(u) instead of u."
                )

    def __getstate__(self) -> dict:
        # The verification caches hold a weak reference (not picklable) and describe tensors
        # of this process only: a copy or an unpickled module verifies afresh.
        state = self.__dict__.copy()
        state["_verified_call"] = state["_verified_weight"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A layer pickled before the operators had types of their own holds a plain nn.Linear /
        # nn.Conv2d, which TorchDEQ's apply_norm would wrap: give it its type (no state differs).
        operator = self._modules.get(self._operator_name)
        own = {nn.Linear: LinearOperator, nn.Conv2d: Conv2dOperator}.get(type(operator))
        if own is not None:
            operator.__class__ = own

    def extra_repr(self) -> str:
        return (
            f"activation={self.activation.name!r}, nonnegativity={self.nonnegativity!r}, "
            f"injection_floor={self.injection_floor:g}"
        )


class LinearOperator(nn.Linear):
    """The ``nn.Linear`` holding a :class:`PcDEQLinear`'s ``W``; a type of its own.

    TorchDEQ's ``apply_norm`` installs its norm on modules whose type is exactly ``nn.Linear``
    (or ``nn.Conv2d``, ...). A pcDEQ layer keeps ``W >= 0`` by its own mechanism: a
    parametrized operator already has another type, and this one gives the ``"project"``
    mode's plain weight the same immunity (an unconstrained weight norm on it would let
    ``W`` go negative, and ``attach_projection`` would clamp parameters that no longer exist).

    Example:
        >>> import torchdeq
        >>> f = PcDEQLinear(4, nonnegativity="project")
        >>> torchdeq.apply_norm(f, norm_type="weight_norm")
        >>> [name for name, _ in f.named_parameters()]
        ['linear.weight']
    """


class Conv2dOperator(nn.Conv2d):
    """The ``nn.Conv2d`` holding a :class:`PcDEQConv2d`'s kernel; a type of its own (see
    :class:`LinearOperator`)."""


class PcDEQLinear(PcDEQLayer):
    """Dense pcDEQ layer ``sigma(W z + x)``, ``W`` a nonnegative ``features x features`` matrix.

    Args:
        features: state size ``N``; states are ``(batch, ..., N)``.
        activation: registered name (``"tanh"``, ``"softsign"``, ``"relu6"``, ``"sigmoid"``,
            or one added with :func:`~torchdeq_pcdeq.register_activation`) or a record.
        nonnegativity: ``"weight_norm"`` (default), ``"parametrize"`` or ``"project"``.
        injection_floor: positive floor of pcDEQ-1 injections (default ``1e-6``).
        args: config read for the options left at ``None`` (``pcdeq_nonnegativity``,
            ``pcdeq_injection_floor``; see ``add_pcdeq_args``).

    Example:
        >>> import torch
        >>> f = PcDEQLinear(80, activation="sigmoid")
        >>> f(torch.zeros(2, 80), f.inject(torch.randn(2, 80))).shape
        torch.Size([2, 80])
    """

    def __init__(
        self,
        features: int,
        activation: str | Activation = "tanh",
        *,
        nonnegativity: str | None = None,
        injection_floor: float | None = None,
        args=None,
        device=None,
        dtype=None,
    ):
        _require_positive_int(features, "features")
        self.features = features
        operator = LinearOperator(features, features, bias=False, device=device, dtype=dtype)
        super().__init__(operator, activation, nonnegativity, injection_floor, args)

    def apply_operator(self, z: Tensor, weight: Tensor) -> Tensor:
        return F.linear(z, weight)

    def operator_vjp(self, v, z, weight, *, state=True, weight_grad=False):
        grad_state = torch.matmul(v, weight) if state else None
        grad_weight = None
        if weight_grad:
            grad_weight = v.reshape(-1, self.features).t().matmul(z.reshape(-1, self.features))
        return grad_state, grad_weight

    def check_state(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() < 2 or z.shape[-1] != self.features:
            raise InvalidInputError(
                f"PcDEQLinear({self.features}) expects tensors of shape (batch, ..., "
                f"{self.features}) with the batch dimension first, got "
                f"{_describe(z)}. Add a batch dimension with z.unsqueeze(0) if needed."
            )

    def extra_repr(self) -> str:
        return f"{self.features}, " + super().extra_repr()


class PcDEQConv2d(PcDEQLayer):
    """Convolutional pcDEQ layer ``sigma(conv(z) + x)`` with a nonnegative ``C -> C`` kernel.

    Bias-free, stride 1, "same" zero padding, so states keep their shape ``(batch, C, H, W)``.

    Args:
        channels: ``C``.
        activation: registered name or record (see :class:`PcDEQLinear`).
        kernel_size: odd kernel size (default 3).
        nonnegativity: ``"weight_norm"`` (default), ``"parametrize"`` or ``"project"``.
        injection_floor: positive floor of pcDEQ-1 injections (default ``1e-6``).
        conv_algorithm: the kernel of the untracked products ``W z`` (solves) and ``W^T y``
            (implicit gradients): ``"auto"`` (default: each on the faster of PyTorch's kernel
            and NNPACK, timed once per shape), ``"pytorch"`` (PyTorch's kernels everywhere;
            bitwise reproducible) or ``"nnpack"`` (NNPACK wherever it applies). NNPACK's
            Winograd products are not sign-exact: certified solves make ``W z`` (and a certified
            backward ``W^T y``) on PyTorch's kernel, and a guard failure is judged again with it; see
            :mod:`torchdeq_pcdeq.conv_kernels`. ``None`` reads ``pcdeq_conv_algorithm``.
        args: config read for the options left at ``None`` (see :class:`PcDEQLinear`).

    Example:
        >>> import torch
        >>> f = PcDEQConv2d(8)
        >>> f(torch.zeros(2, 8, 5, 5), f.inject(torch.randn(2, 8, 5, 5))).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(
        self,
        channels: int,
        activation: str | Activation = "tanh",
        kernel_size: int = 3,
        *,
        nonnegativity: str | None = None,
        injection_floor: float | None = None,
        conv_algorithm: str | None = None,
        args=None,
        device=None,
        dtype=None,
    ):
        _require_positive_int(channels, "channels")
        if conv_algorithm is None:
            conv_algorithm = _option(args, "pcdeq_conv_algorithm", "auto")
        _require_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise InvalidInputError(
                f"PcDEQConv2d needs an odd kernel_size so that 'same' padding keeps the state "
                f"shape, got {kernel_size}. Use 1, 3, 5, ..."
            )
        self.channels, self.kernel_size, self.padding = channels, kernel_size, kernel_size // 2
        operator = Conv2dOperator(
            channels, channels, kernel_size, padding=self.padding, bias=False, device=device, dtype=dtype
        )
        self.conv_algorithm = check_algorithm(conv_algorithm)
        super().__init__(operator, activation, nonnegativity, injection_floor, args)

    def apply_operator(self, z: Tensor, weight: Tensor) -> Tensor:
        # States and kernels of a pcDEQ layer are nonnegative: Winograd's rounding below 0 goes.
        return same_conv2d(z, weight, self.padding, self._conv_algorithm(), nonnegative=True)

    def operator_vjp(self, v, z, weight, *, state=True, weight_grad=False):
        grad_state = grad_weight = None
        if state:
            grad_state = same_conv2d_transposed(v, z, weight, self.padding, self._conv_algorithm())
        if weight_grad:
            grad_weight = weight_gradient(v, z, weight, self.padding)
        return grad_state, grad_weight

    def adjoint_layout(self, z: Tensor, weight: Tensor) -> torch.memory_format | None:
        if type(self).operator_vjp is not PcDEQConv2d.operator_vjp:
            return None  # a subclass's own products: their layout is theirs to say
        return transposed_layout(z, weight, self.padding, self._conv_algorithm())

    def _conv_algorithm(self) -> str:
        # Layers pickled before the option existed computed with PyTorch's kernel.
        return self.__dict__.get("conv_algorithm", "pytorch")

    def check_state(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != self.channels:
            raise InvalidInputError(
                f"PcDEQConv2d({self.channels}) expects tensors of shape (batch, {self.channels}, "
                f"height, width), got {_describe(z)}. Check the channel count of the layer that "
                "produces the injection, and that the batch dimension comes first."
            )

    def extra_repr(self) -> str:
        chosen = self._conv_algorithm()
        algorithm = "" if chosen == "auto" else f"conv_algorithm={chosen!r}, "
        return f"{self.channels}, kernel_size={self.kernel_size}, {algorithm}" + super().extra_repr()


def _has_hooks(module: nn.Module) -> bool:
    """Module hooks on ``module`` or global ones (``torch.nn.modules.module``)."""
    return any(
        (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
            module_lib._global_forward_hooks,
            module_lib._global_forward_pre_hooks,
            module_lib._global_backward_hooks,
            module_lib._global_backward_pre_hooks,
        )
    )


def _is_known_zero(z: Tensor, x: Tensor, zero_states: list[tuple[Tensor, int]]) -> bool:
    for zero, version in zero_states:  # registered states are never inference tensors
        if z is zero:
            # Not if edited in place, tracked by autograd, or laid out unlike the injection: the
            # iterate's layout would change the kernels of the next products and their rounding.
            return z._version == version and not z.requires_grad and z.stride() == x.stride()
    return False


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__


def _require_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}.")


def _require_finite(x: Tensor, what: str) -> None:
    with torch.no_grad():
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise InvalidInputError(
                f"{what} holds {nan} NaN and {inf} Inf entries out of {x.numel()}; expected finite "
                "values. Check the data and the layers before this one (a too large learning "
                "rate is the usual cause)."
            )

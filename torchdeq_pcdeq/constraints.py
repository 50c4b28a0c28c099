"""Nonnegative weights, three ways.

pcDEQ's guarantees need ``W >= 0`` at every forward. Three mechanisms keep it whatever the
optimizer does; pick one by name (``NONNEGATIVITY_MODES``):

* ``"weight_norm"`` (default of the layers; also the TorchDEQ norm ``pcdeq_nonneg``): the weight
  is reparametrized as ``W_i = |g_i| * |v_i| / ||v_i||`` per output unit, through
  :mod:`torch.nn.utils.parametrize`. Nonnegative by construction; a zero row gives a zero row,
  never NaN.
* ``"parametrize"``: ``W = |V|`` elementwise through :mod:`torch.nn.utils.parametrize`.
* ``"project"``: the paper's projection: ``W`` is a plain parameter clamped to ``>= 0`` after
  every optimizer step by a hook (:func:`attach_projection`). The layers verify ``W >= 0`` once
  per change of the weight and raise :class:`NegativeWeightError` if the hook is missing.

The two parametrizations are safe with any optimizer, gradient accumulation, DDP,
``copy.deepcopy`` and ``state_dict``; their ``remove`` folds the weight back into a plain,
nonnegative parameter. Inside :func:`weight_cache` (the pcdeq core's solves) each computes its
weight once, per thread and only while no gradient is recorded.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torchdeq_pcdeq import constrain_nonnegative
    >>> lin = nn.Linear(4, 4, bias=False)
    >>> _ = reference_init_(lin.weight)
    >>> lin = constrain_nonnegative(lin, "parametrize")
    >>> bool((lin.weight >= 0).all())
    True
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import InvalidInputError, NegativeWeightError, check_choice, warn

__all__ = [
    "NONNEGATIVITY_MODES",
    "NonNegative",
    "NonNegativeWeightNorm",
    "PcDEQNonnegNorm",
    "weight_cache",
    "cached_weight",
    "constrain_nonnegative",
    "is_nonnegative_by_construction",
    "attach_projection",
    "project_nonnegative_",
    "reference_init_",
]

NONNEGATIVITY_MODES = ("weight_norm", "parametrize", "project")

# The scale of the reference initialisation (docs/method.md, section 4).
_REFERENCE_INIT_SCALE = 1e-4**0.5


def reference_init_(weight: Tensor) -> Tensor:
    """Fill ``weight`` in place with the reference initialisation and return it.

    ``U[0, 1) * sqrt(1e-4) / sqrt(fan_out + fan_in)``, kernel size ignored (docs/method.md,
    section 4): the layer starts near ``sigma(x)`` and converges in a handful of iterations.

    Example:
        >>> import torch
        >>> w = reference_init_(torch.empty(80, 80))
        >>> bool((w >= 0).all()) and bool(w.max() <= 0.01 / 160**0.5)
        True
    """
    if weight.dim() < 2:
        raise InvalidInputError(
            f"reference_init_ expects a weight with at least 2 dimensions (out, in, ...), got "
            f"shape {tuple(weight.shape)}."
        )
    fan_out, fan_in = weight.shape[0], weight.shape[1]
    with torch.no_grad():
        return weight.uniform_(0.0, 1.0).mul_(_REFERENCE_INIT_SCALE / (fan_out + fan_in) ** 0.5)


def _reduce_dims(weight: Tensor, dim: int) -> list[int]:
    """All dimensions but ``dim``: the norm of weight normalization is taken over them."""
    dim = dim % weight.dim()
    return [d for d in range(weight.dim()) if d != dim]


def _trainable(magnitude: Tensor) -> Tensor:
    """``magnitude`` (``>= 0``) with its zeros raised to the dtype's smallest subnormal number.

    ``abs`` has no gradient at 0: a raw entry stored as exactly 0 (from a zero initialisation,
    or a weight from the projection, which clamps to 0) would never train. Raised, it changes
    the weight by at most that number, below any rounding of a product, and trains.
    """
    finfo = torch.finfo(magnitude.dtype)
    return magnitude.clamp_min(finfo.tiny * finfo.eps)


def _warn_if_negative(weight: Tensor, parametrization: nn.Module) -> None:
    if weight.is_meta:  # no values yet (a model built on "meta" to load a checkpoint into)
        return
    negative = int((weight < 0).sum())
    if not negative:
        return
    # A signed initialisation (PyTorch's default) made nonnegative keeps its magnitudes: the rows
    # of |W| then sum to about sqrt(fan_in) / 2, 4 for 64 inputs, which saturates a bounded
    # activation. The model converges at every solve yet cannot learn: say so here.
    gain = weight.detach().abs().flatten(1).sum(1).max().item() if weight.dim() > 1 else 0.0
    saturates = (
        f" Its rows sum to up to {gain:.3g}: above 1, a bounded activation such as tanh sits near "
        "its supremum at the fixed point, where its slope and the gradients vanish, and training "
        "can stay at chance although every solve converges."
        if gain > 1
        else ""
    )
    # (the module and parameter, when constrain_nonnegative registered the parametrization)
    target = getattr(parametrization, "target", None)
    module, name = target if target is not None else ("module", "weight")
    on = f" on {module}.{name}" if target is not None else ""
    warn(
        f"{type(parametrization).__name__}{on}: the weight has {negative} negative entries (min "
        f"{weight.min().item():.3g}); the constrained weight uses their absolute values.{saturates} "
        f"Initialise with torchdeq_pcdeq.reference_init_(module.{name}) first for the reference start "
        "(with norm_type='pcdeq_nonneg', the flag --pcdeq_nonneg_init reference does it)."
    )


class _WeightCaches(threading.local):
    def __init__(self):
        self.stack: list[dict] = []


_CACHES = _WeightCaches()


@contextlib.contextmanager
def weight_cache() -> Iterator[dict]:
    """Compute each constrained weight once inside the block, in this thread, while untracked.

    A fixed-point solve calls ``f`` many times with the same weights; a parametrized weight would
    be recomputed at each call (a weight norm is about 10 operations). Inside the block,
    :class:`NonNegative` and :class:`NonNegativeWeightNorm` (and the pcDEQ layers) keep the
    weight they computed and return it again, as long as gradient recording is off and their
    raw parameters are the same tensors at the same version.

    Unlike ``torch.nn.utils.parametrize.cached()``, whose cache and switch are one for the whole
    process, this cache is per thread and never hands an untracked weight to a call that records
    gradients: a solve in one thread cannot make another thread's weights silently stop training.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> lin = nn.Linear(4, 4, bias=False)
        >>> _ = reference_init_(lin.weight)
        >>> lin = constrain_nonnegative(lin, "weight_norm")
        >>> with torch.no_grad(), weight_cache():
        ...     lin.weight is lin.weight
        True
        >>> with weight_cache():  # recording gradients: computed at every access
        ...     lin.weight is lin.weight, lin.weight.requires_grad
        (False, True)
    """
    cache: dict = {}
    _CACHES.stack.append(cache)
    try:
        yield cache
    finally:
        _CACHES.stack.pop()


def _active_cache() -> dict | None:
    """The cache of the innermost :func:`weight_cache` block of this thread, when a weight
    computed now may be kept (no gradient recorded, not compiling); else ``None``."""
    stack = _CACHES.stack
    if not stack or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return stack[-1]


def cached_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """``getattr(module, name)``, computed once per :func:`weight_cache` block while it may be.

    Faster than the parametrization's own cache on a hit (no module calls). The weight is
    computed again when a raw parameter was replaced (``load_state_dict(assign=True)``,
    ``torch.func.functional_call`` with other parameters) or changed in place, as its version
    counter shows (edits through ``.data`` do not show). Only a weight that one of this module's
    parametrizations computes alone is kept: with others chained to it, ``getattr`` runs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> lin = nn.Linear(4, 4, bias=False)
        >>> _ = reference_init_(lin.weight)
        >>> lin = constrain_nonnegative(lin, "parametrize")
        >>> with torch.no_grad(), weight_cache():
        ...     first = cached_weight(lin)
        ...     _ = lin.parametrizations.weight.original.mul_(2)
        ...     torch.equal(cached_weight(lin), 2 * first)
        True
    """
    cache = _active_cache()
    # (the dicts behind module.parametrizations[name], read directly: a hit costs microseconds)
    chains = module._modules.get("parametrizations")
    parametrizations = None if chains is None else chains._modules.get(name)
    if cache is None or not _ours_alone(parametrizations):
        # A plain tensor is returned as it is; a chain with other parametrizations, which may
        # hold state of their own (a scale, a spectral norm's vectors), is computed at each
        # call, ours in it from the cache.
        return getattr(module, name)
    return _kept(cache, (module, name), _originals(parametrizations), lambda: getattr(module, name))


def _ours_alone(parametrizations: nn.Module | None) -> bool:
    """Whether a ``ParametrizationList`` is one of our parametrizations, whose weight depends on
    the originals alone."""
    chain = None if parametrizations is None else parametrizations._modules
    return (
        chain is not None and len(chain) == 1 and isinstance(chain["0"], (NonNegative, NonNegativeWeightNorm))
    )


def _originals(parametrizations: nn.Module) -> tuple[Tensor, ...]:
    """The raw tensors a ``ParametrizationList`` computes its weight from, as they are now."""
    names = ("original",) if parametrizations.is_tensor else _original_names(parametrizations.ntensors)
    # an original is a parameter, or a buffer where the weight was a plain tensor
    held = parametrizations._parameters
    return tuple(held[n] if n in held else parametrizations._buffers[n] for n in names)


@functools.cache
def _original_names(count: int) -> tuple[str, ...]:
    return tuple(f"original{i}" for i in range(count))


def _cached(parametrization: nn.Module, raw: tuple[Tensor, ...], compute) -> Tensor:
    """``compute(*raw)``, or what it returned for these tensors at these versions in this block."""
    cache = _active_cache()
    if cache is None:
        return compute(*raw)
    return _kept(cache, parametrization, raw, lambda: compute(*raw))


def _kept(cache: dict, key, raw: tuple[Tensor, ...], compute) -> Tensor:
    """``cache[key]``'s weight if it was computed from these very ``raw`` tensors at their current
    versions (an inference tensor has no version counter: never assumed unchanged); else
    ``compute()``, kept under ``key``."""
    versions = [None if t.is_inference() else t._version for t in raw]
    hit = cache.get(key)
    if (
        hit is not None
        and None not in versions
        and hit[1] == versions
        and len(hit[0]) == len(raw)
        and all(a is b for a, b in zip(hit[0], raw))
    ):
        return hit[2]
    weight = compute()
    cache[key] = (raw, versions, weight)
    return weight


class NonNegative(nn.Module):
    """Parametrization ``W = |V|``: nonnegative whatever value ``V`` takes.

    The absolute value (rather than a clamp or a square) keeps a unit gradient everywhere but
    at exactly 0, so an entry pushed below zero by the optimizer reflects back instead of dying;
    :meth:`right_inverse` stores no exact 0 (it stores the dtype's smallest subnormal number),
    so that a zero entry of an assigned weight trains too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.nn.utils import parametrize
        >>> lin = nn.Linear(3, 3, bias=False)
        >>> _ = nn.init.uniform_(lin.weight, 0.0, 1.0)
        >>> _ = parametrize.register_parametrization(lin, "weight", NonNegative())
        >>> bool((lin.weight >= 0).all())
        True
    """

    def forward(self, raw: Tensor) -> Tensor:
        return _cached(self, (raw,), self._weight)

    def _weight(self, raw: Tensor) -> Tensor:
        return raw.abs()

    def right_inverse(self, weight: Tensor) -> Tensor:
        _warn_if_negative(weight, self)
        return _trainable(weight.abs())


class NonNegativeWeightNorm(nn.Module):
    """Parametrization ``W_i = |g_i| * |v_i| / ||v_i||`` per slice ``i`` along ``dim``.

    A weight norm whose direction and scale are both nonnegative. Where ``||v_i|| = 0`` the
    slice is zero: the squared norm (accumulated in at least float32) is clamped to the smallest
    normal number before the reciprocal square root, so neither the value nor the gradient is
    NaN. ``abs`` has no gradient at exactly 0, so :meth:`right_inverse` stores no exact 0: the
    zero entries of a weight become the dtype's smallest subnormal number in ``v``, a zero
    slice gets a uniform direction and that number as its scale, which changes ``W`` by no more
    than that number, below any rounding of a product, and lets those entries train.

    Args:
        dim: the dimension kept by the norm (0: one scale per output unit or channel).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.nn.utils import parametrize
        >>> lin = nn.Linear(3, 3, bias=False)
        >>> _ = nn.init.uniform_(lin.weight, 0.0, 1.0)
        >>> _ = parametrize.register_parametrization(lin, "weight", NonNegativeWeightNorm())
        >>> sorted(name.split(".")[-1] for name, _ in lin.named_parameters())
        ['original0', 'original1']
    """

    def __init__(self, dim: int = 0):
        super().__init__()
        self.dim = dim

    def forward(self, scale: Tensor, direction: Tensor) -> Tensor:
        return _cached(self, (scale, direction), self._weight)

    def _weight(self, scale: Tensor, direction: Tensor) -> Tensor:
        # Squares of small half-precision entries are subnormal or zero: accumulate in float32.
        wide = direction.to(torch.promote_types(direction.dtype, torch.float32))
        squared = wide.square().sum(_reduce_dims(direction, self.dim), keepdim=True)
        inverse_norm = squared.clamp_min(torch.finfo(squared.dtype).tiny).rsqrt()
        return (scale.abs() * (wide.abs() * inverse_norm)).to(direction.dtype)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        _warn_if_negative(weight, self)
        direction = weight.abs()
        wide = direction.to(torch.promote_types(direction.dtype, torch.float32))  # as in forward
        scale = wide.square().sum(_reduce_dims(direction, self.dim), keepdim=True).sqrt()
        # (no exact zeros: they would never train)
        direction = torch.where(scale > 0, _trainable(direction), 1.0)
        return _trainable(scale.to(weight.dtype)), direction

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def constrain_nonnegative(module: nn.Module, mode: str, *, name: str = "weight", dim: int = 0) -> nn.Module:
    """Make ``getattr(module, name)`` nonnegative with the mechanism ``mode``; return ``module``.

    Args:
        module: e.g. an ``nn.Linear`` or ``nn.Conv2d``.
        mode: one of ``NONNEGATIVITY_MODES``. ``"project"`` registers nothing here: attach the
            projection to the optimizer with :func:`attach_projection`.
        name: the parameter to constrain.
        dim: the dimension kept by the weight norm (``"weight_norm"`` only).

    Raises:
        UnknownNameError: ``mode`` is not one of ``NONNEGATIVITY_MODES``.
        InvalidInputError: the parameter is missing or already parametrized.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchdeq_pcdeq import constrain_nonnegative
        >>> from torchdeq_pcdeq import reference_init_
        >>> layer = nn.Linear(4, 4, bias=False)
        >>> _ = reference_init_(layer.weight)  # a nonnegative start (else a warning says why)
        >>> layer = constrain_nonnegative(layer, "parametrize")
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=10.0)
        >>> layer.weight.sum().backward()
        >>> optimizer.step()  # drives every stored entry below 0
        >>> raw = layer.parametrizations.weight.original
        >>> bool((raw < 0).all()), bool((layer.weight >= 0).all())
        (True, True)
    """
    check_choice("nonnegativity mode", mode, NONNEGATIVITY_MODES)
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise InvalidInputError(
            f"{type(module).__name__} has no tensor {name!r} to constrain (got {type(weight).__name__})."
        )
    if parametrize.is_parametrized(module, name):
        raise InvalidInputError(
            f"{type(module).__name__}.{name} is already parametrized; remove the existing "
            "parametrization before constraining it again."
        )
    if mode != "project":
        parametrization = NonNegativeWeightNorm(dim) if mode == "weight_norm" else NonNegative()
        parametrization.target = (type(module).__name__, name)  # (named by its warnings)
        parametrize.register_parametrization(module, name, parametrization)
    return module


def is_nonnegative_by_construction(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is produced by one of this module's parametrizations."""
    if not parametrize.is_parametrized(module, name):
        return False
    chain = module.parametrizations[name]
    return isinstance(chain[-1], (NonNegative, NonNegativeWeightNorm))


def project_nonnegative_(params: Iterable[Tensor]) -> None:
    """Clamp every tensor of ``params`` to ``>= 0`` in place (the paper's projection).

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import project_nonnegative_
        >>> w = torch.tensor([-0.5, 0.0, 2.0], requires_grad=True)
        >>> project_nonnegative_([w])
        >>> w
        tensor([0., 0., 2.], requires_grad=True)
    """
    params = [p for p in params]
    if params:
        with torch.no_grad():
            torch._foreach_clamp_min_(params, 0.0)


def attach_projection(optimizer: torch.optim.Optimizer, params: nn.Module | Iterable[Tensor]):
    """Clamp ``params`` to ``>= 0`` after every ``optimizer.step()``; return the hook handle.

    One line keeps any training loop unchanged. ``params`` is either an iterable of parameters
    or a module, in which case the weights of its pcDEQ layers in ``"project"`` mode are used,
    but for frozen ones (``requires_grad=False``) that the optimizer does not hold when this is
    called (a weight given to it later with ``add_param_group`` needs a projection of its own).

    Raises:
        InvalidInputError: nothing to project, a parameter the optimizer does not update, or
            a parameter that is already negative (initialise it nonnegative first).

    Example:
        >>> import torch
        >>> from torchdeq_pcdeq import PcDEQLinear, attach_projection
        >>> f = PcDEQLinear(8, nonnegativity="project")
        >>> opt = torch.optim.SGD(f.parameters(), lr=10.0)
        >>> handle = attach_projection(opt, f)
        >>> f.linear.weight.grad = torch.ones(8, 8)
        >>> opt.step()
        >>> bool((f.linear.weight >= 0).all())
        True
    """
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if isinstance(params, nn.Module):
        targets = [
            p for m in params.modules() if hasattr(m, "projection_targets") for p in m.projection_targets()
        ]
        if not targets:
            raise InvalidInputError(
                "attach_projection found no pcDEQ layer with nonnegativity='project' in the "
                "module; pass the parameters to project explicitly."
            )
        # A frozen weight outside the optimizer needs no projection (no step of it moves the
        # weight); one it holds is kept, for when the weight is unfrozen.
        params = [p for p in targets if p.requires_grad or id(p) in in_optimizer]
        if not params:
            raise InvalidInputError(
                f"attach_projection: all {len(targets)} weight(s) of the module's 'project'-mode "
                "pcDEQ layers are frozen (requires_grad=False) and not in this optimizer, so none "
                "of its steps changes them and there is nothing to project. Give the optimizer "
                "those weights, or attach the projection to the one that will train them."
            )
    params = list(params)
    if not params:
        raise InvalidInputError("attach_projection needs at least one parameter to project.")
    missing = [tuple(p.shape) for p in params if id(p) not in in_optimizer]
    if missing:
        raise InvalidInputError(
            f"attach_projection: {len(missing)} parameter(s) (shapes {missing}) are not updated "
            "by this optimizer, so projecting them after its step does nothing. Pass the "
            "optimizer that trains them (a frozen parameter needs no projection: leave it out)."
        )
    negative = sum(int((p < 0).sum()) for p in params)
    if negative:
        raise NegativeWeightError(
            f"attach_projection: the parameters already have {negative} negative entries; the "
            "projection keeps nonnegative weights nonnegative but does not repair an initial "
            "state silently. Initialise them with torchdeq_pcdeq.reference_init_ or "
            "project_nonnegative_ first."
        )

    def project(_optimizer, _args, _kwargs) -> None:
        project_nonnegative_(params)

    return optimizer.register_step_post_hook(project)


class PcDEQNonnegNorm:
    """The TorchDEQ norm ``pcdeq_nonneg``: :class:`NonNegativeWeightNorm` under TorchDEQ's norm API.

    ``apply_norm(model, norm_type="pcdeq_nonneg")`` installs it on every ``nn.Linear``,
    ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (exact types, TorchDEQ's rule) of
    ``model``, keeping the magnitudes of each weight, or, with ``pcdeq_nonneg_init="reference"``
    in ``args``, starting it from :func:`reference_init_`. Unlike TorchDEQ's own weight norm it
    is a :mod:`torch.nn.utils.parametrize` parametrization, so modules stay deep-copyable,
    gradient accumulation works, and ``reset_norm`` has nothing to recompute (``__call__`` is a
    no-op kept for the contract).

    Example:
        >>> from torch import nn
        >>> import torchdeq, torchdeq_pcdeq
        >>> f = nn.Linear(4, 4)
        >>> _ = torchdeq_pcdeq.reference_init_(f.weight)
        >>> torchdeq.apply_norm(f, norm_type="pcdeq_nonneg")
        >>> bool((f.weight >= 0).all())
        True
    """

    _target_modules: ClassVar[dict[type, tuple[str, int]]] = {
        nn.Linear: ("weight", 0),
        nn.Conv1d: ("weight", 0),
        nn.Conv2d: ("weight", 0),
        nn.Conv3d: ("weight", 0),
        # (a transposed convolution's weight is (in, out / groups, ...): its rows are dim 1)
        nn.ConvTranspose1d: ("weight", 1),
        nn.ConvTranspose2d: ("weight", 1),
        nn.ConvTranspose3d: ("weight", 1),
    }
    # TorchDEQ weight-norm options that have no meaning here; they are reported, not ignored.
    _UNSUPPORTED_OPTIONS: ClassVar[dict[str, object]] = {"norm_no_scale": False, "norm_clip": False}

    def __init__(self, names: list[str], dims: list[int]):
        self.names, self.dims = names, dims

    @classmethod
    def apply(cls, module: nn.Module, deq_args=None, names=None, dims=None, **kwargs) -> PcDEQNonnegNorm:
        if names is None or dims is None:
            if type(module) not in cls._target_modules:
                raise InvalidInputError(
                    "norm_type='pcdeq_nonneg' applies to modules of type exactly nn.Linear, "
                    "nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d (TorchDEQ's rule), got "
                    f"{type(module).__name__}. A pcDEQ layer's operator keeps W >= 0 by the layer's "
                    "own mechanism (choose it with nonnegativity=...); for another module, pass "
                    "names= and dims=."
                )
            names, dims = cls._target_modules[type(module)]
        names = [names] if isinstance(names, str) else list(names)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if deq_args is not None:
            for key, neutral in cls._UNSUPPORTED_OPTIONS.items():
                if deq_args.get(key, neutral) != neutral:
                    warn(
                        f"norm_type='pcdeq_nonneg' does not support {key}={deq_args.get(key)!r}; "
                        "the scale is always learnt and never clipped. Drop the option."
                    )
        from .config import nonneg_init  # (config imports this module)

        reference_start = nonneg_init(deq_args) == "reference"
        for name, dim in zip(names, dims):
            if reference_start:
                reference_init_(getattr(module, name))
            constrain_nonnegative(module, "weight_norm", name=name, dim=dim)
        return cls(names, dims)

    def __call__(self, module: nn.Module) -> None:
        # Parametrizations are recomputed on access (and cached inside pcdeq solves), so there
        # is no per-forward weight to refresh.
        return None

    def remove(self, module: nn.Module) -> None:
        for name in self.names:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)

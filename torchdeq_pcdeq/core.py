"""The ``pcdeq`` core: TorchDEQ's default core with pcDEQ's solver, gradient and checks.

``get_deq(core="pcdeq")`` (or ``--core pcdeq``) returns a :class:`PcDEQCore`. It is TorchDEQ's
``DEQSliced`` (same call signature, same ``(z_out, info)`` result, same phantom-gradient
options) with:

* forward and backward solvers pinned to ``pcdeq_fixed_point`` (TorchDEQ's ``--b_solver`` flag
  cannot name a plugin solver), unless the config forces another one, with a warning;
* implicit differentiation by default, solved by plain iteration on the adjoint equation, with
  a hook variant that cannot re-enter itself; when ``f`` is one pcDEQ layer call
  (``lambda z: layer(z, x)``), in closed form from the solver's last step: no tracked
  application of ``f``, and each adjoint product one pass of ``W^T``
  (:class:`~torchdeq_pcdeq.backward.ClosedFormImplicitGradient`); with ``pcdeq_rate_bound``
  (and for ``pcdeq_sradius="rate_bound"``, in eval too) the certificate of that step's
  Jacobian, two passes of ``W``, is the forward's ``info["rate_bound"]`` and, in training, the
  certified backward's norm (:func:`~torchdeq_pcdeq.certify.closed_form_certificate`);
* pcDEQ defaults (relative tolerance ``1e-4``, 200 iterations; see
  :data:`~torchdeq_pcdeq.config.PCDEQ_CORE_DEFAULTS`), read from a private copy of the config;
* checks: the initial state must be one finite, nonnegative tensor; a runtime guard
  (``pcdeq_guard``) watches the iterates for signs that ``f`` is not positive-monotone; a solve
  that ends above its tolerance is flagged in ``info["converged"]`` and, per
  ``pcdeq_nonconvergence``, warned about or raised; so is a backward solve whose adjoint
  diverges, growing past ``1/eps**2`` or overflowing (its samples get the one-step gradient,
  never NaN);
* constrained weights (the pcDEQ layers, ``pcdeq_nonneg``) computed once per forward solve
  instead of once per iteration, in a cache of the solve's thread
  (:func:`~torchdeq_pcdeq.constraints.weight_cache`; other parametrizations compute theirs as
  usual); for the closed-form gradient, once per training step (the solve's weight is
  computed tracked and differentiated);
* from a zero initial state, the first iteration of the pcDEQ layers is ``sigma(x)``: the
  product with ``W``, exactly zero, is skipped (:func:`~torchdeq_pcdeq.layers.zero_state`).

Example:
    >>> import torch, torchdeq
    >>> from torchdeq_pcdeq import PcDEQLinear
    >>> f = PcDEQLinear(16)
    >>> deq = torchdeq.get_deq(core="pcdeq")
    >>> x = f.inject(torch.randn(4, 16))
    >>> z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    >>> bool(info["converged"].all())
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torchdeq.core import DEQSliced
from torchdeq.utils.layer_utils import MDEQWrapper

from .backward import (
    ClosedFormImplicitGradient,
    ImplicitGradient,
    ImplicitGradientOnGraph,
    closed_form_is_exact,
    under_torch_func,
)
from .certify import closed_form_certificate, closed_form_slope, min_injection, rate_bound, upper_bound
from .config import PCDEQ_OPTIONS, SOLVER_NAME, CoreArgs, get_deq_keywords, gradient_mode, resolve_core_config
from .constraints import weight_cache
from .conv_kernels import sign_exact_products
from .errors import ConvergenceError, InvalidInputError, did_you_mean, positive_int, warn, warn_once
from .layers import LastStep, observe_layer_calls, record_layer_chain, zero_state
from .reductions import extremes
from .solver import pcdeq_fixed_point

__all__ = ["PcDEQCore", "COMPILE_REASON"]


def _run_eagerly_under_compile(method):
    """``torch.compiler.disable`` with our reason (the ``reason`` argument exists from torch 2.8).

    Eager calls pay about 4 microseconds for the wrapper (benchmarked against the bare method).
    """
    try:
        return torch.compiler.disable(method, reason=COMPILE_REASON)
    except TypeError:
        return torch.compiler.disable(method)


_EAGER_FORWARD_LOCK = threading.Lock()


def _make_forward_eager_under_compile() -> None:
    """Wrap :meth:`PcDEQCore.forward` with :func:`_run_eagerly_under_compile`, once per process,
    when the first core is built: ``torch.compiler.disable`` imports ``torch._dynamo``, 2.4 s on
    2 CPU cores, which importing the package (and a script's error for a bad flag) need not pay.
    No forward can run before a core exists."""
    with _EAGER_FORWARD_LOCK:
        if "forward" not in PcDEQCore.__dict__ or PcDEQCore.__dict__["forward"] is not _EAGER_FORWARD:
            return
        PcDEQCore.forward = _run_eagerly_under_compile(_EAGER_FORWARD)


COMPILE_REASON = (
    "torchdeq_pcdeq: the pcdeq core's fixed-point solve runs eagerly under torch.compile (its "
    "iteration count and convergence checks depend on the data). The layers around it compile; "
    "fullgraph=True cannot hold a DEQ solve, so compile the encoder and head separately instead."
)


class PcDEQCore(DEQSliced):
    """TorchDEQ core for pcDEQ layers (registered as ``core="pcdeq"``).

    Args:
        args: a dict, argparse ``Namespace`` or ``DEQConfig``; never modified.
        **kwargs: config keys that override ``args``.

    Config keys (besides TorchDEQ's; see :data:`~torchdeq_pcdeq.config.PCDEQ_OPTIONS`):
        pcdeq_guard: ``"raise"`` (default), ``"warn"`` or ``"off"``.
        pcdeq_nonconvergence: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        pcdeq_check_every: ``"auto"`` (default) or an int.
        pcdeq_enclosure: certified enclosure of the forward solve (``info["error_bound"]``).
        pcdeq_enclosure_upper: start of the enclosure's upper sequence (default: read from the
            pcDEQ layers called by ``f``).
        pcdeq_rate_bound: ``info["rate_bound"]`` and a certified backward solve.
        pcdeq_sradius: ``"power"`` (default) or ``"rate_bound"`` for eval ``sradius_mode``.

    Example:
        >>> import torch, torchdeq
        >>> from torchdeq_pcdeq import PcDEQLinear
        >>> deq = torchdeq.get_deq(core="pcdeq", f_max_iter=30, pcdeq_rate_bound=True)
        >>> f = PcDEQLinear(8)
        >>> x = f.inject(torch.randn(3, 8))
        >>> z_out, info = deq(lambda z: f(z, x), torch.zeros(3, 8))
        >>> bool(info["converged"].all()), bool((info["rate_bound"] < 1).all())
        (True, True)
        >>> z_out[-1].sum().backward()  # implicit gradient, by plain iteration on the adjoint
        >>> [tuple(p.grad.shape) for p in f.parameters()]  # weight norm: scale and direction
        [(8, 1), (8, 8)]
    """

    def __init__(self, args=None, **kwargs):
        _make_forward_eager_under_compile()
        config = resolve_core_config(args, {**get_deq_keywords(args), **kwargs})
        super().__init__(config)
        self.args = CoreArgs(config)
        self.guard = config["pcdeq_guard"]
        self.nonconvergence = config["pcdeq_nonconvergence"]
        self.check_every = config["pcdeq_check_every"]
        self.enclosure = config["pcdeq_enclosure"]
        self.enclosure_upper = config["pcdeq_enclosure_upper"]
        self.certify_rate = config["pcdeq_rate_bound"]
        self.sradius_method = config["pcdeq_sradius"]
        self.gradient = gradient_mode(config)
        self.configured_f_solver = self.f_solver  # (a solver swapped in later is reported)
        self.owns_b_solver = config["b_solver"] == SOLVER_NAME
        self.certify_backward = self.certify_rate and self.owns_b_solver
        b_solver_kwargs = dict(max_iter=self.b_max_iter, tol=self.b_tol, stop_mode=self.b_stop_mode)
        if self.owns_b_solver:
            # The adjoint may diverge where the forward stopped short of z* (_diverged_message).
            b_solver_kwargs["nonfinite"] = "report"
        if self.gradient in ("ift", "hook_ift"):
            make = ImplicitGradient if self.gradient == "ift" else ImplicitGradientOnGraph
            recorded = make(self.b_solver, b_solver_kwargs)
            self.produce_grad[-1] = ClosedFormImplicitGradient(self.b_solver, b_solver_kwargs, recorded)
        _check_iteration_budgets(self)
        self._built = True

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_built"):
            if name in _FIXED_WHEN_BUILT:
                key, into = _FIXED_WHEN_BUILT[name]
                raise InvalidInputError(
                    f"core.{name} was read when the core was built, into {into}: a value assigned "
                    f"now would be ignored. Build a new core with it, e.g. torchdeq.get_deq(core.args, "
                    f"{key}=...), which checks it as well."
                )
            if (name in PCDEQ_OPTIONS or name in _GRADIENT_KEYS) and not hasattr(self, name):
                raise InvalidInputError(
                    f"core.{name} is a config key, which a core reads when it is built, not one of its "
                    f"attributes: a value assigned now would be ignored. Build a new core with it, e.g. "
                    f"torchdeq.get_deq(core.args, {name}=...)."
                )
        super().__setattr__(name, value)

    # The solve's length and its checks depend on the data (a host sync per convergence check),
    # which a compiled graph cannot express: torch.compile runs the solve, and every call of
    # `func` inside it, eagerly and compiles the model around it (_make_forward_eager_under_compile).
    def forward(
        self,
        func,
        z_init: Tensor,
        solver_kwargs: dict | None = None,
        sradius_mode: bool = False,
        backward_writer=None,
        **kwargs,
    ):
        """Solve ``z = func(z)`` from ``z_init``; see ``torchdeq.core.DEQSliced.forward``.

        ``z_init`` is one tensor, or a list or tuple of tensors (several states, such as the
        resolutions of a multi-scale model) for ``func(*states)`` returning as many: as TorchDEQ
        does, they are solved as one ``(batch, N)`` state, their flattened entries side by side,
        to which the tolerance and every guarantee apply.

        Returns:
            ``(z_out, info)``: tracked states in training, ``[z_star]`` in eval (each a list of
            tensors for a list of states). ``info`` holds TorchDEQ's keys plus ``converged``
            (per-sample bool), ``trace_steps``, ``min_injection`` (per sample, over the pcDEQ
            layers called by ``func``; NaN without any) and, when enabled, ``error_bound`` and
            ``rate_bound``.
        """
        if kwargs:  # (TorchDEQ's forward takes them and reads none)
            _warn_unknown_keywords(kwargs)
        if isinstance(z_init, (list, tuple)):
            packed = _PackedStates(func, z_init)
            z_out, info = self._forward(
                packed, packed.list2vec(z_init), solver_kwargs, sradius_mode, backward_writer
            )
            return [packed.vec2list(z) for z in z_out], info
        return self._forward(func, z_init, solver_kwargs, sradius_mode, backward_writer)

    def _forward(self, func, z_init, solver_kwargs, sradius_mode, backward_writer):
        starts_at_zero = _check_initial_state(z_init)
        self._check_context(sradius_mode)
        solver_kwargs = self._checked_solver_kwargs(solver_kwargs)
        # From z_init = 0 the first iterate is sigma(x): the layers skip that product with W.
        # The certificates (the enclosure's bound, in training that of f applied to its
        # midpoint; a rate bound taken at a state below z*) cover the rounding of sign-exact
        # products only (conv_kernels).
        rate_sradius = sradius_mode and self.sradius_method == "rate_bound"
        call = _Call(self, starts_at_zero, self.certify_rate or (rate_sradius and not self.training))
        # (restored after the call: a core solving inside f sets its own for its own solves)
        outer, _LAST_SOLVE.call = getattr(_LAST_SOLVE, "call", None), call
        certified = self.enclosure or self.certify_rate or rate_sradius
        exact = sign_exact_products() if certified else contextlib.nullcontext()
        try:
            with zero_state(z_init if starts_at_zero else None), exact:
                z_out, info = super().forward(func, z_init, solver_kwargs, sradius_mode, backward_writer)
        finally:
            _LAST_SOLVE.below = None  # the solve's state for _sradius: not kept past this call
            _LAST_SOLVE.call = outer
        if self.training and "error_bound" in info:
            # Training returns f applied to the midpoint (for the gradient), not the midpoint:
            # f(l) <= f(mid) <= f(u) and f(l) <= z* <= f(u), so the whole gap bounds its error.
            info["error_bound"] = 2 * info["error_bound"]
        self._check_converged(info, self.f_tol, self.f_stop_mode, "forward")
        return z_out, info

    def _checked_solver_kwargs(self, solver_kwargs) -> dict | None:
        """A copy of the per-call ``solver_kwargs``, its ``f_max_iter`` an int that fits the states
        (``None`` keeps the configured budget).

        TorchDEQ passes the solver ``x0``, ``max_iter``, ``tol`` and ``stop_mode`` itself (a second
        value is Python's "got multiple values" TypeError), and splits a per-call ``f_max_iter``
        over ``n_states`` / ``indexing`` into segments that must each get an iteration.
        """
        if solver_kwargs is None:
            return None
        if not isinstance(solver_kwargs, Mapping):
            raise InvalidInputError(
                f"solver_kwargs must be a dict of solver options, got {type(solver_kwargs).__name__}."
            )
        for key, instead in _SET_BY_THE_CORE.items():
            if key in solver_kwargs:
                raise InvalidInputError(
                    f"solver_kwargs cannot hold {key!r}: the core passes it to the solver itself. {instead}"
                )
        options = dict(solver_kwargs)
        if options.get("f_max_iter", 0) is None:  # TorchDEQ ignores it in training: the budget stays
            del options["f_max_iter"]
        if "f_max_iter" in options:
            budget = options["f_max_iter"] = positive_int(
                "solver_kwargs['f_max_iter']", options["f_max_iter"]
            )
            segments = self._compute_f_iter(budget)
            if self.training and min(segments) < 1:
                raise InvalidInputError(
                    f"solver_kwargs['f_max_iter']={budget} is split by {_states_setting(self)} into "
                    f"solver segments of {segments} iterations; each needs at least one. Pass a larger "
                    "f_max_iter for this call."
                )
        return options

    def _check_context(self, sradius_mode: bool) -> None:
        """Contexts in which the requested computation cannot be right; say so before solving."""
        tracked = self.training and torch.is_grad_enabled()
        if tracked and getattr(parametrize, "_cache_enabled", 0):
            raise InvalidInputError(
                "The pcdeq core was called in training while torch.nn.utils.parametrize.cached() is "
                "active, in this thread or another (its cache is one for the whole process): cached "
                "weights carry no gradient, so the weights would silently not train. Call it outside "
                "any cached() block (the core caches weights inside its solve itself, per thread)."
            )
        power = sradius_mode and self.sradius_method == "power" and not self.training  # (eval only)
        if power and torch.is_inference_mode_enabled():
            # (the rate bound's forward-mode products run on a copy made outside inference mode)
            raise InvalidInputError(
                "sradius_mode with pcdeq_sradius='power' cannot run under torch.inference_mode(): "
                "TorchDEQ's power method differentiates f at z* with autograd, which inference "
                "tensors do not allow. Evaluate under torch.no_grad(), or pass "
                "pcdeq_sradius='rate_bound' (a certified upper bound, which runs here)."
            )

    @property
    def owns_f_solver(self) -> bool:
        """Whether the forward solver is ``pcdeq_fixed_point``, which the guard and the enclosure
        need; read at each solve, so that a solver assigned after construction counts."""
        return self.f_solver is pcdeq_fixed_point

    def _check_swapped_f_solver(self) -> None:
        """``core.f_solver = ...`` after construction: what the config check would have said."""
        swapped = self.f_solver
        name = getattr(swapped, "__name__", swapped)
        if self.enclosure and not self.owns_f_solver:
            raise InvalidInputError(
                f"This core's f_solver was replaced by {name!r} after "
                f"it was built, and pcdeq_enclosure=True asks for a certified forward solve, which "
                f"only {SOLVER_NAME!r} computes. Build a core without pcdeq_enclosure for that solver."
            )
        if getattr(self, "_reported_f_solver", None) is not swapped:
            self._reported_f_solver = swapped
            if not self.owns_f_solver:
                warn(
                    f"This core's f_solver was replaced by {name!r} "
                    f"after it was built: its solves get no guard (pcdeq_guard), which only "
                    f"{SOLVER_NAME!r} applies. Pass f_solver=... when building the core instead, which "
                    "checks the choice and says what it loses."
                )

    def _solve_fixed_point(self, deq_func, z_init, f_max_iter=None, solver_kwargs=None, **kwargs):
        options = {}
        if self.f_solver is not getattr(self, "configured_f_solver", self.f_solver):  # (older pickles)
            self._check_swapped_f_solver()
        _LAST_SOLVE.chain = None
        call = _current_call(self)
        # The solve's last layer call gives the closed-form gradient (backward.ClosedFormImplicitGradient),
        # which differentiates the W the solve used (tracked), and the rate bound in closed form.
        closed_form_gradient = self._closed_form_gradient()
        if closed_form_gradient or call.wants_rate:
            chain = record_layer_chain(track_weights=closed_form_gradient)
        else:
            chain = contextlib.nullcontext()
        # Inside the (no-grad) solve every constrained weight is computed once, not per call
        # (per thread: parametrize.cached() would switch on one cache for the whole process);
        # the layers f calls report their activation and injection.
        with weight_cache(), observe_layer_calls() as seen, chain as recorded:
            if self.owns_f_solver:
                options = {"guard": self.guard, "check_every": self.check_every}
                if self.enclosure:
                    upper = self.enclosure_upper
                    options.update(
                        enclosure=True, upper=upper if upper is not None else lambda: upper_bound(seen)
                    )
            options.update(solver_kwargs or {})
            z_star, info = self._run_solver(deq_func, z_init, f_max_iter, options, **kwargs)
            info["min_injection"] = min_injection(seen, z_star)
            # At a state below z* (the enclosure's lower sequence; plain iterates from 0) the
            # Jacobian dominates the one at z*, so q taken there bounds the spectral radius at z*.
            below, rate, certified = info.get("lower", z_star), None, None
            if call.wants_rate:
                _warn_if_above(below is z_star, call.from_zero)
                certified = _certified_step(recorded, z_star) if below is z_star else None
                rate = (
                    rate_bound(deq_func, below) if certified is None else certified.certificate.rate.clone()
                )
                if self.certify_rate:
                    info["rate_bound"] = rate  # (a clone: the backward keeps the certificate's own)
            # for _sradius, which TorchDEQ calls in eval with z_star only
            _LAST_SOLVE.below = None if self.training else (self, below, rate)
        if closed_form_gradient:
            _LAST_SOLVE.chain = (self, recorded, certified)
        return z_star, info

    def _run_solver(self, deq_func, z_init, f_max_iter, options: dict, **kwargs):
        if not (self.training and self.enclosure and self.owns_f_solver):
            return super()._solve_fixed_point(deq_func, z_init, f_max_iter, options, **kwargs)
        # Training returns f(midpoint), within the whole gap of z* (forward doubles error_bound):
        # the enclosure solves to half the tolerance, so that the returned state meets it. This
        # is TorchDEQ's call but for tol, which it passes itself.
        options = {key: value for key, value in options.items() if key != "f_max_iter"}
        with torch.no_grad():
            half = dict(tol=self.f_tol / 2, stop_mode=self.f_stop_mode)
            z_star, _, info = self.f_solver(deq_func, x0=z_init, max_iter=f_max_iter, **half, **options)
        return z_star, info

    def _closed_form_gradient(self) -> bool:
        """Whether a solve now may be differentiated in closed form (then its chain is recorded)."""
        return (
            self.training
            and torch.is_grad_enabled()
            and self.gradient in ("ift", "hook_ift")
            and self.owns_f_solver
            and not self.enclosure
        )

    def take_last_step(self, z_star: Tensor) -> LastStep | None:
        """The last step of this core's latest solve in this thread, if it returned ``z_star``
        by iterating one pcDEQ layer with a closed-form operator VJP; at most once per solve."""
        latest, _LAST_SOLVE.chain = _LAST_SOLVE.chain, None
        if latest is None or latest[0] is not self:
            return None
        step, certified = _closed_form_step(latest[1], z_star), latest[2]
        if step is None or certified is None:
            return step
        return dataclasses.replace(step, certificate=certified.certificate, slope=certified.slope)

    def _sradius(self, deq_func, z_star):
        if self.sradius_method == "rate_bound":
            latest, _LAST_SOLVE.below = getattr(_LAST_SOLVE, "below", None), None
            taken = latest is not None and latest[0] is self and latest[2] is not None
            if taken and latest[1].shape == z_star.shape:
                # forward asked the solve for q (_Call.wants_rate): taken below z*, at the
                # enclosure's lower sequence (not its midpoint) or at the plain solve's last step
                return latest[2].clone()
            # called outside this core's forward: q at the state given
            _warn_if_above(True, _current_call(self).from_zero)
            with weight_cache():
                return rate_bound(deq_func, z_star)
        # TorchDEQ's power method flips requires_grad on z_star in place, which would make the
        # eval-mode output a leaf that records graphs downstream; give it a copy instead.
        return super()._sradius(deq_func, z_star.detach().clone())

    def after_backward(self, info: dict, writer) -> None:
        """Statistics of a backward solve: to ``writer``, then the non-convergence policy."""
        if writer is not None:
            writer(info)
        self._check_converged(info, self.b_tol, self.b_stop_mode, "backward")

    def _check_converged(self, info: dict, tol: float, stop_mode: str, which: str) -> None:
        foreign = "converged" not in info  # a solver other than pcdeq_fixed_point
        if foreign:
            info["converged"] = info[f"{stop_mode}_lowest"] <= tol
        if self.nonconvergence == "ignore":
            return
        if bool(info["converged"].all()):  # the common case: one reduction, one sync
            return
        if which == "backward" and "diverged" in info and bool(info["diverged"].any()):
            message = _diverged_message(info, tol, stop_mode)
        else:
            # the iteration budget of this solve: eval-mode forward solves have their own
            budget = (
                "b_max_iter" if which == "backward" else "f_max_iter" if self.training else "eval_f_max_iter"
            )
            message = _unconverged_message(info, tol, stop_mode, which, budget, foreign)
        if self.nonconvergence == "raise":
            raise ConvergenceError(message)
        warn(message)


_EAGER_FORWARD = PcDEQCore.forward  # the solve itself, wrapped when the first core is built


def _certified_step(chain, z_star: Tensor) -> LastStep | None:
    """The solve's last step with the rate certificate of its Jacobian, in closed form, where it
    returned ``z_star`` by iterating one pcDEQ layer in the state's dtype (else ``None``).

    The step ``z_star = sigma(W z_in + x)`` starts from the iterate before ``z_star``, below z*
    from 0: three products with ``W`` (``sigma'`` from the pre-activation, then
    ``closed_form_certificate``) certify its Jacobian instead of two forward-mode products
    through ``f``. It is the Jacobian at which the closed-form gradient linearizes, so the
    backward's certified norm is the forward's bound, and its ``sigma'`` the step's ``slope``.
    """
    step = None if chain is None else _closed_form_step(chain, z_star)
    if step is None or not closed_form_is_exact(step, z_star):
        return None
    weight = step.operator_weight
    slope = closed_form_slope(step.layer, weight, step.z_in, step.x)
    return dataclasses.replace(
        step, slope=slope, certificate=closed_form_certificate(step.layer, weight, step.z_in, slope)
    )


def _closed_form_step(chain, z_star: Tensor) -> LastStep | None:
    """The chain's last step if it returned ``z_star`` and its layer has a closed-form VJP."""
    step = chain.last_step(z_star)
    if step is None or not step.layer.has_closed_form_gradient():
        return None
    return step


def _unconverged_message(
    info: dict, tol: float, stop_mode: str, which: str, budget: str, foreign: bool = False
) -> str:
    failed = int((~info["converged"]).sum())
    best = info[f"{stop_mode}_lowest"].max().item()
    iters = int(info["nstep"].max().item())
    prefix = "f" if which == "forward" else "b"
    # pcdeq_fixed_point's nstep of an unconverged sample is the last iteration; TorchDEQ's
    # solvers give the iteration of the best iterate they return, and run their whole budget.
    ran, returned = f"within {iters} iteration{'' if iters == 1 else 's'}", ""
    if foreign:
        ran = f"within its {budget} budget"
        returned = f"; the solver returns each sample's best iterate, here from iterations up to {iters}"
    return (
        f"pcdeq {which} solve: {failed} of {info['converged'].numel()} samples did not reach "
        f"{stop_mode} tol {tol:g} {ran} (best {stop_mode} residual reached "
        f"by the worst sample: {best:.3g}{returned}). Try a larger {budget} or a looser "
        f"{prefix}_tol; slow convergence of pcDEQ-1 layers comes from tiny injections or "
        "weights grown large (docs/guarantees.md). Set pcdeq_nonconvergence='ignore' to "
        "silence this."
    )


def _diverged_message(info: dict, tol: float, stop_mode: str) -> str:
    """The backward solve's iterates grew without bound for some samples (``info["diverged"]``)."""
    diverged = info["diverged"]
    other = int((~info["converged"] & ~diverged).sum())
    also = f"; {other} more did not reach {stop_mode} tol {tol:g}" if other else ""
    return (
        "pcdeq backward solve: the adjoint iteration diverged (its iterates grew past 1/eps^2 times "
        f"their size at the first check, or until their norm overflowed) for {int(diverged.sum())} "
        f"of {diverged.numel()} samples{also}. At the fixed point of "
        "a pcDEQ layer the adjoint contracts, so the state the forward solve returned is likely too "
        "far from it: the relative 2-norm residual weighs entries by size and misses small entries "
        "still growing (tiny injections, large weights). Use a smaller f_tol, or (bounded "
        "activations) pcdeq_enclosure=True to stop the forward on a bound of every entry's "
        "error. Unless this raises, those samples get the one-step (Jacobian-free) gradient "
        "instead of the implicit one; set pcdeq_nonconvergence='ignore' to silence this."
    )


# TorchDEQ's config keys for the gradient, read when a core is built (not attributes).
_GRADIENT_KEYS = ("ift", "hook_ift", "grad", "tau", "sup_gap", "sup_loc", "n_states")

# Attributes read when a core is built (name -> the config key that sets it, what it went into).
_FIXED_WHEN_BUILT = {
    "f_max_iter": ("f_max_iter", "the training solve's segments (eval_f_max_iter can be assigned)"),
    "indexing": ("indexing", "the training solve's segments (set by n_states or indexing, with f_max_iter)"),
    "b_max_iter": ("b_max_iter", "the backward solve's options"),
    "b_tol": ("b_tol", "the backward solve's options"),
    "b_stop_mode": ("b_stop_mode", "the backward solve's options"),
    "b_solver": ("b_solver", "the implicit gradient"),
    "gradient": ("ift", "the gradient it attaches (set by ift, hook_ift or, for phantom gradients, grad)"),
    "certify_rate": ("pcdeq_rate_bound", "the implicit gradient (certified backward solve)"),
    "certify_backward": ("pcdeq_rate_bound", "the implicit gradient (certified backward solve)"),
}

# What TorchDEQ passes the forward solver itself, and where the user sets it instead.
_SET_BY_THE_CORE = {
    "x0": "The initial state is the core's second argument, z_init.",
    "max_iter": "Set the budget of this call with solver_kwargs={'f_max_iter': n}, or f_max_iter "
    "(eval_f_max_iter in eval) in the config.",
    "tol": "Set f_tol in the config.",
    "stop_mode": "Set f_stop_mode in the config.",
}


# Per thread (a core may be shared by threads): the forward call under way (_Call), the chain of
# layer calls of the latest solve, handed from the solve to the gradient producer that
# TorchDEQ's forward calls right after it, and a state of that solve below z* for the rate bound.
_LAST_SOLVE = threading.local()


@dataclasses.dataclass(frozen=True)
class _Call:
    """What a core's ``forward`` tells the solves TorchDEQ runs for it (``_solve_fixed_point``,
    ``_sradius``), which TorchDEQ calls with arguments of its own."""

    core: PcDEQCore
    from_zero: bool  # z_init is 0: plain iterates rise to z*, and stay below it
    wants_rate: bool  # pcdeq_rate_bound, or sradius_mode by the rate bound in eval


def _current_call(core: PcDEQCore) -> _Call:
    """The ``forward`` call of ``core`` under way in this thread (defaults outside one)."""
    call = getattr(_LAST_SOLVE, "call", None)
    return call if call is not None and call.core is core else _Call(core, True, core.certify_rate)


def _warn_if_above(plain: bool, from_zero: bool) -> None:
    """Say once that a rate bound taken at the state of a plain solve from above 0 may be low."""
    if not plain or from_zero:
        return
    warn_once(
        "rate bound above the fixed point",
        "The rate bound q is taken at the solve's returned state (or, in closed form, at the "
        "iterate before it), which a plain solve from a nonzero z_init may leave above z*, where "
        "q can fall below the spectral radius at z*: it is then an estimate, not a bound. Start "
        "from torch.zeros_like(x), or set pcdeq_enclosure=True (q at its lower sequence), for a "
        "certified q.",
    )


def _check_iteration_budgets(core: PcDEQCore) -> None:
    """Every solver segment and the eval solve need at least one iteration."""
    segments = core.indexing
    if core.enclosure and len(segments) > 1:
        raise InvalidInputError(
            f"pcdeq_enclosure certifies one solve from 0 and from the activation's supremum, but "
            f"{_states_setting(core)} splits the solve into segments that would each restart the "
            "bracket. Use n_states=1 and no indexing with the enclosure."
        )
    if min(segments) < 1:
        if min(segments[:-1], default=1) < 1 and core.args.get("n_states", 1) <= 1:
            remedy = "The indices must be iteration numbers that strictly increase from 1 on."
        else:
            remedy = "Raise f_max_iter, or use fewer states or earlier indices."
        raise InvalidInputError(
            f"{_states_setting(core)} splits f_max_iter={core.f_max_iter} into solver segments of "
            f"{segments} iterations; each needs at least one. {remedy}"
        )
    if core.eval_f_max_iter < 1:
        raise InvalidInputError(
            f"The eval solve gets {core.eval_f_max_iter} iterations (eval_f_max_iter="
            f"{core.args.get('eval_f_max_iter')!r}, eval_factor={core.args.get('eval_factor')!r}, "
            f"f_max_iter={core.f_max_iter}); it needs at least one. Raise eval_factor or set "
            "eval_f_max_iter."
        )


def _states_setting(core: PcDEQCore) -> str:
    """The key that sets the training states, as TorchDEQ reads it (n_states over indexing)."""
    n_states = core.args.get("n_states", 1)
    return f"n_states={n_states}" if n_states > 1 else f"indexing={core.args.get('indexing')!r}"


_FORWARD_KEYWORDS = ("solver_kwargs", "sradius_mode", "backward_writer")


def _warn_unknown_keywords(kwargs: dict) -> None:
    names = sorted(kwargs)
    within = [key for key in _FORWARD_KEYWORDS if names[0] in key]  # (writer: backward_writer)
    hint = f" Did you mean {within[0]!r}?" if within else did_you_mean(names[0], _FORWARD_KEYWORDS)
    warn(
        f"The pcdeq core ignores the keyword arguments {names} of its call, as TorchDEQ's cores "
        f"do: a core is called with (func, z_init) and the keywords {list(_FORWARD_KEYWORDS)}.{hint}"
    )


class _PackedStates(MDEQWrapper):
    """TorchDEQ's packing of several states into one ``(batch, N)`` tensor (its ``MDEQWrapper``),
    with the states and ``func``'s output checked: packing would otherwise turn a mismatch into
    a wrong shape far from its cause, or into a silent type promotion."""

    def __init__(self, func, z_init):
        if not z_init or not all(isinstance(z, Tensor) and z.dim() >= 2 for z in z_init):
            raise InvalidInputError(
                f"The pcdeq core takes several states as a non-empty list or tuple of tensors of shape "
                f"(batch, ...), batch dimension first, got {_describe(z_init)}."
            )
        kinds = {(z.shape[0], z.dtype, z.device) for z in z_init}
        if len(kinds) > 1:
            got = [(z.shape[0], z.dtype, z.device.type) for z in z_init]
            raise InvalidInputError(
                f"The states of one pcdeq core must share their batch size, dtype and device, got "
                f"(batch, dtype, device) {got}. Convert them alike before the core."
            )
        super().__init__(func, z_init)

    def __call__(self, z_hid: Tensor) -> Tensor:
        out = self.func(*self.vec2list(z_hid))
        shapes = [getattr(z, "shape", None) for z in out] if isinstance(out, (list, tuple)) else None
        if shapes != self.z_shape or any(z.dtype != z_hid.dtype for z in out):
            raise InvalidInputError(
                f"f was called with {len(self.z_shape)} states and must return as many, of the same "
                f"shapes {[tuple(shape) for shape in self.z_shape]} and dtype {z_hid.dtype}, got "
                f"{_describe(out)}."
            )
        return self.list2vec(out)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of [{', '.join(_describe(v) for v in value)}]"
    return type(value).__name__


def _check_initial_state(z_init) -> bool:
    """Raise unless ``z_init`` is one finite, nonnegative state tensor; return whether it is zero."""
    if not isinstance(z_init, Tensor):
        raise InvalidInputError(
            f"The pcdeq core takes the initial state as one tensor, or several as a list or tuple "
            f"of tensors, got {type(z_init).__name__}."
        )
    if under_torch_func():
        raise InvalidInputError(
            "The pcdeq core cannot run under torch.func transforms (vmap, grad, jacrev, jvp): its "
            "implicit gradient is an autograd.Function without torch.func rules, and its solver "
            "reads the iterates' values to stop, which vmap hides. Differentiate with "
            "loss.backward() (the core's implicit gradient) and batch along the batch dimension."
        )
    if z_init.dim() < 2 or not z_init.is_floating_point():
        raise InvalidInputError(
            f"The pcdeq core expects a floating-point initial state of shape (batch, ...) with the "
            f"batch dimension first, got {z_init.dtype} of shape {tuple(z_init.shape)}."
        )
    if z_init.numel() == 0:
        raise InvalidInputError(
            f"The pcdeq core got an empty initial state of shape {tuple(z_init.shape)}; expected at "
            "least one sample with at least one entry. Skip empty batches before the model."
        )
    if torch.is_autocast_enabled(z_init.device.type):
        fast = torch.get_autocast_dtype(z_init.device.type)
        if z_init.dtype.itemsize < 4 and z_init.dtype != fast:  # (PyTorch's cast rules fail on it)
            raise InvalidInputError(
                f"The pcdeq core under {fast} autocast got a {z_init.dtype} initial state; autocast "
                f"mixes float32 with {fast} only. Keep the model and its inputs in float32 "
                "(model.float()) and let autocast lower them, or run outside autocast."
            )
    with torch.no_grad():
        low, high = torch.stack(extremes(z_init)).tolist()  # NaN and Inf show in the extremes
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidInputError(
            "The initial state holds NaN or Inf; expected finite values. Start from torch.zeros_like(x)."
        )
    if low < 0:
        raise InvalidInputError(
            f"The initial state has negative entries (min {low:.3g}); pcDEQ "
            "iterates live in the nonnegative orthant. Start from torch.zeros_like(x)."
        )
    return high == 0

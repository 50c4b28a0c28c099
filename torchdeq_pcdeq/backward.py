"""Implicit differentiation for the pcdeq core, by plain iteration on the adjoint.

At the fixed point ``z* = f(z*)`` the loss gradient ``g`` is pulled back through
``y = J*^T y + g`` with ``J* = df/dz (z*)``. For a pcDEQ layer ``J* >= 0`` and its spectral
radius is below 1 (docs/method.md, section 3), so plain iteration on ``y`` converges.

Two gradient producers with TorchDEQ's signature ``(trainer, func, z_pred, writer=None)``:

* :class:`ImplicitGradient` (default): the backward recomputes ``f`` at ``z*``; two graphs of ``f`` in
  memory during ``backward()``. An ``f`` that computes differently by then (a closure over a
  variable rebound since, a dropout mask reset) is refused with a typed error.
* :class:`ImplicitGradientOnGraph` (``hook_ift=True``): the adjoint products reuse the graph of the tracked
  application ``f(z*)``; one graph. TorchDEQ implements it as a tensor hook on ``f(z*)`` that
  refers to ``f(z*)`` and removes itself on first use through a handle stored on the core, so
  calling the core twice before ``backward()`` makes a hook re-enter itself without bound, and a
  second backward through a retained graph silently falls back to a one-step gradient. A hook
  that stays registered (this package's first version) keeps that mutual reference for good: it
  runs through the C++ graph, which Python's garbage collector cannot see, and every training
  step leaked three state-sized tensors. Here an ``autograd.Function`` placed after ``f(z*)``
  saves it: its graph points upstream only, so it is freed with the step, and every backward of
  a retained graph solves again.

The core wraps the one it uses in :class:`ClosedFormImplicitGradient`, which differentiates in closed
form, with no recorded ``f``, when ``f`` is one pcDEQ layer call, and calls it otherwise. A
certified backward solve takes its rate certificate from the core's forward in the closed form
(:func:`~torchdeq_pcdeq.certify.closed_form_certificate`), else by automatic differentiation
of ``f``.

The producers ask the core that calls them (``trainer``) what to do after each backward solve
(``trainer.after_backward``: statistics to ``writer``, non-convergence policy) and whether to
certify it (``trainer.certify_backward``), so a deep copy of the core behaves as its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, autograd

from .certify import closed_form_certificate, closed_form_slope, rate_certificate
from .conv_kernels import sign_exact_products
from .errors import InvalidInputError, NonFiniteError, warn_once
from .layers import LastStep
from .reductions import extremes
from .rounding import GUARD_ULPS, arithmetic_dtype, resolution_floor, under_autocast

__all__ = ["ImplicitGradient", "ImplicitGradientOnGraph", "ClosedFormImplicitGradient"]


def _solve_adjoint(
    trainer, b_solver, b_solver_kwargs, func, z_in, vjp, grad, writer, layout=None, certificate=None
) -> Tensor:
    """Solve ``y = J^T y + grad`` with ``J^T y = vjp(y)`` at ``z_in``; report through the trainer.

    With ``trainer.certify_backward``, the solve runs in the ``v``-weighted l1 norm in which the
    adjoint map contracts by the rate bound ``q`` computed at ``z_in`` (``certificate``, else
    :func:`~torchdeq_pcdeq.certify.rate_certificate` of ``func``), and stops on the certified
    bound ``(q ||y_k - y_{k-1}||_v + rounding) / (1 - q)``: the error of this solve, for the
    Jacobian at ``z_in``, not the forward's (docs/guarantees.md). The iterates are held in the memory
    format ``layout`` (``None``: ``z_in``'s), so that no product converts them.

    In float16 arithmetic (see :func:`_solve_in_range`), a loss gradient holding Inf or NaN
    under autocast is an overflowed ``GradScaler`` step: it is passed on unsolved.
    """
    grad = _in_layout(grad, layout, z_in)
    arithmetic = arithmetic_dtype(z_in)
    half = arithmetic == torch.float16
    if half and under_autocast(z_in) and not bool(torch.isfinite(grad).all()):
        # GradScaler needs autocast (it refuses float16 parameters): the non-finite gradient
        # reaches the parameters, and the scaler skips the step and lowers its scale.
        _warn_loss_scale_overflow()
        return grad
    kwargs = b_solver_kwargs
    if trainer.certify_backward and arithmetic.itemsize < 4:
        _warn_uncertifiable_precision(arithmetic)
    elif trainer.certify_backward:
        rate, weights = certificate if certificate is not None else rate_certificate(func, z_in.detach())
        worst = rate.max().item()
        if worst < 1:
            kwargs = {**kwargs, "weights": weights, "rate": rate}
            if trainer.f_stop_mode == trainer.b_stop_mode == "rel" and trainer.b_tol < trainer.f_tol:
                _warn_forward_coarser(trainer.f_tol, trainer.b_tol)
        else:
            _warn_uncertifiable(worst, arithmetic_dtype(z_in))

    def solve(rhs: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
        def adjoint(y: Tensor, tau: float = 1.0) -> Tensor:
            step = vjp(y) + rhs
            return step if tau == 1.0 else tau * step + (1 - tau) * y

        # Starting from rhs rather than 0 (TorchDEQ's choice) saves the first product, J^T 0 = 0.
        try:
            y, _, info = b_solver(adjoint, rhs, **kwargs)
        except NonFiniteError as error:
            # The core's adjoint solves report diverging samples (nonfinite="report"): a start
            # that was never finite is the loss gradient's fault. Anything else keeps its message.
            if bool(torch.isfinite(rhs).all()):
                raise
            raise NonFiniteError(
                "The loss gradient arriving at the pcdeq core holds NaN or Inf, so the implicit "
                "gradient cannot be computed. Check the loss and the layers after the DEQ (a log or "
                "a division by zero, or a diverged optimizer step)."
            ) from error
        return y, info

    if "weights" not in kwargs and _beyond_norm_range(grad):
        y, info = _solve_in_range(solve, grad, kwargs, half_model=False)
    else:
        y, info = solve(grad, kwargs)
    if half and "diverged" in info and bool(info["diverged"].any()):
        y, info = _solve_in_range(solve, grad, kwargs, half_model=not under_autocast(z_in))
    trainer.after_backward(info, writer)
    return y


def _beyond_norm_range(grad: Tensor) -> bool:
    """Whether some sample of ``grad`` is too small or too large for the residual test's 2-norms.

    The plain solve stops on ``||y_k - y_{k-1}||_2 / ||y_k||_2``, whose squares underflow for
    a float32 (or bfloat16) sample whose entries are all below about ``1e-19`` (float64:
    ``1e-154``): both norms then read 0 and the sample counts as converged at the first check,
    with its gradient up to half wrong, silently. A loss that a confident prediction makes tiny
    (cross-entropy's gradient is ``1 - p``) gets there. Squares overflow at the other end. Such
    a gradient is solved scaled into range (:func:`_solve_in_range`; the equation is linear).
    float16 iterates, whose norms are taken in float32, are never out of its range. One
    reduction and one host sync per backward.
    """
    acc = torch.promote_types(grad.dtype, torch.float32)
    if grad.dtype != acc and grad.dtype != torch.bfloat16:
        return False
    info = torch.finfo(acc)
    # Within these limits the squares of a sample's largest entries, and of its step at the
    # finest tolerance (2 ulps of them), stay normal numbers, and their sum stays finite.
    low = math.sqrt(info.tiny) / info.eps
    high = math.sqrt(info.max / grad[0].numel()) * info.eps
    magnitude = torch.linalg.vector_norm(grad.detach(), ord=math.inf, dim=tuple(range(1, grad.dim())))
    smallest, largest = torch.stack(extremes(magnitude)).tolist()
    return smallest < low or largest > high  # (a zero sample too: scaled, it is solved alike)


def _solve_in_range(solve: Callable, grad: Tensor, kwargs: dict, half_model: bool) -> tuple[Tensor, dict]:
    """The adjoint solve for ``grad`` scaled into range: after an overflow of float16 iterates,
    or before a solve whose residual norms would leave their dtype's range
    (:func:`_beyond_norm_range`).

    float16 ends at 65,504, and loss scaling (``GradScaler``) brings gradients close to it on
    purpose; the adjoint grows by up to ``1 / (1 - q)`` and can overflow, which the solve
    reports as divergence. The equation is linear: it is solved for ``grad / scale``, a power
    of two that brings each sample's maximum to ``[1, 2)`` (absolute stopping: the batch's, with
    the tolerance scaled alike), and the solution multiplied back. Samples that diverge again
    really diverge. Only after an overflow: the scaled solve rounds entries below ``2^-14`` of
    the maximum to float16's subnormals, which loss scaling exists to avoid. A solution that is
    itself beyond float16's range is Inf once multiplied back, in the samples that hold it:
    under autocast the signal a GradScaler backs off from; in a float16 model (``half_model``),
    which no GradScaler accepts, said with a warning.
    """
    rel = kwargs.get("stop_mode", "rel") == "rel"
    magnitude = grad.detach().abs()
    magnitude = magnitude.amax(dim=tuple(range(1, grad.dim())), keepdim=True) if rel else magnitude.amax()
    # frexp: magnitude = mantissa * 2^exponent with mantissa in [0.5, 1); 0 gives exponent 0
    exponent = torch.frexp(magnitude.float()).exponent - 1
    # float32: the powers of two a float16 gradient needs may lie outside float16's range
    scale = torch.ldexp(torch.ones_like(magnitude, dtype=torch.float32), exponent)
    if not rel:
        kwargs = {**kwargs, "tol": kwargs["tol"] / scale.item()}
    y, info = solve((grad / scale).to(grad.dtype), kwargs)
    per_sample = scale.flatten().to(info["abs_lowest"].dtype)  # the statistics in grad's units
    for key in ("abs_lowest", "error_bound"):
        if key in info:
            info[key] = info[key] * per_sample
    info["abs_trace"] = info["abs_trace"] * per_sample[:, None]
    y = (y * scale).to(y.dtype)
    if half_model and not bool(torch.isfinite(y).all()):
        _warn_beyond_half_range(int((~torch.isfinite(y)).flatten(1).any(1).sum()), y.shape[0])
    return y, info


def _warn_beyond_half_range(samples: int, batch: int) -> None:
    warn_once(
        "adjoint beyond float16's range",
        f"The adjoint of the implicit gradient exceeds float16's range (65,504) in {samples} of "
        f"{batch} samples of this float16 model, although its solve converged (for the loss "
        "gradient scaled into range): their gradients hold Inf, which an optimizer would write "
        "into the weights. Keep float32 weights and run the model under float16 autocast with a "
        "GradScaler (which skips such a step and lowers its scale), or train in float32 or "
        "bfloat16. Said once per process.",
    )


def _warn_loss_scale_overflow() -> None:
    warn_once(  # GradScaler overflows by design every so often: say it once
        "loss scale overflow",
        "The loss gradient arriving at the pcdeq core holds NaN or Inf under float16 autocast, "
        "as a GradScaler step that overflowed does. The adjoint is not solved (no backward "
        "statistics for this step) and the non-finite gradient is passed on, so that GradScaler "
        "skips the step and lowers its scale; without a GradScaler the optimizer would write NaN "
        "into the weights. Said once per process: GradScaler's scale shows how often it recurs.",
    )


def _warn_forward_coarser(f_tol: float, b_tol: float) -> None:
    """A certified backward solve finer than the forward one (once per process)."""
    warn_once(
        "certified backward finer than the forward",
        f"The certified backward solve stops on an error_bound below b_tol={b_tol:g}, but it "
        f"linearizes f at the forward's last step, within f_tol={f_tol:g} of the fixed point: the "
        "gradient also carries the forward's error, which error_bound does not include (an audit "
        "found up to 8 times error_bound at equal tolerances). For error_bound to describe the "
        "gradient, solve the forward well below b_tol.",
    )


def _warn_uncertifiable(rate: float, dtype: torch.dtype) -> None:
    """``dtype``: the arithmetic's (autocast's when coarser than the state's)."""
    warn_once(
        ("uncertifiable backward", dtype),
        f"The backward solve cannot be certified: the rate bound q = {rate:.6g} in {dtype} "
        "arithmetic is not below 1 (q approaches 1 on slow layers, whose spectral radius does, "
        "and low-precision arithmetic, a low-precision state or autocast, is only as accurate as "
        "its dtype). It is solved with the plain residual test instead, and its statistics carry no "
        "error_bound. Certify in float32 or wider, outside autocast.",
    )


def _warn_uncertifiable_precision(dtype: torch.dtype) -> None:
    """``dtype``: the arithmetic's, float16 or bfloat16."""
    floor = 2 * GUARD_ULPS * torch.finfo(dtype).eps  # (the solver's certifiable floor, at q = 0)
    warn_once(
        ("uncertifiable backward precision", dtype),
        f"The backward solve is not certified in {dtype} arithmetic (a {dtype} state, or autocast): "
        f"there the rate bound q is an estimate of a few digits, and the certified bound could not "
        f"go below {floor:.3g} / (1 - q) relative, a tolerance that would stop the solve early and "
        "coarsen the gradient. It is solved with the plain residual test instead, and its "
        "statistics carry no error_bound. Certify in float32 or wider, outside autocast.",
    )


def under_torch_func() -> bool:
    """Whether a torch.func transform is running (the check is private API: absent, no)."""
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    return level is not None and level() is not None


def _batched(grad: Tensor) -> bool:
    """Whether ``grad`` is a vmap-batched tensor (private API: absent, no)."""
    functorch = getattr(torch._C, "_functorch", None)
    checks = (getattr(functorch, name, None) for name in ("is_batchedtensor", "is_legacy_batchedtensor"))
    return any(check is not None and check(grad) for check in checks)


def _refuse_second_order(grad: Tensor) -> None:
    """What a backward of the implicit gradient cannot do, refused before it starts."""
    # Autograd runs backward functions with grad mode on exactly when asked for create_graph=True.
    if torch.is_grad_enabled():
        raise InvalidInputError(
            "A second-order gradient through the pcdeq core was asked for (create_graph=True), but "
            "the implicit gradient solves its adjoint equation without building a graph, so the "
            "result would be wrong. Differentiate through the solve once (create_graph=False)."
        )
    # is_grads_batched=True and jacobian(..., vectorize=True) run the backward under vmap.
    if under_torch_func() or _batched(grad):
        raise InvalidInputError(
            "A batched backward through the pcdeq core was asked for (torch.autograd.grad with "
            "is_grads_batched=True, or torch.autograd.functional.jacobian/hessian with "
            "vectorize=True): its adjoint solve reads the iterates' values to stop, which vmap "
            "hides. Ask for one gradient at a time (is_grads_batched=False, vectorize=False)."
        )


def _refuse_forward_mode(ctx, *tangents):
    """``jvp`` of the implicit gradients: forward-mode AD through the core is not supported."""
    raise InvalidInputError(
        "Forward-mode AD (torch.autograd.forward_ad dual tensors) reached the pcdeq core's implicit "
        "gradient, which differentiates in reverse mode only (its tangent would need a forward "
        "solve of (I - J) t = df, not implemented). Use reverse mode (loss.backward(), "
        "torch.autograd.grad, or torch.autograd.functional.jacobian with vectorize=False)."
    )


def _autocast_state(state: Tensor) -> list[tuple[str, bool, torch.dtype]]:
    """Autocast for the CPU and ``state``'s device now, as (device type, enabled, dtype)."""
    return [
        (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        for device in dict.fromkeys(("cpu", state.device.type))
    ]


@contextlib.contextmanager
def _autocast_as_in_forward(state: list[tuple[str, bool, torch.dtype]]):
    """Autocast as it was in the forward, on or off: ``backward()`` usually runs outside the
    forward's autocast region (or inside another), and calls of ``f`` there must compute as
    the forward did."""
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


def _in_layout(t: Tensor, layout: torch.memory_format | None, like: Tensor) -> Tensor:
    """``t`` in ``layout``, or in ``like``'s layout for ``None``."""
    return _same_layout(t, like) if layout is None else t.contiguous(memory_format=layout)


def _same_layout(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` in ``like``'s memory layout: mixed layouts make every product convert."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad


class _Producer:
    """A gradient producer with TorchDEQ's signature ``(trainer, func, z_pred, writer=None)``.

    An object rather than a closure, so that a core holding it pickles (``torch.save(model)``).

    Args:
        b_solver: a TorchDEQ-contract solver for the adjoint equation.
        b_solver_kwargs: ``max_iter``, ``tol``, ``stop_mode`` (and other solver options).
    """

    def __init__(self, b_solver: Callable, b_solver_kwargs: dict):
        self.b_solver, self.b_solver_kwargs = b_solver, dict(b_solver_kwargs)

    def solve_adjoint(self, trainer, func, z_in, vjp, grad, writer, layout=None, certificate=None) -> Tensor:
        return _solve_adjoint(
            trainer, self.b_solver, self.b_solver_kwargs, func, z_in, vjp, grad, writer, layout, certificate
        )


class ImplicitGradient(_Producer):
    """Implicit differentiation through a ``torch.autograd.Function`` that recomputes ``f``."""

    def __call__(self, trainer, func, z_pred, writer=None, **kwargs):
        # backward() usually runs after the autocast region closed: remember it now.
        f_out = func(z_pred)
        return [_ImplicitGrad.apply(self, trainer, func, z_pred, f_out, writer, _autocast_state(z_pred))]


class _ImplicitGrad(autograd.Function):
    jvp = staticmethod(_refuse_forward_mode)

    @staticmethod
    def forward(ctx, producer, trainer, func, z_pred, f_out, writer, autocast):
        _remember(ctx, producer=producer, trainer=trainer, func=func, writer=writer, autocast=autocast)
        ctx.save_for_backward(z_pred.detach(), f_out.detach())
        return f_out.view_as(f_out)

    @staticmethod
    def backward(ctx, grad):
        _refuse_second_order(grad)
        z_pred, f_forward = ctx.saved_tensors
        z_in = z_pred.clone().requires_grad_()
        with _autocast_as_in_forward(ctx.autocast):
            with torch.enable_grad():
                f_out = ctx.func(z_in)
            _check_same_map(ctx.trainer, f_forward, f_out.detach())
            vjp = _graph_vjp(f_out, z_in)
            y = ctx.producer.solve_adjoint(ctx.trainer, ctx.func, z_in, vjp, grad, ctx.writer)
        return None, None, None, None, y, None, None


class ImplicitGradientOnGraph(_Producer):
    """Implicit differentiation on the graph of ``f(z*)`` itself (one graph; ``hook_ift``)."""

    def __call__(self, trainer, func, z_pred, writer=None, **kwargs):
        z_in = z_pred.detach().requires_grad_()
        f_out = func(z_in)
        if not f_out.requires_grad:  # e.g. a training-mode core called under torch.no_grad()
            return [f_out]
        if not _reaches_beyond(f_out, z_in):  # a frozen f of a constant input: nothing to solve for
            return [f_out.detach()]
        autocast = _autocast_state(z_in)  # backward() usually runs after the autocast region closed
        return [_ImplicitGradOnGraph.apply(f_out, z_in, self, trainer, func, writer, autocast)]


class _ImplicitGradOnGraph(autograd.Function):
    # f_out and z_in go through save_for_backward, not ctx attributes: the saved copies are
    # released after a backward that does not retain the graph, and in-place changes to
    # them are caught.
    jvp = staticmethod(_refuse_forward_mode)

    @staticmethod
    def forward(ctx, f_out, z_in, producer, trainer, func, writer, autocast):
        _remember(ctx, producer=producer, trainer=trainer, func=func, writer=writer, autocast=autocast)
        ctx.save_for_backward(f_out, z_in)
        return f_out.view_as(f_out)

    @staticmethod
    def backward(ctx, grad):
        _refuse_second_order(grad)
        f_out, z_in = ctx.saved_tensors
        with _autocast_as_in_forward(ctx.autocast):  # the certificate calls f again
            if ctx.trainer.certify_backward:  # ... and must certify the forward's f
                with torch.no_grad():
                    _check_same_map(ctx.trainer, f_out.detach(), ctx.func(z_in.detach()), recorded_graph=True)
            vjp = _graph_vjp(f_out, z_in)
            y = ctx.producer.solve_adjoint(ctx.trainer, ctx.func, z_in, vjp, grad, ctx.writer)
        # y flows on through f_out's graph to the parameters and the injection (and, one
        # unused product, to z_in: the price of sharing the graph with the adjoint solve).
        return y, *(None,) * 6


def _check_same_map(trainer, f_forward: Tensor, f_again: Tensor, recorded_graph: bool = False) -> None:
    """Refuse a ``backward()`` whose ``f`` is not the map the forward solved.

    The recorded gradient calls ``f`` again at the forward's state (the default one to build
    its Jacobian, a certified one for its rate bound). If ``f`` now computes something else
    there, by more than the forward's tolerance in its own measure, ``z*`` is not its fixed
    point and the gradient would be that of another model, silently. A deterministic ``f``
    recomputes bit for bit; the tolerance only leaves room for nondeterministic kernels. One
    host sync per backward. ``recorded_graph``: the caller kept the forward's graph of ``f``
    (``hook_ift``) and calls ``f`` again for the certificate only.
    """
    dims = tuple(range(1, f_forward.dim()))
    acc = torch.promote_types(f_forward.dtype, torch.float32)
    tiny = torch.finfo(acc).tiny
    change = torch.linalg.vector_norm((f_again - f_forward).to(acc), dim=dims)
    size = torch.linalg.vector_norm(f_forward.to(acc), dim=dims)
    floor = resolution_floor(arithmetic_dtype(f_forward))
    tol = max(trainer.f_tol, floor) if trainer.f_stop_mode == "rel" else trainer.f_tol
    limit = tol * size if trainer.f_stop_mode == "rel" else torch.clamp_min(floor * size, tol)
    excess = change / limit.clamp_min(tiny)
    worst = excess.amax().item()
    if worst <= 1:
        return
    samples = int((excess > 1).sum())
    relative = (change / size.clamp_min(tiny)).amax().item()
    if recorded_graph:
        what, calls, remedy = "certified bound", "certified backward (pcdeq_rate_bound)", ""
    else:
        what, calls = "gradient", "implicit gradient"
        remedy = " Or set hook_ift=True, whose gradient keeps the forward's graph of f."
    raise InvalidInputError(
        f"f computes differently in backward() than in the forward: at the forward's fixed point "
        f"it now differs from its forward value by up to {relative:.3g} (relative 2-norm), beyond "
        f"the forward's tolerance {tol:g} ({trainer.f_stop_mode}), in {samples} of "
        f"{f_forward.shape[0]} samples, so the {what} would be that of another model. The "
        f"{calls} calls f again during backward(), so f must compute then as in the forward. "
        "Usual causes: a closure that reads a variable rebound since (a loop's x: bind it, "
        "lambda z, x=x: layer(z, x)), a dropout mask reset (reset_dropout) or a train/eval "
        f"switch between the forward and backward(), or an input edited in place.{remedy}"
    )


def _reaches_beyond(out: Tensor, leaf: Tensor) -> bool:
    """Whether ``out``'s graph reaches a tensor that requires grad other than ``leaf``.

    Stops at the first one found (a parameter, or a tracked input); walks the whole graph only
    when there is none, and then the graph is ``f``'s alone.
    """
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
        if variable is not None and variable is not leaf:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _remember(ctx, **values) -> None:
    """Keep a forward's non-tensor arguments on ``ctx`` for its backward."""
    for name, value in values.items():
        setattr(ctx, name, value)


def _graph_vjp(f_out: Tensor, z_in: Tensor) -> Callable[[Tensor], Tensor]:
    """``y -> J^T y`` through the recorded graph of ``f_out = f(z_in)``."""
    return lambda y: autograd.grad(f_out, z_in, y, retain_graph=True)[0]


class ClosedFormImplicitGradient(_Producer):
    """Implicit differentiation in closed form, for a solve that only iterated one pcDEQ layer;
    the ``recorded`` producer (:class:`ImplicitGradient`, :class:`ImplicitGradientOnGraph`)
    everywhere else.

    When ``f = lambda z: layer(z, x)`` (the solve's layer calls form one
    :class:`~torchdeq_pcdeq.layers.LayerChain`), the returned state is the solver's last step
    ``z_K = sigma(W z_in + x)``, and ``J = diag(sigma'(.)) W`` there, with ``sigma'`` read
    from ``z_K`` (the activation's ``slope``, as autograd reads it; a certified backward takes
    it from ``W z_in + x``, :func:`~torchdeq_pcdeq.certify.closed_form_slope`). Then

    * the output is ``z_K`` itself, with a backward that needs no recorded application of ``f``
      (saving the forward pass of the tracked application);
    * each adjoint product is ``W^T (sigma' y)``, one pass of the operator's transpose (no
      graph of ``f``, hence no unused product with respect to ``z_in`` afterwards);
    * the parameters get ``d<v, W z_in>/dW`` and the injection ``v``, with ``v = sigma' y``.

    The recorded gradient returns ``f(z_K)`` and linearizes at ``z_K``; this one returns ``z_K``
    and linearizes at ``z_in``, one iteration earlier. Each linearizes where it applies ``f``,
    within the solve's tolerance of the fixed point.

    The closed form applies where the core that calls the producer (``trainer``, a
    :class:`~torchdeq_pcdeq.core.PcDEQCore`) hands over its solve's last step.
    """

    def __init__(self, b_solver: Callable, b_solver_kwargs: dict, recorded: _Producer):
        super().__init__(b_solver, b_solver_kwargs)
        self.recorded = recorded

    def __call__(self, trainer, func, z_pred, writer=None, **kwargs):
        step = trainer.take_last_step(z_pred)
        if step is not None and closed_form_applies(step, z_pred):
            certificate = step.certificate if trainer.certify_backward else None
            rate, weights = (None, None) if certificate is None else certificate
            slope = step.slope if trainer.certify_backward else None
            weight = step.operator_weight
            args = (
                weight,
                step.x,
                step.z_in,
                z_pred,
                rate,
                weights,
                slope,
                step.layer,
                self,
                trainer,
                writer,
            )
            return [_ClosedFormImplicitGrad.apply(*args, _autocast_state(z_pred))]
        return self.recorded(trainer, func, z_pred, writer=writer, **kwargs)


def closed_form_applies(step: LastStep, z_pred: Tensor) -> bool:
    """Whether the closed form differentiates the solve whose last step is ``step``: recording
    gradients, something to differentiate, and products that are the solve's
    (:func:`closed_form_is_exact`)."""
    weight = step.operator_weight
    return (
        torch.is_grad_enabled()
        and (weight.requires_grad or step.x.requires_grad)
        and closed_form_is_exact(step, z_pred)
    )


def closed_form_is_exact(step: LastStep, z_pred: Tensor) -> bool:
    """Whether products in closed form at ``step`` are those the solve made: one dtype, and no
    autocast (under which the solve computed in autocast's dtypes: ``f`` is recorded instead)."""
    return len({step.operator_weight.dtype, step.x.dtype, z_pred.dtype}) == 1 and not any(
        enabled for _, enabled, _ in _autocast_state(z_pred)
    )


class _ClosedFormImplicitGrad(autograd.Function):
    jvp = staticmethod(_refuse_forward_mode)

    @staticmethod
    def forward(
        ctx, weight, x, z_in, z_out, rate, weights, slope, layer, producer, trainer, writer, autocast
    ):
        _remember(ctx, layer=layer, producer=producer, trainer=trainer, writer=writer, autocast=autocast)
        # (saved tensors: freed with the graph after backward, and edits in place are caught)
        ctx.save_for_backward(weight, x, z_in, z_out, rate, weights, slope)
        return z_out

    @staticmethod
    def backward(ctx, grad):
        _refuse_second_order(grad)
        weight, x, z_in, z_out, rate, weights, certified_slope = ctx.saved_tensors
        layer = ctx.layer

        def vjp(y: Tensor) -> Tensor:
            return layer.operator_vjp(slope * y, z_in, weight)[0]

        certify = ctx.trainer.certify_backward
        # The certified bound's rounding margin covers direct products only (conv_kernels): the
        # certified solve makes them itself, and here the layout follows (PyTorch's kernel
        # keeps z_in's) as does a certificate taken here.
        exact = sign_exact_products() if certify else contextlib.nullcontext()
        with _autocast_as_in_forward(ctx.autocast), exact:  # the products' kernels depend on them
            # The adjoint iterates live in the layout the layer's products are fastest in
            # (NCHW for NNPACK's); converting the two fixed operands once keeps every
            # elementwise operation between products in one layout.
            layout = layer.adjoint_layout(z_in, weight)
            certificate = None
            if not certify:  # sigma' read from the output, as autograd reads it
                slope = layer.activation.slope(z_out)
            elif rate is not None:  # taken by the core's forward, for its info
                slope, certificate = certified_slope, (rate, weights)
            else:  # sigma' from the pre-activation: the certified Jacobian's (closed_form_slope)
                slope = closed_form_slope(layer, weight, z_in, x)
                certificate = closed_form_certificate(layer, weight, z_in, slope)
            slope = _in_layout(slope, layout, z_in)
            y = ctx.producer.solve_adjoint(
                ctx.trainer, None, z_in, vjp, grad, ctx.writer, layout, certificate
            )
            v = _same_layout(slope * y, z_in)  # the state's layout, for what follows
            grad_weight = None
            if ctx.needs_input_grad[0]:
                grad_weight = layer.operator_vjp(v, z_in, weight, state=False, weight_grad=True)[1]
        return grad_weight, v if ctx.needs_input_grad[1] else None, *(None,) * 10

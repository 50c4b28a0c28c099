"""Implicit differentiation for the pcdeq core, by plain iteration on the adjoint.

At the fixed point ``z* = f(z*)`` the loss gradient ``g`` is pulled back through
``y = J*^T y + g`` with ``J* = df/dz (z*)``. For a pcDEQ layer ``J* >= 0`` and its spectral
radius is below 1 (method.md, section 3), so plain iteration on ``y`` converges.

Two gradient producers with TorchDEQ's signature ``(trainer, func, z_pred, writer=None)``:

* :func:`make_ift` (default): a ``torch.autograd.Function``; two graphs of ``f`` in memory.
* :func:`make_hook_ift`: a tensor hook; one graph. Unlike TorchDEQ's, each call owns its hook
  handle, so calling the core twice before ``backward()`` cannot re-enter a hook (TorchDEQ's
  version recurses without bound there), and a depth counter turns any re-entry into an error.

Both pass the backward solver's statistics to ``writer`` and apply the core's
non-convergence policy to the backward solve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, autograd

from .errors import PcDEQError

__all__ = ["make_ift", "make_hook_ift"]


def _solve_adjoint(b_solver, b_solver_kwargs, f_out: Tensor, z_in: Tensor, grad: Tensor, on_info, writer):
    """Solve ``y = J^T y + grad`` with ``J = d f_out / d z_in``; report through ``on_info``."""

    def adjoint(y: Tensor) -> Tensor:
        return autograd.grad(f_out, z_in, y, retain_graph=True)[0] + grad

    y, _, info = b_solver(adjoint, torch.zeros_like(grad), **b_solver_kwargs)
    on_info(info, writer)
    return y


def make_ift(b_solver: Callable, b_solver_kwargs: dict, on_info: Callable[[dict, Any], None]):
    """Gradient producer: implicit differentiation through a ``torch.autograd.Function``.

    Args:
        b_solver: a TorchDEQ-contract solver for the adjoint equation.
        b_solver_kwargs: ``max_iter``, ``tol``, ``stop_mode`` (and other solver options).
        on_info: called as ``on_info(info, writer)`` after each backward solve (checks, logging).
    """

    class _ImplicitGrad(autograd.Function):
        @staticmethod
        def forward(ctx, func, z_pred, writer):
            ctx.func, ctx.writer = func, writer
            ctx.save_for_backward(z_pred.detach())
            return z_pred

        @staticmethod
        def backward(ctx, grad):
            (z_pred,) = ctx.saved_tensors
            z_in = z_pred.clone().requires_grad_()
            with torch.enable_grad():
                f_out = ctx.func(z_in)
            y = _solve_adjoint(b_solver, b_solver_kwargs, f_out, z_in, grad, on_info, ctx.writer)
            return None, y, None

    def produce(trainer, func, z_pred, writer=None, **kwargs):
        return [_ImplicitGrad.apply(func, func(z_pred), writer)]

    return produce


def make_hook_ift(b_solver: Callable, b_solver_kwargs: dict, on_info: Callable[[dict, Any], None]):
    """Gradient producer: implicit differentiation through a tensor hook (one graph of ``f``).

    Arguments as :func:`make_ift`.
    """
    depth = [0]

    def produce(trainer, func, z_pred, writer=None, **kwargs):
        z_in = z_pred.requires_grad_()
        f_out = func(z_in)
        if not f_out.requires_grad:  # e.g. a training-mode core called under torch.no_grad()
            return [f_out]
        handle = None

        def hook(grad: Tensor) -> Tensor:
            handle.remove()  # first thing: the adjoint solve below must not trigger this hook
            if depth[0]:
                raise PcDEQError(
                    "hook_ift re-entered its own backward hook; this would recurse without bound. "
                    "Use the default ift (pcdeq core without hook_ift)."
                )
            depth[0] += 1
            try:
                return _solve_adjoint(b_solver, b_solver_kwargs, f_out, z_in, grad, on_info, writer)
            finally:
                depth[0] -= 1

        handle = f_out.register_hook(hook)
        return [f_out]

    return produce

"""The models compared side by side, on one architecture.

* ``pcdeq``: the plugin, exactly as a user builds it (:func:`torchdeq_pcdeq.models.build_model`,
  ``core="pcdeq"``).
* ``torchdeq_anderson`` / ``torchdeq_fixed_point``: TorchDEQ's standard DEQ on the same
  architecture with unconstrained weights: ``tanh(W z + x)`` with the stem's output as injection,
  PyTorch's default initialisation, TorchDEQ's weight norm, ``core="sliced"`` with implicit
  differentiation, and the same tolerance (relative 1e-4) and budget (200) as the pcDEQ.
* ``reference``: the reference implementation's way of doing pcDEQ, written here from its
  description (method.md, section 4): ``torch.nn.utils.weight_norm`` recomputed at every call,
  ``v`` and ``g`` clamped to >= 0 after each step, a forward solve that stops on the residual of
  the whole batch with a host sync per iteration (no flag when it does not converge), one extra
  tracked application of ``f``, and a backward tensor hook that solves the adjoint equation by
  plain iteration from the incoming gradient.

Every model returns ``(logits, infos)`` with per-sample ``nstep`` and ``converged`` in each info,
and has ``after_step()`` for what must follow an optimizer step.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import torchdeq
from torch import autograd, nn

from torchdeq_pcdeq.errors import check_choice
from torchdeq_pcdeq.models import build_model

KINDS = ("pcdeq", "torchdeq_anderson", "torchdeq_fixed_point", "reference")
TOL, MAX_ITER = 1e-4, 200


def build(
    kind: str,
    architecture: str,
    dataset: str,
    channels=None,
    deq: dict | None = None,
    activation: str = "tanh",
) -> nn.Module:
    """The ``kind`` model (see the module docstring) for ``architecture`` on ``dataset`` shapes.

    ``activation`` applies to the pcDEQ kind; the baselines keep tanh, as their references do.
    """
    check_choice("model kind", kind, KINDS)
    deq = dict(deq or {})
    model = build_model(architecture, dataset, channels=channels, deq=deq, activation=activation)
    if kind == "pcdeq":
        model.after_step = lambda: None
        return model
    for i, layer in enumerate(model.layers):
        operator = _fresh_operator(layer.operator)
        if kind == "reference":
            model.layers[i] = ReferenceLayer(operator)
            model.cores[i] = ReferenceSolve()
        else:
            model.layers[i] = StandardLayer(operator)
            solver = "anderson" if kind == "torchdeq_anderson" else "fixed_point_iter"
            model.cores[i] = torchdeq.get_deq(
                core="sliced",
                ift=True,
                f_solver=solver,
                b_solver=solver,
                f_tol=TOL,
                b_tol=TOL,
                f_stop_mode="rel",
                b_stop_mode="rel",
                f_max_iter=MAX_ITER,
                b_max_iter=MAX_ITER,
                **{k: v for k, v in deq.items() if k in ("f_max_iter", "b_max_iter")},
            )
    model.after_step = lambda: [layer.project() for layer in model.layers if hasattr(layer, "project")]
    return model


def _fresh_operator(operator: nn.Module) -> nn.Module:
    """A bias-free layer of the operator's shape with PyTorch's default initialisation."""
    if isinstance(operator, nn.Linear):
        return nn.Linear(operator.in_features, operator.out_features, bias=False)
    return nn.Conv2d(
        operator.in_channels,
        operator.out_channels,
        operator.kernel_size,
        padding=operator.padding,
        bias=False,
    )


class StandardLayer(nn.Module):
    """TorchDEQ's usual DEQ layer: ``tanh(W z + x)``, weight norm, no sign constraint."""

    def __init__(self, operator: nn.Module):
        super().__init__()
        self.operator = operator
        torchdeq.apply_norm(self, norm_type="weight_norm")

    def inject(self, u):
        torchdeq.reset_norm(self)  # TorchDEQ's contract: once per forward, before the solve
        # Under bfloat16 autocast the stem hands over bfloat16, while the pcDEQ kinds' softplus
        # injection comes out in float32 (autocast runs softplus in float32). In the weight's
        # dtype the state is float32 for every kind, and TorchDEQ's Anderson solver (its
        # least-squares solve has no bfloat16 kernel) and implicit backward (which calls f
        # again after the autocast region has closed) can run.
        return u.to(self.operator.weight.dtype)

    def forward(self, z, x):
        return torch.tanh(self.operator(z) + x)


class ReferenceLayer(nn.Module):
    """The reference's pcDEQ-1 layer: hook-based weight norm, softplus_5 injection, tanh."""

    def __init__(self, operator: nn.Module):
        super().__init__()
        fan = operator.weight.shape[0] + operator.weight.shape[1]
        with torch.no_grad():
            operator.weight.uniform_(0, 1).mul_(1e-4**0.5 / fan**0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, but it is what the reference uses
            self.operator = nn.utils.weight_norm(operator)

    def inject(self, u):
        return F.softplus(u, beta=5)

    def forward(self, z, x):
        return torch.tanh(self.operator(z) + x)

    def project(self):
        with torch.no_grad():
            self.operator.weight_v.clamp_(min=0)
            self.operator.weight_g.clamp_(min=0)


class ReferenceSolve(nn.Module):
    """The reference's solver and hook-based implicit backward."""

    def forward(self, func, z_init, backward_writer=None, **kwargs):
        with torch.no_grad():
            z, steps, per_sample = _plain_iteration(func, z_init)
        info = {"nstep": torch.full((z.shape[0],), float(steps)), "converged": per_sample <= TOL}
        if not self.training or not torch.is_grad_enabled():
            return [z], info
        z = func(z)  # the extra tracked application: gradients of the parameters and the input
        z0 = z.detach().requires_grad_()
        f0 = func(z0)

        def backward_hook(grad):
            adjoint = lambda y: autograd.grad(f0, z0, y, retain_graph=True)[0] + grad  # noqa: E731
            y, steps, _ = _plain_iteration(adjoint, grad)
            if backward_writer is not None:
                backward_writer({"nstep": torch.full((grad.shape[0],), float(steps))})
            return y

        z.register_hook(backward_hook)
        return [z], info


def _plain_iteration(func, z):
    """Iterate until ``||z_{k+1} - z_k|| / (||z_{k+1}|| + 1e-5) < 1e-4`` over the whole batch.

    Returns the state, the iterations, and (for the benchmark's statistics only, once per solve)
    the per-sample relative residual of the last step.
    """
    steps = 0
    while steps < MAX_ITER:
        z_previous, z = z, func(z)
        steps += 1
        if ((z - z_previous).norm() / (z.norm() + 1e-5)).item() < TOL:  # a host sync per iteration
            break
    dims = tuple(range(1, z.dim()))  # not flatten(1): it would copy a channels-last state
    norm = torch.linalg.vector_norm
    per_sample = norm(z - z_previous, dim=dims) / (norm(z, dim=dims) + 1e-9)
    return z, steps, per_sample

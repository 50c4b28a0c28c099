"""The models compared side by side, on one architecture.

* ``pcdeq``: the plugin, exactly as a user builds it (:func:`torchdeq_pcdeq.models.build_model`,
  ``core="pcdeq"``).
* ``torchdeq_anderson`` / ``torchdeq_fixed_point``: TorchDEQ's standard DEQ on the same
  architecture with unconstrained weights: ``tanh(W z + x)`` with the stem's output as injection,
  PyTorch's default initialisation, TorchDEQ's weight norm, ``core="sliced"`` with implicit
  differentiation, and the same tolerance (relative 1e-4) and budget (200) as the pcDEQ.
* ``reference``: the reference implementation's way of doing pcDEQ, written here from its
  description (docs/method.md, section 4): ``torch.nn.utils.weight_norm`` recomputed at every call,
  ``v`` and ``g`` clamped to >= 0 after each step, a forward solve that stops on the residual of
  the whole batch with a host sync per iteration (no flag when it does not converge), one extra
  tracked application of ``f``, and a backward tensor hook that solves the adjoint equation by
  plain iteration from the incoming gradient. Its layers are pcDEQ-1 (tanh, softplus_5
  injection) or, for ``activation="sigmoid"``, pcDEQ-2 (sigmoid, relu injection): the two it has.

Every kind stops at the same tolerance (``tol``, relative; :data:`TOL` unless the arithmetic
cannot resolve it, see :func:`tolerance`) within the same budget.

Every model returns ``(logits, infos)`` with per-sample ``nstep`` and ``converged`` in each info
(TorchDEQ's kinds: ``rel_lowest`` instead of ``converged``, and their solvers' calls of ``f`` in
``calls``), and has ``after_step()`` for what must follow an optimizer step.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import torchdeq
from torch import autograd, nn

from torchdeq_pcdeq.errors import InvalidInputError, check_choice
from torchdeq_pcdeq.models import build_model
from torchdeq_pcdeq.rounding import resolution_floor

KINDS = ("pcdeq", "torchdeq_anderson", "torchdeq_fixed_point", "reference")
TOL, MAX_ITER = 1e-4, 200
# The reference's activations and their injections (docs/method.md, section 4).
REFERENCE_VARIANTS = {
    "tanh": (torch.tanh, lambda u: F.softplus(u, beta=5)),
    "sigmoid": (torch.sigmoid, F.relu),
}


def tolerance(bf16: bool) -> float:
    """The relative tolerance every kind stops at: :data:`TOL`, or under bfloat16 autocast the
    coarsest a pcDEQ solve can resolve there (``resolution_floor``: 2 ulps, 1.6e-2), to which
    the pcdeq core would raise its own. One tolerance for all keeps the iterations and the
    convergence rates comparable."""
    return max(TOL, resolution_floor(torch.bfloat16)) if bf16 else TOL


def build(
    kind: str,
    architecture: str,
    dataset: str,
    channels=None,
    deq: dict | None = None,
    activation: str = "tanh",
    tol: float = TOL,
) -> nn.Module:
    """The ``kind`` model (see the module docstring) for ``architecture`` on ``dataset`` shapes.

    ``activation`` applies to the pcDEQ kind and the reference (tanh or sigmoid); TorchDEQ's
    standard DEQ keeps tanh. ``tol`` is every kind's relative tolerance, forward and backward;
    ``deq``'s ``f_max_iter`` / ``b_max_iter`` are every kind's budgets.
    """
    check_choice("model kind", kind, KINDS)
    if kind == "reference" and activation not in REFERENCE_VARIANTS:
        raise InvalidInputError(
            f"The reference implementation has pcDEQ-1 (tanh) and pcDEQ-2 (sigmoid) layers, not "
            f"{activation!r}. Leave the reference out of the kinds for other activations."
        )
    deq = dict(deq or {})
    budgets = {"f_max_iter": MAX_ITER, "b_max_iter": MAX_ITER}
    budgets.update({k: v for k, v in deq.items() if k in budgets})
    if kind == "pcdeq":
        deq = {"f_tol": tol, "b_tol": tol, **deq}
    model = build_model(architecture, dataset, channels=channels, deq=deq, activation=activation)
    if kind == "pcdeq":
        model.after_step = lambda: None
        return model
    for i, layer in enumerate(model.layers):
        operator = _fresh_operator(layer.operator)
        if kind == "reference":
            model.layers[i] = ReferenceLayer(operator, activation)
            model.cores[i] = ReferenceSolve(tol, budgets["f_max_iter"], budgets["b_max_iter"])
        else:
            model.layers[i] = StandardLayer(operator)
            solver = "anderson" if kind == "torchdeq_anderson" else "fixed_point_iter"
            model.cores[i] = _counting_calls(
                torchdeq.get_deq(
                    core="sliced",
                    ift=True,
                    f_solver=solver,
                    b_solver=solver,
                    f_tol=tol,
                    b_tol=tol,
                    f_stop_mode="rel",
                    b_stop_mode="rel",
                    **budgets,
                )
            )
    model.after_step = lambda: [layer.project() for layer in model.layers if hasattr(layer, "project")]
    return model


def _counting_calls(core: nn.Module) -> nn.Module:
    """``core`` (TorchDEQ's) with solvers that report their calls of the function they iterate
    as ``info["calls"]``: TorchDEQ's ``nstep`` is each sample's step of lowest residual, which
    undercounts a solve that ran to its budget without converging."""
    core.f_solver = _counted(core.f_solver)
    core.b_solver = _counted(core.b_solver)
    # The implicit backward took its solver when the core was built: built again around the
    # counted one, with the arguments TorchDEQ's constructor gives it.
    core.produce_grad[-1] = torchdeq.grad.backward_factory(
        grad_type="ift",
        hook_ift=False,
        b_solver=core.b_solver,
        b_solver_kwargs=dict(max_iter=core.b_max_iter, tol=core.b_tol, stop_mode=core.b_stop_mode),
    )
    return core


def _counted(solver):
    def counted_solver(func, *args, **kwargs):
        calls = 0

        def counted_func(z):
            nonlocal calls
            calls += 1
            return func(z)

        z, trajectory, info = solver(counted_func, *args, **kwargs)
        info["calls"] = torch.full((z.shape[0],), float(calls), device=z.device)
        return z, trajectory, info

    return counted_solver


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
    """The reference's layer: hook-based weight norm; pcDEQ-1 (``"tanh"``, softplus_5
    injection) or pcDEQ-2 (``"sigmoid"``, relu injection)."""

    def __init__(self, operator: nn.Module, activation: str = "tanh"):
        super().__init__()
        self.activation, self.injection = REFERENCE_VARIANTS[activation]
        fan = operator.weight.shape[0] + operator.weight.shape[1]
        with torch.no_grad():
            operator.weight.uniform_(0, 1).mul_(1e-4**0.5 / fan**0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, but it is what the reference uses
            self.operator = nn.utils.weight_norm(operator)

    def inject(self, u):
        return self.injection(u)

    def forward(self, z, x):
        return self.activation(self.operator(z) + x)

    def project(self):
        with torch.no_grad():
            self.operator.weight_v.clamp_(min=0)
            self.operator.weight_g.clamp_(min=0)


class ReferenceSolve(nn.Module):
    """The reference's solver and hook-based implicit backward (``tol``: 1e-4 in the reference)."""

    def __init__(self, tol: float = TOL, f_max_iter: int = MAX_ITER, b_max_iter: int = MAX_ITER):
        super().__init__()
        self.tol, self.f_max_iter, self.b_max_iter = tol, f_max_iter, b_max_iter

    def forward(self, func, z_init, backward_writer=None, **kwargs):
        with torch.no_grad():
            z, steps, per_sample = _plain_iteration(func, z_init, self.tol, self.f_max_iter)
        info = {"nstep": torch.full((z.shape[0],), float(steps)), "converged": per_sample <= self.tol}
        if not self.training or not torch.is_grad_enabled():
            return [z], info
        z = func(z)  # the extra tracked application: gradients of the parameters and the input
        z0 = z.detach().requires_grad_()
        f0 = func(z0)

        def backward_hook(grad):
            adjoint = lambda y: autograd.grad(f0, z0, y, retain_graph=True)[0] + grad  # noqa: E731
            y, steps, per_sample = _plain_iteration(adjoint, grad, self.tol, self.b_max_iter)
            if backward_writer is not None:
                nstep = torch.full((grad.shape[0],), float(steps))
                backward_writer({"nstep": nstep, "converged": per_sample <= self.tol})
            return y

        z.register_hook(backward_hook)
        return [z], info


def _plain_iteration(func, z, tol: float, max_iter: int):
    """Iterate until ``||z_{k+1} - z_k|| / (||z_{k+1}|| + 1e-5) < tol`` over the whole batch.

    Returns the state, the iterations, and (for the benchmark's statistics only, once per solve)
    the per-sample relative residual of the last step.
    """
    steps = 0
    while steps < max_iter:
        z_previous, z = z, func(z)
        steps += 1
        if ((z - z_previous).norm() / (z.norm() + 1e-5)).item() < tol:  # a host sync per iteration
            break
    dims = tuple(range(1, z.dim()))  # not flatten(1): it would copy a channels-last state
    norm = torch.linalg.vector_norm
    per_sample = norm(z - z_previous, dim=dims) / (norm(z, dim=dims) + 1e-9)
    return z, steps, per_sample

"""Property-based: random shapes, activations, mechanisms and weight scales, forward and backward.

For every drawn instance: the forward solve ends in the positive orthant with finite values and
reports convergence honestly; wherever the certified rate bound promises it (q <= 0.95, so 400
iterations shrink the error by 1e-9), it converges within the budget, forward and backward;
every gradient is finite; after a large optimizer step the weight is still nonnegative.
(Rates arbitrarily close to 1 are valid pcDEQs: a 1x1 weight near 1 with an injection at the
1e-6 floor needs far more than 400 iterations, and the solve says so in ``info``.)
"""

from __future__ import annotations

import torch
import torchdeq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchdeq_pcdeq import (
    NONNEGATIVITY_MODES,
    PcDEQConv2d,
    PcDEQLinear,
    attach_projection,
    available_activations,
    rate_bound,
)

BUDGET = 400
TOL = 1e-4
PROMISED_RATE = 0.95  # 0.95 ** 400 < 1e-8


@st.composite
def instances(draw):
    """Layer arguments, state shape and scales; the layer is built from them under a seed."""
    spec = dict(activation=draw(st.sampled_from(sorted(available_activations()))))
    spec["nonnegativity"] = draw(st.sampled_from(NONNEGATIVITY_MODES))
    batch = draw(st.integers(1, 4))
    if draw(st.booleans()):
        spec["features"] = draw(st.integers(1, 24))
        extra = draw(st.lists(st.integers(1, 3), max_size=1))  # (batch, ..., features)
        shape = (batch, *extra, spec["features"])
    else:
        spec["channels"] = draw(st.integers(1, 5))
        spec["kernel_size"] = draw(st.sampled_from([1, 3, 5]))
        shape = (batch, spec["channels"], draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    scales = (10 ** draw(st.floats(-3, 3)), 10 ** draw(st.floats(-2, 2)))
    return spec, shape, scales, draw(st.integers(0, 2**16))


def _build(spec: dict):
    spec = dict(spec)
    if "features" in spec:
        return PcDEQLinear(spec.pop("features"), spec.pop("activation"), **spec)
    return PcDEQConv2d(spec.pop("channels"), spec.pop("activation"), spec.pop("kernel_size"), **spec)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_random_instances_converge_as_promised_with_finite_gradients_and_nonnegative_weights(instance):
    spec, shape, (weight_scale, input_scale), seed = instance
    torch.manual_seed(seed)
    layer = _build(spec)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(weight_scale)  # g for weight_norm, |V| or W otherwise: W scales alike
    u = (torch.randn(shape) * input_scale).requires_grad_()
    deq = torchdeq.get_deq(
        core="pcdeq",
        f_tol=TOL,
        b_tol=TOL,
        f_max_iter=BUDGET,
        b_max_iter=BUDGET,
        pcdeq_nonconvergence="ignore",
    )
    backward = []

    x = layer.inject(u)
    z_out, info = deq(lambda z: layer(z, x), torch.zeros_like(x), backward_writer=backward.append)
    z = z_out[-1]
    assert torch.isfinite(z).all()
    assert (z >= 0).all() and (layer.variant == 2 or (z > 0).all())
    assert int(info["nstep"].max()) <= BUDGET

    # Honest reporting: "converged" is exactly "the last checked residual is within tol".
    assert torch.equal(info["converged"], info["rel_trace"][:, -1] <= TOL)
    # Convergence where the certified rate promises it.
    with torch.no_grad():
        detached = z.detach()
        promised = rate_bound(lambda v: layer(v, x.detach()), detached) <= PROMISED_RATE
    assert bool(info["converged"][promised].all()), f"q <= {PROMISED_RATE} but not converged"

    loss = (z * torch.linspace(-1, 1, z.numel()).view_as(z)).sum()
    loss.backward()
    (b_info,) = backward
    assert bool(b_info["converged"][promised].all()), "backward: q <= 0.95 but not converged"
    assert torch.isfinite(u.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

    optimizer = torch.optim.SGD(layer.parameters(), lr=10 * weight_scale)
    if layer.nonnegativity == "project":
        attach_projection(optimizer, layer)
    optimizer.step()
    weight = layer.weight.detach()
    assert torch.isfinite(weight).all() and weight.min().item() >= 0
    assert torch.isfinite(loss.detach())

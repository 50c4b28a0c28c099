"""Property-based: random shapes, activations, mechanisms and weight scales, forward and backward.

For every drawn instance: the forward solve converges within its budget to a finite state in
the nonnegative orthant, the backward solve converges and every gradient is finite, and after
a large optimizer step the weight is still nonnegative.
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
)

BUDGET = 400


@st.composite
def instances(draw):
    activation = draw(st.sampled_from(sorted(available_activations())))
    mode = draw(st.sampled_from(NONNEGATIVITY_MODES))
    batch = draw(st.integers(1, 4))
    if draw(st.booleans()):
        features = draw(st.integers(1, 24))
        extra = draw(st.lists(st.integers(1, 3), max_size=1))  # (batch, ..., features)
        layer = PcDEQLinear(features, activation, nonnegativity=mode)
        shape = (batch, *extra, features)
    else:
        channels = draw(st.integers(1, 5))
        kernel = draw(st.sampled_from([1, 3, 5]))
        layer = PcDEQConv2d(channels, activation, kernel, nonnegativity=mode)
        shape = (batch, channels, draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    weight_scale = 10 ** draw(st.floats(-3, 3))
    input_scale = 10 ** draw(st.floats(-2, 2))
    seed = draw(st.integers(0, 2**16))
    return layer, shape, weight_scale, input_scale, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_random_instances_converge_with_finite_gradients_and_nonnegative_weights(instance):
    layer, shape, weight_scale, input_scale, seed = instance
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(weight_scale)  # g for weight_norm, |V| or W otherwise: W scales alike
    u = (torch.randn(shape) * input_scale).requires_grad_()
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=BUDGET, b_max_iter=BUDGET, pcdeq_nonconvergence="ignore")
    backward = []

    x = layer.inject(u)
    z_out, info = deq(lambda z: layer(z, x), torch.zeros_like(x), backward_writer=backward.append)
    z = z_out[-1]
    assert torch.isfinite(z).all()
    assert (z >= 0).all() and (layer.variant == 2 or (z > 0).all())
    assert bool(info["converged"].all()), f"forward: nstep {info['nstep'].max().item()}"
    assert int(info["nstep"].max()) <= BUDGET

    loss = (z * torch.linspace(-1, 1, z.numel()).view_as(z)).sum()
    loss.backward()
    (b_info,) = backward
    assert bool(b_info["converged"].all()), f"backward: nstep {b_info['nstep'].max().item()}"
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

"""The certificates: enclosure, rate bound, certified backward, precondition reports.

Property tests draw random small dense and conv pcDEQ instances for every activation and check
each certificate against ground truth computed independently in float64.
"""

import contextlib
import math
import re
import warnings

import pytest
import torch
import torchdeq
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from conftest import ACTIVATIONS, INSTANCES, MODES, conv_instance, dense_instance, forget_warnings, iterate
from torchdeq_pcdeq import (
    Activation,
    InvalidInputError,
    NonFiniteError,
    NonUniqueFixedPointError,
    NotPositiveMonotoneError,
    PcDEQLinear,
    PcDEQWarning,
    UnknownNameError,
    add_pcdeq_args,
    get_activation,
    pcdeq_fixed_point,
    rate_bound,
    register_activation,
)
from torchdeq_pcdeq.certify import RateCertificate, rate_certificate

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def instances(draw):
    """A random float64 pcDEQ instance (layer, injection) and its exact fixed point."""
    make = draw(st.sampled_from(INSTANCES))
    common = dict(
        activation=draw(st.sampled_from(ACTIVATIONS)),
        batch=2,
        scale=draw(st.floats(0.1, 3.0)),
        seed=draw(st.integers(0, 10_000)),
        nonnegativity=draw(st.sampled_from(MODES)),
    )
    if make is conv_instance:
        f, x = make(channels=2, size=3, **common)
    else:
        f, x = make(n=draw(st.integers(2, 7)), **common)
    x = x * draw(st.sampled_from([0.05, 1.0, 3.0]))
    return f, x, exact_fixed_point(f, x)


def exact_fixed_point(f, x):
    """The fixed point to float64 resolution: plain iteration, then Newton's method.

    Newton on ``z - f(z) = 0`` with the explicit Jacobian converges quadratically whatever the
    contraction rate, so the reference does not inherit the slowness it is meant to check.
    """
    z = torch.zeros_like(x)
    for _ in range(200):
        z = f(z, x)
    n = z[0].numel()
    eye = torch.eye(n, dtype=z.dtype)
    previous = math.inf
    for _ in range(50):
        residual = (z - f(z, x)).flatten(1)
        step = torch.linalg.solve(eye - jacobians(f, x, z), residual.unsqueeze(2)).squeeze(2)
        z = (z.flatten(1) - step).view_as(z)
        size = step.abs().max().item() / z.abs().max().item()
        # settled: a correction at rounding level, or one that stopped shrinking near it
        if size <= 4e-16 or (size <= 1e-13 and size >= previous / 2):
            return z
        previous = size
    # Newton can cycle across the kinks of relu6: fall back on the (convergent) plain iteration
    for _ in range(200_000):
        z_next = f(z, x)
        if (z_next - z).abs().max() <= 4e-16 * z.abs().max():
            return z_next
        z = z_next
    reject()  # no trustworthy ground truth for this draw


def jacobians(f, x, z):
    """The explicit per-sample Jacobians of z -> f(z, x) at z, shape (batch, n, n)."""
    out = []
    for b in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0), x[b : b + 1])[0], z[b])
        out.append(jac.reshape(z[b].numel(), z[b].numel()))
    return torch.stack(out)


def linf(t):
    return t.flatten(1).abs().amax(dim=1)


# -- the enclosure ----------------------------------------------------------------------------


@PROPERTY
@given(instances())
def test_the_two_sequences_bracket_the_exact_fixed_point(instance):
    f, x, z_star = instance
    slack = 1e-13 * (1 + z_star.abs().max())
    b = get_activation(f.activation.name).supremum
    for low, high in zip(iterate(f, x, torch.zeros_like(x), 30), iterate(f, x, torch.full_like(x, b), 30)):
        assert (low <= z_star + slack).all() and (z_star <= high + slack).all()


@PROPERTY
@given(instances(), st.sampled_from([1, 2, 5, 40, 5000]))
def test_the_enclosure_bound_is_never_below_the_true_error(instance, max_iter):
    f, x, z_star = instance
    z, _, info = pcdeq_fixed_point(
        lambda z: f(z, x),
        torch.zeros_like(x),
        max_iter=max_iter,
        tol=1e-12,
        stop_mode="abs",
        enclosure=True,
        upper=f.activation.supremum,
        guard="raise",
    )
    true_error = linf(z - z_star)
    assert (true_error <= info["error_bound"] + 1e-14).all()
    if info["converged"].all():
        assert (info["error_bound"] <= 1e-12 * max(1.0, z_star.abs().max().item()) * 10).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_enclosure_stops_on_the_certified_gap(activation):
    f, x = dense_instance(activation=activation, scale=2.0)
    z, _, info = pcdeq_fixed_point(
        lambda z: f(z, x),
        torch.zeros_like(x),
        max_iter=500,
        tol=1e-6,
        enclosure=True,
        upper=f.activation.supremum,
    )
    assert info["converged"].all()
    assert (info["error_bound"] <= 1e-6 * linf(z)).all()
    assert (linf(z - exact_fixed_point(f, x)) <= info["error_bound"]).all()


def test_the_enclosure_needs_a_finite_upper_bound(clean_activation_registry):
    f, x = dense_instance()
    with pytest.raises(InvalidInputError, match="finite positive upper bound"):
        pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), enclosure=True, upper=math.inf)
    with pytest.raises(InvalidInputError, match="Pass upper=<supremum>"):
        pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), enclosure=True)
    register_activation("log1p", torch.log1p, supremum=math.inf)
    g = PcDEQLinear(4, "log1p")
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True)
    u = g.inject(torch.randn(2, 4))
    with pytest.raises(InvalidInputError, match=r"'log1p' has none.*Set pcdeq_enclosure_upper"):
        deq(lambda z: g(z, u), torch.zeros_like(u))
    # the remedy it names: an upper start known to bound z* (guarantees.md), checked by the enclosure
    bounded = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, pcdeq_enclosure_upper=5.0)
    _, info = bounded(lambda z: g(z, u), torch.zeros_like(u))
    assert bool(info["converged"].all()) and float(info["error_bound"].max()) < 1e-3


@pytest.mark.parametrize("guard", ["off", "raise"])
def test_an_upper_start_below_the_fixed_point_is_refused_whatever_the_guard(guard):
    # A start u with f(u) > u somewhere: the upper sequence rises, and the gap between the two
    # sequences no longer bounds the error (here it would be 5x below the true error).
    f, x = dense_instance(scale=1.0)
    options = dict(max_iter=200, tol=1e-8, enclosure=True, guard=guard)
    solve = lambda upper: pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), upper=upper, **options)  # noqa: E731
    z_star = exact_fixed_point(f, x)
    low = 0.5 * z_star.min().item()
    with pytest.raises(InvalidInputError, match=r"upper start 0.\d+ is not an upper bound of the fixed"):
        solve(low)
    # A start below the supremum with f(u) <= u is valid, and certifies: u = max f(sup), since
    # u <= sup gives f(u) <= f(sup) <= u for a monotone f.
    tight = f(torch.ones_like(x), x).max().item()
    assert tight < 1 and (f(torch.full_like(x, tight), x) <= tight).all()
    z, _, info = solve(tight)
    assert (linf(z - z_star) <= info["error_bound"]).all()
    assert (info["upper"] >= z_star).all()


def test_a_nan_at_the_upper_start_is_reported_as_non_finite_not_as_a_low_start():
    # f is NaN at the upper start only (and a low start would read as one too, were NaN ignored)
    f, x = dense_instance(scale=1.0)
    w = f.weight.detach()
    g = lambda z: torch.tanh(z @ w.T + x) + torch.where(z > 0.9, math.nan, 0.0)  # noqa: E731
    with pytest.raises(NonFiniteError, match="Iterate 2 of the fixed-point solve holds NaN or Inf"):
        pcdeq_fixed_point(g, torch.zeros_like(x), enclosure=True, upper=1.0)


# -- the rate bound ---------------------------------------------------------------------------


@PROPERTY
@given(instances())
def test_the_rate_bound_is_at_least_the_spectral_radius_and_below_one(instance):
    f, x, z_star = instance
    q = rate_bound(lambda z: f(z, x), z_star)
    radius = torch.linalg.eigvals(jacobians(f, x, z_star)).abs().amax(dim=1)
    assert (radius <= q + 1e-12).all()
    assert (q < 1).all()


def test_sigmoid_rate_bound_is_at_most_one_half():
    f, x = dense_instance(activation="sigmoid", scale=3.0)
    assert (rate_bound(lambda z: f(z, x), exact_fixed_point(f, x)) <= 0.5).all()


@PROPERTY
@given(instances(), st.integers(0, 10_000))
def test_the_rate_certificate_holds_entrywise_and_contracts_the_adjoint_in_its_norm(instance, seed):
    """J v <= q v entrywise, v > 0, and ||J^T y||_v <= q ||y||_v for any y; the power step
    never loosens the one-product bound."""
    f, x, z_star = instance
    q, v = rate_certificate(lambda z: f(z, x), z_star)
    q_one, _ = rate_certificate(lambda z: f(z, x), z_star, power_step=False)
    jac = jacobians(f, x, z_star)
    flat = v.flatten(1)
    assert (flat > 0).all()
    assert ((jac @ flat.unsqueeze(2)).squeeze(2) <= q[:, None] * flat * (1 + 1e-12) + 1e-300).all()
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(z_star.shape, dtype=torch.float64, generator=generator).flatten(1)
    jt_y = (jac.transpose(1, 2) @ y.unsqueeze(2)).squeeze(2)
    weighted = lambda t: (t.abs() * flat).sum(dim=1)  # noqa: E731
    assert (weighted(jt_y) <= q * weighted(y) * (1 + 1e-12)).all()
    assert (q <= q_one).all()


def test_the_power_step_brings_the_bound_near_the_radius_where_injections_sit_at_the_floor():
    """README's example: the one-product bound is 0.9998, the radius 0.024."""
    torch.manual_seed(0)
    f = PcDEQLinear(64).double()
    x = f.inject(torch.randn(8, 64, dtype=torch.float64))
    z_star = exact_fixed_point(f, x)
    radius = torch.linalg.eigvals(jacobians(f, x, z_star)).abs().amax(dim=1)
    assert rate_certificate(lambda z: f(z, x), z_star, power_step=False).rate.max() > 0.999
    q = rate_bound(lambda z: f(z, x), z_star)
    assert (radius <= q).all() and (q <= 2 * radius).all()


def test_the_power_step_is_not_taken_where_float16_rounds_its_products_away():
    """States of 2e-5 in float16: v = J z + 1e-3 z falls below the normal range, where J v
    rounds to 0 and the stepped q would read 0; the bound stays the one of v = z."""
    torch.manual_seed(0)
    f = PcDEQLinear(32, "tanh", dtype=torch.float16)
    x = (torch.rand(4, 32) * 1.5e-5 + 2e-5).half()
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(50):
            z = f(z, x)
        w = f.weight.double()
        slope = 1 - torch.tanh(z.double() @ w.T + x.double()) ** 2
    radius = torch.linalg.eigvals(slope[:, :, None] * w).abs().amax(dim=1)
    q = rate_bound(lambda v: f(v, x), z)
    assert (q.double() >= radius).all() and (q < 1).all()


# -- the certified backward solve -------------------------------------------------------------


@PROPERTY
@given(instances(), st.sampled_from([2, 5, 50, 5000]), st.booleans())
def test_the_backward_error_bound_is_never_below_the_true_error(instance, max_iter, power_step):
    f, x, z_star = instance
    n = z_star[0].numel()
    jac = jacobians(f, x, z_star)
    grad = torch.randn(z_star.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # the adjoint equation y = J^T y + grad, solved directly
    eye = torch.eye(n, dtype=torch.float64)
    exact = torch.linalg.solve(eye - jac.transpose(1, 2), grad.flatten(1).unsqueeze(2)).squeeze(2)

    def adjoint(y):
        return (jac.transpose(1, 2) @ y.flatten(1).unsqueeze(2)).squeeze(2).view_as(y) + grad

    q, weights = rate_certificate(lambda z: f(z, x), z_star, power_step=power_step)
    with warnings.catch_warnings():  # q near 1 raises the tolerance, with a warning: expected here
        warnings.simplefilter("ignore", PcDEQWarning)
        y, _, info = pcdeq_fixed_point(
            adjoint,
            torch.zeros_like(grad),
            max_iter=max_iter,
            tol=1e-12,
            stop_mode="abs",
            weights=weights,
            rate=q,
        )
    weighted = lambda v: (v.abs() * weights.flatten(1)).sum(dim=1)  # noqa: E731
    true_error = weighted(y.flatten(1) - exact)
    # the direct solve is itself exact only to a few ulps of its solution
    assert (true_error <= info["error_bound"] + 1e-14 * weighted(exact)).all()


@pytest.mark.parametrize("path", ["recorded", "closed_form"])
def test_the_certified_backward_solves_in_the_norm_its_rate_holds_in(path, monkeypatch):
    """The weights and rate that the core hands its backward solver certify J^T where the
    gradient linearizes f: J w <= q w entrywise, with the power step's q. The recorded gradient
    linearizes at the returned state, by automatic differentiation; the closed form at the last
    step's input, by two products with W, which are also the forward's rate_bound."""
    from torchdeq_pcdeq import backward, certify, core

    f, x = dense_instance(activation="tanh", scale=2.0)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, b_tol=1e-10, f_tol=1e-12)
    producer = deq.produce_grad[-1]
    taken = []
    if path == "recorded":
        producer = producer.recorded
    else:  # no forward-mode automatic differentiation anywhere in the step
        monkeypatch.setattr(certify, "_jvp", lambda *args: pytest.fail("forward-mode product"))
        for module in (core, backward):
            counted = lambda *args, take=module.closed_form_certificate: taken.append(1) or take(*args)  # noqa: E731
            monkeypatch.setattr(module, "closed_form_certificate", counted)
    calls, solver = [], producer.b_solver
    producer.b_solver = lambda func, x0, **kwargs: calls.append(kwargs) or solver(func, x0, **kwargs)
    u = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    xu = f.inject(u)
    func = (lambda z: f(z, xu)) if path == "closed_form" else (lambda z: f(z, xu).clone())
    z_out, info = deq(func, torch.zeros_like(xu))
    nodes = {"recorded": "_ImplicitGradBackward", "closed_form": "_ClosedFormImplicitGradBackward"}
    assert type(z_out[-1].grad_fn).__name__ == nodes[path]
    z_out[-1].sum().backward()
    monkeypatch.undo()
    (kwargs,) = calls
    weights, rate = kwargs["weights"].flatten(1), kwargs["rate"]
    z_in = z_out[-1].detach()
    if path == "closed_form":  # the iterate before the returned one, computed again
        z_in = torch.zeros_like(xu)
        with torch.no_grad():
            for _ in range(int(info["trace_steps"][-1]) - 1):
                z_in = f(z_in, xu)
            assert torch.equal(f(z_in, xu), z_out[-1].detach())
        assert torch.equal(info["rate_bound"], rate) and len(taken) == 1  # taken once, in the forward
    jac = jacobians(f, xu.detach(), z_in)
    assert ((jac @ weights.unsqueeze(2)).squeeze(2) <= rate[:, None] * weights * (1 + 1e-12)).all()
    one_product = rate_certificate(lambda z: f(z, xu), z_in, power_step=False).rate
    assert (rate < 0.9 * one_product).all()  # the power step's bound, in its own norm


def test_a_certified_backward_finer_than_its_forward_is_said_to_miss_the_forwards_error(monkeypatch):
    f, x = dense_instance(activation="tanh", scale=0.9)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, f_tol=1e-3, b_tol=1e-9)
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))  # (built and solved: nothing to say)
    forget_warnings(monkeypatch)  # said once per process
    f.linear.weight.requires_grad_()
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
    with pytest.warns(PcDEQWarning, match=r"below b_tol=1e-09, .* within f_tol=0.001 .* well below b_tol"):
        z_out[-1].sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for config in (dict(f_tol=1e-9, b_tol=1e-9), dict(f_tol=1e-3, b_tol=1e-9, pcdeq_rate_bound=False)):
            forget_warnings(monkeypatch)
            deq = torchdeq.get_deq(core="pcdeq", **{"pcdeq_rate_bound": True, **config})
            deq(lambda z: f(z, x), torch.zeros_like(x))[0][-1].sum().backward()
        eval_only = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, f_tol=1e-3).eval()
        eval_only(lambda z: f(z, x), torch.zeros_like(x))


@pytest.mark.parametrize("gap", [2.0**-18, 2.0**-21])
def test_the_certified_backward_bound_covers_the_rounding_of_q_itself(gap, monkeypatch):
    """J = W = 1 - gap on a 1-unit layer in float32 (tiny injections: tanh's slope rounds to 1):
    q computed an ulp below J made the bound (q d + r) / (1 - q) 25% short of the error of the
    very system solved (the stop is early, abs tolerance, a tiny loss gradient). Raised by its
    rounding, q certifies where it can and is refused (q >= 1) where it cannot."""
    torch.manual_seed(0)
    layer = PcDEQLinear(1, "tanh", nonnegativity="project")
    with torch.no_grad():
        layer.linear.weight.fill_(1 - gap)
    x = (torch.rand(256, 1, dtype=torch.float64) * 1e-10 + 1e-12).float()
    deq = torchdeq.get_deq(
        core="pcdeq", f_max_iter=50, b_tol=1e-3, b_stop_mode="abs", pcdeq_rate_bound=True,
        pcdeq_nonconvergence="ignore",
    )  # fmt: skip

    forget_warnings(monkeypatch)  # said once per process
    producer, seen = deq.produce_grad[-1], {}
    solver = producer.b_solver

    def recording(func, x0, **kwargs):
        y, states, info = solver(func, x0, **kwargs)
        seen.update(kwargs, g=x0, y=y, info=info)
        return y, states, info

    producer.b_solver = recording
    z_out, _ = deq(lambda z: layer(z, x), torch.zeros_like(x))
    exact_j = (1 - z_out[-1].detach().double() ** 2) * layer.weight.detach().double()
    if gap < 2.0**-20:  # within q's rounding margin of 1: nothing to certify
        with pytest.warns(PcDEQWarning, match="cannot be certified"):
            (z_out[-1] * 1e-9).sum().backward()
        assert "weights" not in seen
        return
    (z_out[-1] * 1e-9).sum().backward()
    assert (seen["rate"].double() >= exact_j.view(-1)).all()
    y_star = seen["g"].double() / (1 - exact_j)  # the exact adjoint of the system solved
    error = ((seen["y"].double() - y_star).abs() * seen["weights"].double()).view(-1)
    assert (error <= seen["info"]["error_bound"].double()).all()


@pytest.mark.parametrize("asked", ["pcdeq_rate_bound", "sradius", "training, phantom gradient"])
@pytest.mark.parametrize("no_grad", [True, False])
def test_the_rate_bound_of_a_layer_solve_is_taken_in_closed_form(asked, no_grad, monkeypatch):
    """In eval, and in training without the closed-form gradient, a plain solve that iterated one
    pcDEQ layer is certified at its last step by two products with the W the solve used (its
    cached W, without a graph, whether or not the caller records gradients) and no forward-mode
    product: the certificate of the step's Jacobian, at the iterate below z*, so a bound of the
    spectral radius at z*."""
    from torchdeq_pcdeq import certify, core

    monkeypatch.setattr(certify, "_jvp", lambda *args: pytest.fail("forward-mode product"))
    weights, take = [], core.closed_form_certificate
    counted = lambda layer, weight, *args: weights.append(weight) or take(layer, weight, *args)  # noqa: E731
    monkeypatch.setattr(core, "closed_form_certificate", counted)
    f, x = dense_instance(activation="tanh", scale=2.0, nonnegativity="weight_norm")
    training = asked.startswith("training")
    options = {"pcdeq_sradius": "rate_bound"} if asked == "sradius" else {"pcdeq_rate_bound": True}
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-10, ift=not training, **options).train(training)
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=asked == "sradius")
    monkeypatch.undo()
    q = info["sradius"] if asked == "sradius" else info["rate_bound"]
    (weight,) = weights
    assert not weight.requires_grad  # the solve's W, from its cache: no graph recorded
    z_in = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(int(info["trace_steps"][-1]) - 1):
            z_in = f(z_in, x)
    torch.testing.assert_close(q, rate_certificate(lambda z: f(z, x), z_in).rate)
    radius = torch.linalg.eigvals(jacobians(f, x, z_out[-1].detach())).abs().amax(dim=1)
    assert (q >= radius).all() and (q < 1).all()


def test_a_core_solving_inside_f_leaves_the_outer_solve_its_own_options(monkeypatch):
    """A core called inside f sets what its own solves need (whether they start from 0, whether
    they take a rate bound) for the duration of its call only: the outer core's later solver
    segments still take their rate bound, and its start from 0 is not mistaken for the inner's."""
    from torchdeq_pcdeq import core as core_module

    forget_warnings(monkeypatch)  # the warning would be said again
    f, x = dense_instance(activation="tanh", scale=2.0)
    inner = torchdeq.get_deq(core="pcdeq").eval()

    def func(z):
        with torch.no_grad():
            inner(lambda v: f(v, x), torch.ones_like(x))  # its own solve, from a nonzero start
        return f(z, x)

    outer = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, n_states=2, f_tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PcDEQWarning)  # no "from a nonzero z_init" warning
        z_out, info = outer(func, torch.zeros_like(x))
    radius = torch.linalg.eigvals(jacobians(f, x, z_out[-1].detach())).abs().amax(dim=1)
    assert (info["rate_bound"] >= radius).all() and (info["rate_bound"] < 1).all()
    assert getattr(core_module._LAST_SOLVE, "call", None) is None  # each call restored the one before


def test_under_autocast_the_training_rate_bound_is_taken_in_float32_not_in_closed_form(monkeypatch):
    """Autocast computes the layer's products in bfloat16, and the gradient records f there: the
    rate bound keeps rate_certificate's float32 products instead of two bfloat16 ones."""
    from torchdeq_pcdeq import core

    monkeypatch.setattr(core, "closed_form_certificate", lambda *args: pytest.fail("closed form"))
    f, x = dense_instance(activation="tanh", scale=2.0, dtype=torch.float32)
    x.requires_grad_()
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, f_tol=0.05, b_tol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    assert type(z_out[-1].grad_fn).__name__ == "_ImplicitGradBackward"
    radius = torch.linalg.eigvals(jacobians(f.double(), x.detach().double(), z_out[-1].detach().double()))
    assert (info["rate_bound"].double() >= radius.abs().amax(dim=1)).all() and (info["rate_bound"] < 1).all()


def test_the_core_certifies_its_backward_solve_and_reports_to_the_writer():
    f, x = dense_instance(activation="tanh", scale=2.0)
    seen = []
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, b_tol=1e-10, f_tol=1e-12)
    u = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    xu = f.inject(u)
    z_out, info = deq(lambda z: f(z, xu), torch.zeros_like(xu), backward_writer=seen.append)
    assert (info["rate_bound"] < 1).all()
    z_out[-1].sum().backward()
    (backward,) = seen
    assert backward["converged"].all()
    assert (
        backward["error_bound"] <= 1e-10 * (backward["abs_trace"][:, -1] / backward["rel_trace"][:, -1])
    ).all()
    # the certified gradient matches an uncertified one solved to the same accuracy
    plain = torchdeq.get_deq(core="pcdeq", b_tol=1e-12, f_tol=1e-12)
    v = u.detach().clone().requires_grad_()
    xv = f.inject(v)
    plain(lambda z: f(z, xv), torch.zeros_like(xv))[0][-1].sum().backward()
    torch.testing.assert_close(u.grad, v.grad, rtol=1e-8, atol=1e-10)


# -- broken preconditions are detected --------------------------------------------------------


def test_a_negative_weight_is_detected_by_the_enclosure():
    torch.manual_seed(0)
    w = torch.rand(6, 6, dtype=torch.float64) * 0.3
    w[0, 1] = -1.5
    x = torch.rand(1, 6, dtype=torch.float64) + 0.5
    broken = r"lower sequence fell|upper sequence rose|passed the upper"
    with pytest.raises(NotPositiveMonotoneError, match=broken):
        pcdeq_fixed_point(
            lambda z: torch.tanh(z @ w.T + x),
            torch.zeros(1, 6, dtype=torch.float64),
            enclosure=True,
            upper=1.0,
            guard="raise",
            check_every=1,
        )


def test_a_negative_injection_is_detected_by_the_enclosure():
    f, _ = dense_instance(activation="tanh")
    x = -torch.rand(3, 12, dtype=torch.float64)
    with pytest.raises(NotPositiveMonotoneError, match="negative entries"):
        pcdeq_fixed_point(
            lambda z: torch.tanh(z @ f.weight.T + x),
            torch.zeros_like(x),
            enclosure=True,
            upper=1.0,
            guard="raise",
        )


def test_a_non_concave_activation_forced_past_the_registry_is_detected():
    square = Activation("square", lambda t: t.square().clamp(max=1.0), 0.0, 1.0, 1)  # convex on [0, 1]
    f = PcDEQLinear(4, square, nonnegativity="project", dtype=torch.float64)
    with torch.no_grad():
        f.linear.weight.fill_(1.5 / 4)
    x = torch.full((1, 4), 0.1, dtype=torch.float64)  # fixed points near 0.015 and at 1
    with pytest.raises(NonUniqueFixedPointError, match=r"two different fixed points.*not concave"):
        pcdeq_fixed_point(
            lambda z: f(z, x), torch.zeros_like(x), max_iter=500, enclosure=True, upper=1.0, guard="raise"
        )


def test_a_gap_stalled_by_rounding_on_a_slow_valid_layer_is_not_called_two_fixed_points(monkeypatch):
    # relu6(0.999 z + 1e-3) has the one fixed point z* = 1, and contracts by 0.999: in float32
    # both sequences stop moving about (rounding + margin) / (1 - q) ~ 4e-3 apart, above the
    # tolerance asked. The solve stops at the floor that q certifies, said, not raised.
    forget_warnings(monkeypatch)  # warned once per process
    f = PcDEQLinear(1, "relu6", nonnegativity="project")
    with torch.no_grad():
        f.linear.weight.fill_(0.999)
    x = torch.full((1, 1), 1e-3)
    with pytest.warns(PcDEQWarning, match=r"cannot go below 0\.00\d+ .* q = 0\.999"):
        z, _, info = pcdeq_fixed_point(
            lambda z: f(z, x), torch.zeros_like(x), max_iter=40_000, tol=5e-6, enclosure=True, upper=6.0,
            guard="raise",
        )  # fmt: skip
    assert info["converged"].all() and info["trace_steps"][-1] < 40_000
    assert 1e-5 < (info["upper"] - info["lower"]).max() < 1e-2  # stalled apart, by rounding only
    assert (info["lower"] <= 1.0).all() and (info["upper"] >= 1.0).all()  # the bracket holds z*
    assert abs(z.item() - 1.0) <= info["error_bound"].item()


def _two_fixed_points_with_a_rate_above_1(z):
    # fixed points (5.56, 1.06) and (95, 10); at the lower one q = max_i (J z)_i / z_i is about 1.9
    z1, z2 = z[:, :1], z[:, 1:]
    first = (10 * torch.relu(z2 - 0.5)).clamp(max=100)
    second = (0.01 * z1 + 1 + 9 * (z1 - 20).clamp(0, 1)).clamp(max=10)
    return torch.cat([first, second], dim=1)


@pytest.mark.parametrize("inference", [False, True])
def test_two_fixed_points_are_caught_where_the_rate_bound_is_above_1_in_and_out_of_inference_mode(inference):
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    mode = torch.inference_mode() if inference else contextlib.nullcontext()  # (q on a copy)
    with mode, pytest.raises(NonUniqueFixedPointError, match="two different fixed points"):
        f = _two_fixed_points_with_a_rate_above_1
        pcdeq_fixed_point(f, x0, max_iter=500, enclosure=True, upper=100.0, guard="raise")


def test_the_guard_judges_each_sample_whose_gap_stalls_on_its_own():
    from torchdeq_pcdeq.guard import Guard
    from torchdeq_pcdeq.solver import _Monitor

    # sample 0 contracts by 0.999 (its stalled gap is rounding), sample 1 by 0.5 (its is not)
    rate = torch.tensor([[0.999], [0.5]])
    f = lambda z: rate * z + 1e-3  # noqa: E731
    x0 = torch.zeros(2, 1)
    monitor, guard = _Monitor(x0, 5e-6, "rel", "auto", "enclosure", False), Guard("raise", x0)
    low = torch.tensor([[1.0], [0.2]])

    def check(k, gaps):
        high = low + torch.tensor(gaps).view(2, 1)
        scalars, report = guard.enclosure(k, low, high, low, high, monitor, f)
        report([value.item() for value in scalars])

    check(2, [1e-4, 6.0])
    check(4, [1e-4, 5.9])  # sample 0 stalled, within 16 ulps / (1 - q); sample 1 still shrinking
    with pytest.raises(NonUniqueFixedPointError, match=r"\(5\.9\) has stopped shrinking"):
        check(8, [1e-4, 5.9])  # sample 1 stalled too, far beyond rounding


@pytest.mark.parametrize(
    "dtype, weight, injection", [(torch.float32, 10 / 8, 1e-9), (torch.float16, 3 / 8, None)]
)
def test_a_gap_that_rounds_alike_while_the_lower_sequence_still_rises_is_not_two_fixed_points(
    dtype, weight, injection
):
    """The upper sequence is still, the lower one rises from a tiny injection by less than half an
    ulp of the gap: at two consecutive checks the gap rounds to the same value. That is no stall."""
    f = PcDEQLinear(8, "tanh", nonnegativity="project", dtype=dtype)
    with torch.no_grad():
        f.linear.weight.fill_(weight)
    x = (
        f.inject(torch.full((2, 8), -100.0, dtype=dtype))
        if injection is None
        else torch.full((2, 8), injection, dtype=dtype)
    )
    tol = 0.05 if dtype == torch.float16 else 1e-2  # above float16's certified floor (0.0176)
    z, _, info = pcdeq_fixed_point(
        lambda z: f(z, x),
        torch.zeros_like(x),
        max_iter=200,
        tol=tol,
        enclosure=True,
        upper=1.0,
        guard="raise",
        check_every=1,
    )
    assert info["converged"].all() and bool((info["error_bound"] <= tol * z.amax(dim=1)).all())


def test_certified_bounds_cover_float16s_absolute_rounding_below_its_normal_range():
    """float16 rounds absolutely (2^-24) below 6.1e-5: a relative margin alone missed it."""
    x = torch.full((1, 1), 1e-7, dtype=torch.float16)
    z, _, info = pcdeq_fixed_point(
        lambda z: torch.tanh(0.1 * z + x),
        torch.zeros_like(x),
        max_iter=200,
        tol=0.05,
        enclosure=True,
        upper=1.0,
    )
    exact = torch.zeros(1, 1, dtype=torch.float64)
    for _ in range(100):
        exact = torch.tanh(0.1 * exact + x.double())
    assert (z.double() - exact).abs().max() <= info["error_bound"].double().max()
    g = torch.tensor([[3e-7, -1e-7, 1.5e-7, 3e-7]], dtype=torch.float16)  # a small loss gradient
    y, _, info = pcdeq_fixed_point(
        lambda y: 0.5 * y + g,
        g.clone(),
        max_iter=100,
        tol=0.1,
        weights=torch.ones(1, 4, dtype=torch.float16),
        rate=torch.tensor([0.5]),
    )
    assert (y.double() - 2 * g.double()).abs().sum() <= info["error_bound"].double().max()


def test_a_contraction_bound_at_float16s_absolute_rounding_stops_there_and_says_how_far(monkeypatch):
    """A sample whose gradient lies near float16's subnormal range cannot be certified below
    twice its rounding bound, absolute there: it stops at that floor, honest, instead of
    iterating to max_iter, and the sample of normal size still meets the relative limit."""
    forget_warnings(monkeypatch)  # said once per process
    g = torch.tensor([[0.3, -0.1, 0.15, 0.3], [3e-6, -1e-6, 1.5e-6, 3e-6]], dtype=torch.float16)
    weights, rate = torch.ones(2, 4, dtype=torch.float16), torch.full((2,), 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _, info = pcdeq_fixed_point(
            lambda y: 0.5 * y + g, g.clone(), max_iter=300, tol=1e-6, weights=weights, rate=rate
        )
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and said[0].startswith("tol=1e-06 (rel) is below what torch.float16")
    assert said[1].startswith("The certified bound cannot go below 0.0625 (relative) in torch.float16")
    assert "contraction factor q = 0.5." in said[1] and said[1].endswith(
        "certify in a wider dtype for a finer tolerance."
    )
    assert info["converged"].all() and info["trace_steps"][-1] < 40
    true_error = (y.double() - 2 * g.double()).abs().sum(dim=1)
    assert (true_error <= info["error_bound"].double()).all()
    relative = info["error_bound"].double() / y.double().abs().sum(dim=1)
    assert relative[0] <= 0.0625 < relative[1]  # the raised limit; absolute rounding dominates


def _one_tanh_unit(weight=0.9, injection=0.01):
    f = PcDEQLinear(1, "tanh", nonnegativity="project", dtype=torch.float64)
    with torch.no_grad():
        f.linear.weight.fill_(weight)
    x = torch.full((1, 1), injection, dtype=torch.float64)
    z = torch.zeros((), dtype=torch.float64)
    for _ in range(2000):
        z = torch.tanh(weight * z + injection)
    return f, x, (1 - torch.tanh(weight * z + injection) ** 2) * weight  # rho of df/dz at z*


def test_the_sradius_bound_under_the_enclosure_is_taken_below_the_fixed_point():
    f, x, rho = _one_tanh_unit()
    config = dict(core="pcdeq", pcdeq_sradius="rate_bound", pcdeq_enclosure=True, f_max_iter=3)
    deq = torchdeq.get_deq(config, pcdeq_nonconvergence="ignore").eval()
    with torch.no_grad():
        z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
    # after 3 iterations the midpoint is far above z*, where q (0.85 there) is below rho
    assert z_out[-1].item() > 2 * info["lower"].item()
    assert rho.item() <= info["sradius"].item() < 1
    from torchdeq_pcdeq import core as core_module

    assert core_module._LAST_SOLVE.below is None  # no state of the solve kept past the call


def test_the_sradius_bound_reuses_the_rate_bound_of_the_solve(monkeypatch):
    from torchdeq_pcdeq import core as core_module

    calls = []
    counted = lambda func, z: calls.append(z) or rate_bound(func, z)  # noqa: E731
    monkeypatch.setattr(core_module, "rate_bound", counted)
    f, x, rho = _one_tanh_unit()
    config = dict(core="pcdeq", pcdeq_sradius="rate_bound", pcdeq_rate_bound=True, pcdeq_enclosure=True)
    deq = torchdeq.get_deq(config).eval()
    with torch.no_grad():
        _, info = deq(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
    assert len(calls) == 1 and calls[0] is info["lower"]  # one bound, below z*
    assert torch.equal(info["sradius"], info["rate_bound"]) and info["sradius"] is not info["rate_bound"]
    assert rho.item() <= info["sradius"].item() < 1


def test_a_rate_bound_from_a_nonzero_start_says_it_is_an_estimate(monkeypatch):
    forget_warnings(monkeypatch)
    f, x, rho = _one_tanh_unit()
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, f_max_iter=3, pcdeq_nonconvergence="ignore")
    with pytest.warns(PcDEQWarning, match="nonzero z_init.*estimate, not a bound"):
        _, info = deq.eval()(lambda z: f(z, x), torch.ones_like(x))
    assert info["rate_bound"].item() < rho.item()  # the case the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", PcDEQWarning)
        _, info = deq(lambda z: f(z, x), torch.zeros_like(x))  # from 0: a bound, and quiet
    assert info["rate_bound"].item() >= rho.item()


def test_the_guard_through_the_core_uses_the_enclosure():
    square = Activation("square", lambda t: t.square().clamp(max=1.0), 0.0, 1.0, 1)
    f = PcDEQLinear(4, square, nonnegativity="project")
    with torch.no_grad():
        f.linear.weight.fill_(1.5 / 4)
    x = torch.full((2, 4), 0.1)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True)
    with pytest.raises(NonUniqueFixedPointError):
        deq(lambda z: f(z, x), torch.zeros_like(x))
    plain = torchdeq.get_deq(core="pcdeq")  # without the enclosure this goes unnoticed
    z_out, info = plain(lambda z: f(z, x), torch.zeros_like(x))
    assert info["converged"].all() and z_out[-1].max() < 0.1


# -- the core ---------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_core_reports_error_bound_rate_bound_and_min_injection(training):
    f, x = dense_instance(activation="softsign", scale=2.0, dtype=torch.float32)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, pcdeq_rate_bound=True).train(training)
    z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    exact = exact_fixed_point(f.double(), x.double()).float()
    f.float()
    assert info["converged"].all()
    assert (linf(z_out[-1].detach() - exact) <= info["error_bound"] + 1e-6).all()
    assert (info["rate_bound"] < 1).all() and info["rate_bound"].shape == (3,)
    torch.testing.assert_close(info["min_injection"], x.amin(dim=1))
    if training:
        z_out[-1].sum().backward()
        assert f.linear.weight.grad is not None


def test_min_injection_is_nan_without_pcdeq_layers():
    w = torch.rand(3, 3) * 0.1
    x = torch.rand(2, 3) + 0.1
    _, info = torchdeq.get_deq(core="pcdeq")(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x))
    assert info["min_injection"].isnan().all()


def test_enclosure_with_plain_torch_layers_needs_the_upper_bound():
    w = torch.rand(3, 3) * 0.1
    x = torch.rand(2, 3) + 0.1
    with pytest.raises(InvalidInputError, match="Set pcdeq_enclosure_upper"):
        torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True)(
            lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x)
        )
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, pcdeq_enclosure_upper=1.0)
    _, info = deq(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x))
    assert info["converged"].all() and (info["error_bound"] < 1e-3).all()


def test_sradius_can_be_the_certified_rate_bound():
    f, x = dense_instance(activation="tanh", scale=2.0, dtype=torch.float32)
    power = torchdeq.get_deq(core="pcdeq").eval()
    certified = torchdeq.get_deq(core="pcdeq", pcdeq_sradius="rate_bound").eval()
    _, estimate = power(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
    _, bound = certified(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
    assert bound["sradius"].shape == (3,)
    assert (bound["sradius"] >= estimate["sradius"] - 1e-4).all() and (bound["sradius"] < 1).all()


def test_add_pcdeq_args_exposes_every_option_and_layers_read_them(monkeypatch):
    import argparse
    import sys

    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    add_pcdeq_args(parser)
    text = parser.format_help()
    for flag in [
        "enclosure",
        "enclosure_upper",
        "rate_bound",
        "guard",
        "nonnegativity",
        "injection_floor",
        "sradius",
    ]:
        assert f"--pcdeq_{flag}" in text
    argv = ["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--pcdeq_enclosure", "--pcdeq_rate_bound"]
    argv += ["--pcdeq_nonnegativity", "project", "--pcdeq_injection_floor", "1e-3", "--pcdeq_guard", "warn"]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])  # a script's command line
    args = parser.parse_args()
    deq = torchdeq.get_deq(args)
    assert deq.enclosure and deq.certify_rate and deq.guard == "warn"
    layer = PcDEQLinear(5, args=args)
    assert layer.nonnegativity == "project" and layer.injection_floor == 1e-3
    assert PcDEQLinear(5, nonnegativity="parametrize", args=args).nonnegativity == "parametrize"


def test_option_values_are_validated():
    with pytest.raises(InvalidInputError, match="pcdeq_enclosure must be True or False, got 'yes'"):
        torchdeq.get_deq(core="pcdeq", pcdeq_enclosure="yes")
    with pytest.raises(InvalidInputError, match="pcdeq_enclosure_upper must be a positive finite number"):
        torchdeq.get_deq(core="pcdeq", pcdeq_enclosure_upper=-1.0)
    with pytest.raises(UnknownNameError, match="Did you mean 'pcdeq_rate_bound'"):
        torchdeq.get_deq(core="pcdeq", pcdeq_ratebound=True)


def test_the_enclosure_stops_at_its_rounding_floor_instead_of_running_out_of_iterations(monkeypatch):
    forget_warnings(monkeypatch)  # warned once per process
    f, x = dense_instance(activation="tanh", scale=2.0, dtype=torch.float32)
    with pytest.warns(PcDEQWarning) as said:
        _, _, info = pcdeq_fixed_point(
            lambda z: f(z, x), torch.zeros_like(x), max_iter=500, tol=1e-7, enclosure=True, upper=1.0
        )
    messages = [str(w.message) for w in said]
    assert "below what" in messages[0]  # the dtype's floor, then the one q certifies for this layer
    assert len(messages) == 2 and re.search(r"cannot go below \S+ .* q = 0\.\d+", messages[1])
    assert info["converged"].all()
    assert info["trace_steps"][-1] < 100


# -- regressions found in review --------------------------------------------------------------


def _bisected_fixed_point(activation, w: float, x: torch.Tensor) -> torch.Tensor:
    """z* of ``z = activation(w z + x)`` per entry, in float64, by bisection on [0, 1]."""
    sigma = {"tanh": torch.tanh, "softsign": torch.nn.functional.softsign}[activation]
    low, high = torch.zeros_like(x, dtype=torch.float64), torch.ones_like(x, dtype=torch.float64)
    for _ in range(200):
        mid = (low + high) / 2
        rises = sigma(w * mid + x.double()) > mid
        low, high = torch.where(rises, mid, low), torch.where(rises, high, mid)
    return low


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["tanh", "softsign"])
def test_the_float32_enclosure_brackets_z_star_on_a_slow_layer(activation, monkeypatch):
    """Found by review: at q = 0.999 float32 sequences stalled together ulps / (1 - q) off z*,
    both on the same side, and 29 of 300 samples reported converged with an error 6 to 9 times
    their error_bound. The directed margin keeps each sequence on its side of z*."""
    forget_warnings(monkeypatch)  # the certified floor at this q is said once per process
    f = PcDEQLinear(1, activation, nonnegativity="project")
    f.weight = torch.full((1, 1), 0.999)
    x = f.inject(-3 * torch.rand(64, 1, generator=torch.Generator().manual_seed(0)))
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, f_max_iter=20_000).eval()
    with torch.no_grad(), pytest.warns(PcDEQWarning, match="cannot go below"):
        z, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    exact = _bisected_fixed_point(activation, 0.999, x)
    assert info["converged"].all()
    assert (info["lower"].double() <= exact).all() and (exact <= info["upper"].double()).all()
    assert ((z[-1].double() - exact).abs()[:, 0] <= info["error_bound"]).all()


def test_an_upper_start_just_below_z_star_is_refused_though_f_rounds_below_it():
    """Found by review: a start 1e-6 below z* whose computed f(b) rounds to b or below passed
    the exact check, and the bound came out 40 times below the error."""
    f = PcDEQLinear(1, "tanh", nonnegativity="project")
    f.weight = torch.ones(1, 1)
    x = f.inject(torch.full((1, 1), -100.0))
    exact = _bisected_fixed_point("tanh", 1.0, x)
    b, zero = exact.float(), torch.zeros(1, 1)
    with torch.no_grad():  # the lowest start whose computed f does not exceed it
        while bool(f(torch.nextafter(b, zero), x) <= torch.nextafter(b, zero)):
            b = torch.nextafter(b, zero)
        assert b.double() < exact
        with pytest.raises(InvalidInputError, match="is not an upper bound of the fixed point"):
            pcdeq_fixed_point(lambda v: f(v, x), zero, max_iter=1000, enclosure=True, upper=b.item())
        # the supremum is valid however saturated the units (f maps it to itself exactly)
        g = PcDEQLinear(4, "relu6", nonnegativity="project")
        g.weight = torch.full((4, 4), 0.1)
        saturated = g.inject(torch.full((2, 4), 30.0))
        _, _, info = pcdeq_fixed_point(
            lambda v: g(v, saturated), torch.zeros(2, 4), enclosure=True, upper=6.0
        )
        assert info["converged"].all() and (info["lower"] <= 6.0).all() and (info["upper"] >= 6.0).all()


def test_in_training_the_error_bound_covers_the_returned_state():
    # training returns f(midpoint) (the tracked step for the gradient), not the midpoint
    w = torch.tensor(
        [[7.46e-4, 0.334, 6.19e-5], [0.0232, 0.172, 8.58], [2.32e-3, 0.0160, 0.411]], dtype=torch.float64
    )
    x = torch.tensor([[4.12e-5, 1.0e-6, 1.0e-6]], dtype=torch.float64)
    f = PcDEQLinear(3, "relu6", nonnegativity="project", dtype=torch.float64)
    with torch.no_grad():
        f.linear.weight.copy_(w)
    exact = exact_fixed_point(f, x)
    for training in (False, True):
        deq = torchdeq.get_deq(
            core="pcdeq", pcdeq_enclosure=True, f_max_iter=2, pcdeq_nonconvergence="ignore"
        )
        z_out, info = deq.train(training)(lambda z: f(z, x), torch.zeros_like(x))
        assert (linf(z_out[-1].detach() - exact) <= info["error_bound"]).all(), training


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_in_training_the_enclosure_solves_so_that_the_doubled_bound_meets_the_tolerance(stop_mode):
    f = PcDEQLinear(1, "relu6", nonnegativity="project")
    with torch.no_grad():
        f.linear.weight.fill_(0.99)
    x = torch.full((1, 1), 0.01)  # z* = 1, contraction 0.99
    deq = torchdeq.get_deq(
        core="pcdeq", pcdeq_enclosure=True, f_tol=1e-3, f_stop_mode=stop_mode, f_max_iter=5000
    )
    z_out, info = deq.train()(lambda z: f(z, x), torch.zeros_like(x))
    assert info["converged"].all() and (info["error_bound"] <= 1e-3 * info["upper"].amax()).all()
    assert (z_out[-1].detach() - 1.0).abs().max() <= info["error_bound"] + 1e-6
    _, info = deq.eval()(lambda z: f(z, x), torch.zeros_like(x))
    assert info["converged"].all() and (info["error_bound"] > 5e-4 * info["upper"].amax()).all()


def test_the_rate_bound_of_an_unconverged_enclosure_still_bounds_the_spectral_radius_at_z_star():
    f, x = dense_instance(n=8, activation="tanh", scale=0.9, batch=2)
    x = x * 0.01
    radius = torch.linalg.eigvals(jacobians(f, x, exact_fixed_point(f, x))).abs().amax(dim=1)
    for budget in (3, 20, 200):
        deq = torchdeq.get_deq(
            core="pcdeq",
            pcdeq_enclosure=True,
            pcdeq_rate_bound=True,
            f_max_iter=budget,
            f_tol=1e-3,
            pcdeq_nonconvergence="ignore",
        ).eval()
        _, info = deq(lambda z: f(z, x), torch.zeros_like(x))
        assert (info["rate_bound"] >= radius - 1e-12).all(), budget
        assert (info["lower"] <= info["upper"]).all()


def test_a_slow_valid_enclosure_is_not_mistaken_for_two_fixed_points(monkeypatch):
    forget_warnings(monkeypatch)  # warned once per process
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(8, 8, generator=gen, dtype=torch.float64)
    w = (w * 0.999 / torch.linalg.eigvals(w).abs().max()).float()
    f = PcDEQLinear(8, "relu6", nonnegativity="project")
    with torch.no_grad():
        f.linear.weight.copy_(w)
    x = torch.rand(2, 8, generator=gen) * 1e-3 + 1e-4
    with pytest.warns(PcDEQWarning, match=r"cannot go below .* q = 0\.99"):  # (not an error)
        _, info = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, f_max_iter=20_000).eval()(
            lambda z: f(z, x), torch.zeros_like(x)
        )
    assert info["converged"].all() and info["trace_steps"][-1] > 1000


def test_the_rate_bound_of_an_inference_tensor_is_its_copys_and_a_cut_path_is_no_zero_bound():
    """Outside inference mode, an inference tensor dropped the tangent, which read as J = 0:
    q = 0 certified for a map with spectral radius 0.6."""
    w = torch.full((4, 4), 0.2)
    f = lambda v: torch.tanh(v @ w.T + 0.1)  # noqa: E731
    with torch.inference_mode():
        z = torch.full((1, 4), 0.5)
    expected = rate_certificate(f, z.clone()).rate
    assert expected > 0.6 and torch.equal(rate_certificate(f, z).rate, expected)
    with pytest.raises(InvalidInputError, match="found no path from z to f"):
        rate_certificate(lambda v: _tanh_cut_from_its_input(v @ w.T + 0.1), z.clone())


class _TanhWithoutForwardMode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        return torch.tanh(u)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


def _tanh_cut_from_its_input(u):
    with torch.inference_mode():  # (an f that cuts the path from z: no tangent comes out)
        return torch.tanh(u)


@pytest.mark.parametrize("context", ["inference_mode", "no forward-mode product", "a path cut inside f"])
def test_a_slow_valid_layers_stalled_gap_is_never_called_two_fixed_points(context, monkeypatch):
    """q = 0.9989: the gap stalls at rounding over 1 - q. Under inference_mode q was not
    computed and the stall was called two fixed points (NonUniqueFixedPointError, iteration
    20,559); it is now computed on a copy outside inference mode, and the solve stops at the
    floor it certifies. Where f has no forward-mode product at all, the guard gives no verdict,
    with a warning, rather than a false one, and the solve ends unconverged."""
    forget_warnings(monkeypatch)  # said once per process
    options = dict(max_iter=25_000, tol=1e-5, enclosure=True, upper=1.0, guard="raise")
    if context == "inference_mode":
        with torch.inference_mode(), pytest.warns(PcDEQWarning, match=r"cannot go below .* q = 0\.99"):
            _, _, info = pcdeq_fixed_point(
                lambda z: torch.tanh(0.999 * z + 1e-5), torch.zeros(1, 1), **options
            )
        assert info["converged"].all()  # at the floor, said
        return
    else:
        activation = (
            _TanhWithoutForwardMode.apply
            if context == "no forward-mode product"
            else _tanh_cut_from_its_input
        )
        f = lambda z: activation(0.999 * z + 1e-5)  # noqa: E731
        with torch.no_grad(), pytest.warns(PcDEQWarning, match="The guard gives no verdict"):
            _, _, info = pcdeq_fixed_point(f, torch.zeros(1, 1), **options)
    assert not info["converged"].any() and int(info["trace_steps"][-1]) == 25_000


def test_a_half_precision_rate_that_rounds_to_1_gives_no_verdict_not_two_fixed_points(monkeypatch):
    """Found by review: rho(W) = 0.99894 in float16, whose q at the lower sequence rounds to
    1.0: the stalled gap was called two fixed points (NonUniqueFixedPointError at iteration
    4,096) although the layer is valid, z* = (1.304, 1.915, 2.054) below relu6's kink."""
    forget_warnings(monkeypatch)  # said once per process
    weight = [[0.46875, 0.244873046875, 0.1087646484375], [0.5302734375, 0.5478515625, 0.08367919921875]]
    weight.append([0.6181640625, 0.29541015625, 0.329833984375])
    layer = PcDEQLinear(3, "relu6", nonnegativity="project", dtype=torch.float16)
    layer.weight = torch.tensor(weight, dtype=torch.float16)
    x = torch.tensor([[0.00014865, 0.0027409, 0.0051384]], dtype=torch.float16)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, eval_f_max_iter=8192).eval()
    with torch.no_grad(), pytest.warns(PcDEQWarning) as caught:
        _, info = deq(lambda z: layer(z, x), torch.zeros_like(x))
    said = [str(w.message) for w in caught]
    assert any("computed in torch.float16, rounds to 1 or more" in m and "no verdict" in m for m in said)
    assert any("1 of 1 samples did not reach" in m for m in said), said
    # the bracket still holds the fixed point
    exact = torch.tensor([1.304, 1.915, 2.054], dtype=torch.float32)
    assert bool(
        (info["lower"].float() <= exact + 1e-3).all() and (exact - 1e-3 <= info["upper"].float()).all()
    )


def test_an_upper_start_below_the_fixed_point_by_rounding_over_1_minus_q_is_refused():
    """Found by review: z = tanh(z + 1e-7), 1 - q = 4.5e-5, from an upper start 0.999 z*: f(u) - u
    is within a few ulps of u, which the start check allowed, and the upper sequence then rose
    too slowly for the guard: the returned bound (1.5e-4) was below the true error."""
    z_star = 0.006694  # (0.00669430 by bisection in float64)
    f = lambda z: torch.tanh(z + 1e-7)  # noqa: E731
    for below in (0.96, 0.999):
        with pytest.raises(InvalidInputError, match=r"upper start 0.006\d+ is not an upper bound"):
            pcdeq_fixed_point(f, torch.zeros(1, 1), max_iter=10, enclosure=True, upper=below * z_star)
    # the supremum, and max f(sup), pass: f of them is never above them
    for upper in (1.0, f(torch.ones(1, 1)).item()):
        pcdeq_fixed_point(f, torch.zeros(1, 1), max_iter=10, enclosure=True, upper=upper)


def test_the_enclosure_refuses_several_solver_segments():
    with pytest.raises(InvalidInputError, match=r"n_states=2.*restart the bracket"):
        torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, n_states=2)


def test_the_certified_backward_certifies_a_reference_model_with_injections_at_the_floor():
    """Units at the injection floor put the one-product bound (v = z*) within 3e-4 of 1, where
    rounding alone would keep the certified bound near 1e-2; the power step's v certifies the
    configured 1e-4."""
    from torchdeq_pcdeq.models import build_model

    torch.manual_seed(0)
    model = build_model("linear", "mnist", deq={"pcdeq_rate_bound": True})
    seen, states = [], []
    model.cores[0].register_forward_hook(lambda core, args, out: states.append((args[0], out[0][-1])))
    logits, infos = model(torch.rand(64, 1, 28, 28), backward_writer=seen.append)
    logits.sum().backward()  # PcDEQWarning is an error here: no tolerance was raised
    assert infos[0]["min_injection"].min() < 1e-5  # softplus underflows to the floor somewhere
    func, z_star = states[0]
    assert rate_certificate(func, z_star, power_step=False).rate.max() > 0.999
    assert infos[0]["rate_bound"].max() < 0.5
    (backward,) = seen
    assert backward["converged"].all() and backward["nstep"].max() <= 10
    scale = backward["abs_trace"][:, -1] / backward["rel_trace"][:, -1]  # ||f(y)||_v per sample
    assert (backward["error_bound"] <= 1e-4 * scale).all()


@pytest.mark.parametrize("path", ["recorded", "closed_form"])
def test_an_uncertifiable_backward_is_said_and_solved_with_the_plain_test(monkeypatch, path):
    """q >= 1 (e.g. rounded up in bfloat16) certifies nothing: warn, solve plainly, no bound."""
    import torchdeq_pcdeq.backward as backward
    from torchdeq_pcdeq import core

    uncertifiable = lambda func, z: RateCertificate(torch.ones(z.shape[0], dtype=z.dtype), z)  # noqa: E731
    monkeypatch.setattr(backward, "rate_certificate", uncertifiable)
    monkeypatch.setattr(core, "closed_form_certificate", lambda layer, w, z, out: uncertifiable(None, z))
    forget_warnings(monkeypatch)
    f, x = dense_instance(dtype=torch.float64)
    x.requires_grad_()
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, b_tol=1e-10, b_max_iter=500)
    stats = []
    func = (lambda z: f(z, x)) if path == "closed_form" else (lambda z: f(z, x).clone())
    z_out, _ = deq(func, torch.zeros_like(x), backward_writer=stats.append)
    with pytest.warns(
        PcDEQWarning,
        match="cannot be certified: the rate bound q = 1 in torch.float64 arithmetic is not below 1",
    ):
        z_out[-1].sum().backward()
    (info,) = stats
    assert "error_bound" not in info
    assert bool(info["converged"].all()) and int(info["nstep"].max()) < 500


def test_a_backward_in_half_precision_arithmetic_is_not_certified_and_says_so(monkeypatch):
    """A float32 state solved under bfloat16 autocast: the arithmetic, not the state, is coarse.
    Found by review: certified there, the bound's floor (0.25 / (1 - q) relative in bfloat16)
    stopped the solve at its second iteration, reported converged, with a gradient 10x worse
    than the plain solve's; it is now solved plainly, without computing a certificate."""
    import torchdeq_pcdeq.backward as backward

    monkeypatch.setattr(backward, "rate_certificate", lambda *args: pytest.fail("certificate taken"))
    forget_warnings(monkeypatch)
    f, x = dense_instance(dtype=torch.float32)
    x.requires_grad_()
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, pcdeq_nonconvergence="ignore")
    stats = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tol=", PcDEQWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_out, _ = deq(lambda z: f(z, x).clone(), torch.zeros_like(x), backward_writer=stats.append)
        assert z_out[-1].dtype == torch.float32
        with pytest.warns(
            PcDEQWarning, match=r"not certified in torch.bfloat16 arithmetic .* outside autocast"
        ):
            z_out[-1].sum().backward()
    assert "error_bound" not in stats[0] and bool(stats[0]["converged"].all())


def test_an_exactly_zero_sample_converges_under_the_certified_bounds():
    """A zero sample (a zero loss gradient, in the certified backward) is computed exactly: the
    bounds' absolute rounding term (float16's subnormals) does not apply to it."""
    b = torch.rand(2, 30) + 0.1
    b[1] = 0
    f = lambda z: 0.5 * z + b  # noqa: E731
    weights, rate = torch.ones(2, 30), torch.full((2,), 0.5)
    _, _, info = pcdeq_fixed_point(f, torch.zeros(2, 30), max_iter=200, weights=weights, rate=rate)
    assert info["converged"].tolist() == [True, True] and info["error_bound"][1] == 0
    for dtype in (torch.float16, torch.float32):
        low_b = b.to(dtype)
        x0 = torch.zeros(2, 30, dtype=dtype)
        _, _, info = pcdeq_fixed_point(
            lambda z, b=low_b: 0.5 * z + b, x0, max_iter=200, tol=0.05, enclosure=True, upper=4.0
        )
        # (the upper sequence of the zero sample halves from 4 until it underflows to 0)
        assert info["converged"].tolist() == [True, True] and info["error_bound"][1] < 1e-30


def _saturating_layer(activation: str, drive: float, feedback: float) -> tuple:
    """Unit 0 drives 10 units into saturation (pre-activations near 15), which feed it back
    weakly: their sigma' is below the float32 output's rounding, so the slope read from the
    output (s (1 - s), 1 - s^2) keeps no digits there."""
    n = 11
    weight = torch.zeros(n, n)
    weight[1:, 0], weight[0, 1:] = drive, feedback
    layer = PcDEQLinear(n, activation, nonnegativity="project")
    layer.weight = weight
    u = torch.full((1, n), -3.0)
    u[0, 0] = 0.0
    return layer, u


@pytest.mark.parametrize(("activation", "drive"), [("sigmoid", 18.5), ("tanh", 8.0)])
def test_the_rate_bound_holds_where_units_saturate(activation, drive):
    """Found by review: q = 0.00099995 against a spectral radius of 0.001057 at z*, from sigma'
    read off the float32 output; the certificates now take it from the pre-activation."""
    layer, u = _saturating_layer(activation, drive, 0.15)
    x = layer.inject(u)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, f_tol=1e-5).eval()
    with torch.no_grad():
        z_out, info = deq(lambda z: layer(z, x), torch.zeros_like(x))
    w, x64 = layer.weight.detach().double(), x.double()[0]
    f = lambda v: layer.activation(w @ v + x64)  # noqa: E731
    z = z_out[-1][0].double()
    for _ in range(20):  # Newton, to z* in float64
        jacobian = torch.autograd.functional.jacobian(f, z)
        z = z + torch.linalg.solve(torch.eye(11, dtype=torch.float64) - jacobian, f(z) - z)
    radius = torch.linalg.eigvals(torch.autograd.functional.jacobian(f, z)).abs().max().item()
    assert 1e-5 < radius <= float(info["rate_bound"]) < 0.01


def test_the_certified_backward_bound_holds_where_units_saturate(monkeypatch):
    """Found by review: the certified error bound 1.9e-8 against a true error of 1.6e-6 (entry
    0 of the adjoint 32% off), from sigma' read off the float32 output at saturated units."""
    from torchdeq_pcdeq import core

    layer, u = _saturating_layer("sigmoid", 25.0, 0.05)
    x = layer.inject(u.requires_grad_())
    seen = {}
    take = core.closed_form_certificate  # (its third argument: the step's input, where J is taken)
    monkeypatch.setattr(
        core, "closed_form_certificate", lambda *a: seen.update(z_in=a[2].clone()) or take(*a)
    )
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True, f_tol=1e-5, b_tol=1e-5)
    producer = deq.produce_grad[-1]
    solver = producer.b_solver

    def spy(func, x0, **kwargs):
        y, states, info = solver(func, x0, **kwargs)
        seen.update(y=y, g=x0, v=kwargs["weights"], info=info)
        return y, states, info

    producer.b_solver = spy
    z_out, _ = deq(lambda z: layer(z, x), torch.zeros_like(x))
    g = torch.ones(1, 11)
    g[0, 0] = 0
    (z_out[-1] * g).sum().backward()
    w, x64 = layer.weight.detach().double(), x.detach().double()[0]
    jacobian = torch.autograd.functional.jacobian(
        lambda v: torch.sigmoid(w @ v + x64), seen["z_in"].double()[0]
    )
    exact = torch.linalg.solve(torch.eye(11, dtype=torch.float64) - jacobian.T, seen["g"].double()[0])
    error = ((seen["y"].double()[0] - exact).abs() * seen["v"].double()[0]).sum().item()
    assert bool(seen["info"]["converged"].all()) and error <= float(seen["info"]["error_bound"])
    assert abs(seen["y"][0, 0].item() / exact[0].item() - 1) < 1e-4  # (was 32% off)


def test_the_default_upper_start_allows_a_registered_activation_an_ulp_above_its_supremum(
    clean_activation_registry,
):
    """Found by review: 0.6 sigmoid + 0.1 computes to 0.70000005 in float32 once saturated, an ulp
    above its supremum 0.7; the supremum read from the layers is above z* whatever f rounds to,
    so the core's default start allows f's rounding, while a start given as a number does not."""
    register_activation("lifted", lambda t: 0.6 * torch.sigmoid(t) + 0.1, supremum=0.7)
    torch.manual_seed(0)
    f = PcDEQLinear(8, "lifted")
    x = f.inject(torch.randn(3, 8) + 20)  # saturated units
    assert float(f(torch.full_like(x, 0.7), x).detach().max()) > 0.7
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True).eval()
    _, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    assert bool(info["converged"].all())
    given = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, pcdeq_enclosure_upper=0.7).eval()
    with pytest.raises(InvalidInputError, match=r"computes above its supremum \(a registered one can"):
        given(lambda z: f(z, x), torch.zeros_like(x))


def test_a_certified_backward_keeps_the_closed_form_for_an_activation_record_without_derivative(monkeypatch):
    from torchdeq_pcdeq import backward

    calls = []
    apply = backward._ClosedFormImplicitGrad.apply
    monkeypatch.setattr(backward._ClosedFormImplicitGrad, "apply", lambda *a: calls.append(1) or apply(*a))
    record = Activation("mytanh", torch.tanh, 0.0, 1.0, 1, slope=lambda s: 1 - s * s)
    f = PcDEQLinear(8, record)
    x = f.inject(torch.randn(3, 8))
    z_out, _ = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True)(lambda z: f(z, x), torch.zeros(3, 8))
    z_out[-1].sum().backward()
    assert calls == [1]


def test_the_rate_bound_at_a_state_with_zero_entries_bounds_nothing():
    """Found by review: at z = 0 the products are 0 and q read 0 against a spectral radius of
    1.96; Collatz-Wielandt needs v > 0, so q is infinite there."""
    f = PcDEQLinear(4, "tanh", nonnegativity="project", dtype=torch.float64)
    f.weight = torch.full((4, 4), 0.5, dtype=torch.float64)
    x = f.inject(torch.zeros(1, 4, dtype=torch.float64))
    assert rate_bound(lambda v: f(v, x), torch.zeros(1, 4, dtype=torch.float64)).item() == math.inf
    # where the power step's v = J z + eps z is positive, v certifies, zero entries of z or not
    z_partly = torch.tensor([[0.5, 0.5, 0.0, 0.5]], dtype=torch.float64)
    radius = torch.linalg.eigvals(jacobians(f, x, z_partly)).abs().amax().item()
    assert radius <= rate_bound(lambda v: f(v, x), z_partly).item() < math.inf


@pytest.mark.parametrize(
    ("weights", "rate", "expected"),
    [
        (torch.ones(3, 4), torch.full((3,), -0.9), r"rate must hold one contraction factor q >= 0 .* -0\.9"),
        (torch.ones(3, 4), torch.full((3,), math.nan), r"rate must hold .* \(NaN not allowed\), got .* nan"),
        (-torch.ones(3, 4), torch.full((3,), 0.5), r"weights must be positive and finite .* from -1 to -1"),
        (torch.zeros(3, 4), torch.full((3,), 0.5), r"weights must be positive and finite .* from 0 to 0"),
        (torch.ones(3, 4), torch.full((3,), 0.5, device="meta"), r"must be on the state's device \(cpu\)"),
    ],
    ids=["negative rate", "NaN rate", "negative weights", "zero weights", "other device"],
)
def test_invalid_contraction_certificates_are_refused_not_turned_into_negative_bounds(
    weights, rate, expected
):
    """Found by review: a negative q or negative weights gave negative error bounds, every
    sample 'converged' at iteration 2 with an error of 1.6e-4."""
    f, x = dense_instance(n=4, dtype=torch.float32)
    with pytest.raises(InvalidInputError, match=expected):
        pcdeq_fixed_point(lambda z: f(z, x), torch.full((3, 4), 0.9), weights=weights, rate=rate)


def test_an_upper_start_beyond_the_dtype_and_a_func_that_is_not_callable_are_typed_errors():
    f, x = dense_instance(n=4, dtype=torch.float32)
    beyond = r"upper start 1e\+39 is beyond what the state's dtype torch.float32 holds"
    with pytest.raises(InvalidInputError, match=beyond):
        pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), enclosure=True, upper=1e39)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, pcdeq_enclosure_upper=1e39).eval()
    with pytest.raises(InvalidInputError, match=beyond):
        deq(lambda z: f(z, x), torch.zeros_like(x))
    with pytest.raises(InvalidInputError, match="expects func, the map to iterate, as a callable"):
        pcdeq_fixed_point(None, torch.zeros_like(x))

import math
import re

import pytest
import torch
import torchdeq
from torchdeq import get_solver

from conftest import ACTIVATIONS, dense_instance, forget_warnings, upper_bound
from torchdeq_pcdeq import (
    InvalidInputError,
    NonFiniteError,
    NotPositiveMonotoneError,
    PcDEQLinear,
    PcDEQWarning,
    UnknownNameError,
    pcdeq_fixed_point,
)

TORCHDEQ_KEYS = {"abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius"}


def bare_loop(f, x, z, k):
    for _ in range(k):
        z = f(z, x)
    return z


def test_converges_to_a_fixed_point_with_torchdeq_info_keys_and_shapes():
    f, x = dense_instance(n=10, batch=4, dtype=torch.float32)
    z, states, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), max_iter=100, tol=1e-5)
    assert states == []
    assert TORCHDEQ_KEYS | {"converged", "trace_steps"} == set(info)
    n = info["trace_steps"].numel()
    for key, shape in [("abs_lowest", (4,)), ("rel_lowest", (4,)), ("nstep", (4,)), ("converged", (4,))]:
        assert info[key].shape == shape, key
    assert info["abs_trace"].shape == info["rel_trace"].shape == (4, n)
    assert info["abs_trace"].is_contiguous() and info["rel_trace"].is_contiguous()
    assert info["converged"].dtype == torch.bool and info["converged"].all()
    assert info["trace_steps"].dtype == torch.int64
    for key in ("abs_lowest", "rel_lowest", "nstep", "abs_trace", "rel_trace", "sradius"):
        assert info[key].dtype == torch.float32, key
    residual = (f(z, x) - z).norm(dim=1) / f(z, x).norm(dim=1)
    assert (residual < 1e-5 * 1.5).all()


def test_every_iteration_checked_matches_a_manual_loop_exactly():
    f, x = dense_instance(n=10, batch=3, dtype=torch.float64)
    z, _, info = pcdeq_fixed_point(
        lambda z: f(z, x), torch.zeros_like(x), max_iter=200, tol=1e-9, check_every=1
    )
    iterates = [torch.zeros_like(x)]
    rel = []
    while len(rel) < 200:
        iterates.append(f(iterates[-1], x))
        rel.append((iterates[-1] - iterates[-2]).norm(dim=1) / iterates[-1].norm(dim=1))
        if (rel[-1] <= 1e-9).all():
            break
    k = len(rel)
    assert torch.equal(z, iterates[-1])
    assert info["trace_steps"].tolist() == list(range(1, k + 1))
    torch.testing.assert_close(info["rel_trace"], torch.stack(rel, dim=1))
    expected_nstep = [next(i + 1 for i, r in enumerate(rel) if r[b] <= 1e-9) for b in range(3)]
    assert info["nstep"].tolist() == expected_nstep


def test_auto_schedule_checks_rarely_and_returns_the_plain_iterate():
    # relu6 is linear below 6: with rho(W) near 0.97 the iteration contracts slowly
    f, x = dense_instance(n=16, batch=2, scale=0.97, activation="relu6", dtype=torch.float64)
    z, _, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), max_iter=2000, tol=1e-8)
    k = int(info["trace_steps"][-1])
    assert info["converged"].all()
    assert k > 30, "the instance must need many iterations for the test to mean something"
    assert info["trace_steps"].numel() <= 2 * math.log2(k) + 4
    assert torch.equal(z, bare_loop(f, x, torch.zeros_like(x), k))
    # the schedule may overshoot, but never by more than doubling the iterations needed
    _, _, exact = pcdeq_fixed_point(
        lambda z: f(z, x), torch.zeros_like(x), max_iter=2000, tol=1e-8, check_every=1
    )
    assert k <= 2 * int(exact["trace_steps"][-1])


def test_strided_checks_and_per_sample_nstep():
    f, x = dense_instance(n=8, batch=2, dtype=torch.float64)
    x = torch.stack([x[0], x[1] * 1e-4])  # sample 1 converges more slowly
    _, _, info = pcdeq_fixed_point(
        lambda z: f(z, x), torch.zeros_like(x), max_iter=300, tol=1e-10, check_every=4
    )
    steps = info["trace_steps"].tolist()
    assert all(s % 4 == 0 for s in steps)
    assert info["nstep"][0] < info["nstep"][1]
    assert set(info["nstep"].tolist()) <= set(steps)


def test_exhausting_max_iter_is_reported_per_sample():
    f, x = dense_instance(n=8, batch=2, dtype=torch.float64)
    x = torch.stack([x[0], x[1] * 1e-6])
    _, _, info = pcdeq_fixed_point(
        lambda z: f(z, x), torch.zeros_like(x), max_iter=20, tol=1e-3, check_every=1
    )
    assert info["converged"].tolist() == [True, False]
    assert info["nstep"][0] < 20 and info["nstep"][1] == 20
    assert info["trace_steps"][-1] == 20
    assert info["rel_lowest"][1] > 1e-3


def test_indexing_returns_the_requested_states():
    f, x = dense_instance(n=6, batch=1)
    z0 = torch.zeros_like(x)
    _, states, _ = pcdeq_fixed_point(lambda z: f(z, x), z0, max_iter=10, tol=1e-14, indexing=[2, 5])
    assert len(states) == 2
    assert torch.equal(states[0], bare_loop(f, x, z0, 2)) and torch.equal(states[1], bare_loop(f, x, z0, 5))


def test_indexing_entries_after_the_solve_stopped_get_its_final_state():
    # TorchDEQ's indexing core pairs states and gradients entry by entry: none may go missing
    f, x = dense_instance(n=6, batch=2)
    z0 = torch.zeros_like(x)
    z, states, info = pcdeq_fixed_point(lambda z: f(z, x), z0, max_iter=40, indexing=[2, 40, 40])
    assert int(info["trace_steps"][-1]) < 40 and len(states) == 3
    assert torch.equal(states[0], bare_loop(f, x, z0, 2))
    assert states[1] is z and states[2] is z


def test_torchdeqs_indexing_core_gets_its_implicit_gradient_when_the_solve_stops_early():
    f, x = dense_instance(n=6, batch=2)
    deq = torchdeq.get_deq(
        core="indexing", f_solver="pcdeq_fixed_point", b_solver="pcdeq_fixed_point", norm_type="none",
        indexing=[2], ift=True, f_max_iter=40,
    )  # fmt: skip
    z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    assert int(info["nstep"].max()) < 40
    assert [type(z.grad_fn).__name__ for z in z_out][-1] == "IFTGradBackward" and len(z_out) == 2


def test_registered_and_usable_as_a_backward_solver_with_a_bare_lambda():
    solver = get_solver("pcdeq_fixed_point")
    assert solver is pcdeq_fixed_point
    torch.manual_seed(0)
    a = torch.rand(5, 5, dtype=torch.float64) * 0.15
    g = torch.randn(3, 5, dtype=torch.float64)
    y, _, info = solver(lambda y: y @ a + g, torch.zeros_like(g), max_iter=500, tol=1e-12, stop_mode="abs")
    expected = torch.linalg.solve((torch.eye(5, dtype=torch.float64) - a).T, g.T).T
    torch.testing.assert_close(y, expected)
    assert info["converged"].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_absolute_tolerance_below_the_rounding_of_large_samples_is_said_once(monkeypatch, dtype):
    forget_warnings(monkeypatch)  # said once per process
    f, x = dense_instance(batch=4, scale=0.5, dtype=dtype)  # (a contraction: z* shrinks with x)
    x = torch.cat([1e-4 * x, x])  # states about 1e4 times smaller, and so is their rounding floor
    fine = 100 * torch.finfo(dtype).eps * float(x[:4].norm(dim=1).max())
    wider = "" if dtype == torch.float64 else ", or a wider dtype"
    with pytest.warns(PcDEQWarning) as said:
        _, _, info = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), tol=fine, stop_mode="abs")
    above = info["abs_lowest"] > fine  # (a sample whose residual reached 0 met tol anyway)
    assert bool(info["converged"].all()) and int(above.sum()) > 0 and not bool(above[:4].any())
    message = rf"tol=.* \(abs\) is below what {dtype} iterates can resolve in {int(above.sum())} of 8 "
    assert re.match(message + rf"samples.*'rel'\){wider}\.$", str(said[0].message)) and len(said) == 1
    pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), tol=fine, stop_mode="abs")  # said before
    pcdeq_fixed_point(lambda z: f(z, x[:4]), torch.zeros_like(x[:4]), tol=1e-3, stop_mode="abs")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_iter": 0}, InvalidInputError, "max_iter must be an integer >= 1, got 0"),
        ({"max_iter": 2.5}, InvalidInputError, "max_iter"),
        ({"tol": 0.0}, InvalidInputError, "tol must be a positive finite number, got 0.0"),
        ({"tol": -1e-3}, InvalidInputError, "tol must be a positive"),
        ({"tol": math.nan}, InvalidInputError, "tol must be a positive"),
        ({"stop_mode": "relative"}, UnknownNameError, "Valid: 'abs', 'rel'"),
        ({"guard": "strict"}, UnknownNameError, "Valid: 'off', 'raise', 'warn'"),
        ({"check_every": 0}, InvalidInputError, "check_every must be 'auto' or an integer >= 1"),
        ({"tau": 0.5}, InvalidInputError, "undamped"),
    ],
)
def test_invalid_arguments_fail_before_any_call(kwargs, error, match):
    calls = []
    with pytest.raises(error, match=match):
        pcdeq_fixed_point(lambda z: calls.append(1) or z, torch.zeros(2, 3), **kwargs)
    assert calls == []


def test_invalid_states():
    with pytest.raises(InvalidInputError, match=r"batch dimension first, got shape \(3,\)"):
        pcdeq_fixed_point(lambda z: z, torch.zeros(3))
    with pytest.raises(InvalidInputError, match="one tensor, got list"):
        pcdeq_fixed_point(lambda z: z, [torch.zeros(2, 3)])
    with pytest.raises(InvalidInputError, match="floating-point"):
        pcdeq_fixed_point(lambda z: z, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InvalidInputError, match=r"same shape, got shape \(2, 4\)"):
        pcdeq_fixed_point(lambda z: torch.ones(2, 4), torch.zeros(2, 3))


def test_unknown_options_are_reported():
    with pytest.warns(PcDEQWarning, match=r"ignores unknown options \['return_final'\]"):
        pcdeq_fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 2), return_final=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guard_has_no_false_alarm_from_zero_or_from_the_upper_bound(activation, dtype):
    for seed in range(3):
        f, x = dense_instance(n=20, batch=4, activation=activation, scale=3.0, seed=seed, dtype=dtype)
        for z0 in (torch.zeros_like(x), upper_bound(activation, x)):
            _, _, info = pcdeq_fixed_point(
                lambda z: f(z, x), z0, max_iter=3000, tol=1e-6, guard="raise", check_every=1
            )
            assert info["converged"].all()


def _broken_weight_map(n=6):
    torch.manual_seed(0)
    w = torch.rand(n, n) * 0.5
    w[0, :] = -0.1  # a row of negative weights: unit 0 falls (staying positive) as the others rise
    x = torch.rand(1, n) + 0.5
    x[0, 0] = 1.0
    return lambda z: torch.tanh(z @ w.T + x)


def test_guard_detects_a_negative_weight():
    with pytest.raises(
        NotPositiveMonotoneError, match=r"started from 0 but iterate 2 is below iterate 1.*negative weight"
    ):
        pcdeq_fixed_point(_broken_weight_map(), torch.zeros(1, 6), guard="raise", check_every=1)


def test_guard_detects_a_negative_injection():
    w = torch.rand(4, 4) * 0.1
    x = -torch.rand(1, 4)
    with pytest.raises(NotPositiveMonotoneError, match=r"negative entries.*non-admissible injection"):
        pcdeq_fixed_point(lambda z: torch.tanh(z @ w.T + x), torch.zeros(1, 4), guard="raise")


def test_guard_warn_and_off():
    f = _broken_weight_map()
    with pytest.warns(PcDEQWarning, match="pcDEQ guard"):
        z, _, _ = pcdeq_fixed_point(f, torch.zeros(1, 6), guard="warn", check_every=1)
    assert torch.isfinite(z).all()
    pcdeq_fixed_point(f, torch.zeros(1, 6), guard="off", check_every=1)  # PcDEQWarning would be an error here


@pytest.mark.parametrize(("dtype", "accuracy"), [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_low_precision_stops_at_the_dtype_resolution_and_near_the_fixed_point(dtype, accuracy):
    # relu6 with rho(W) = 0.95: slow enough that a coarse stopping floor lands far from z*
    torch.manual_seed(0)
    f = PcDEQLinear(64, "relu6", nonnegativity="project", dtype=torch.float64)
    with torch.no_grad():
        f.linear.weight.copy_(torch.rand(64, 64, dtype=torch.float64) * 2 * 0.95 / 64)
    x = f.inject(torch.randn(8, 64, dtype=torch.float64))
    exact, _, _ = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), max_iter=5000, tol=1e-13)
    low, x_low = f.to(dtype), x.to(dtype)
    with pytest.warns(PcDEQWarning, match="below what"):
        z, _, info = pcdeq_fixed_point(
            lambda z: low(z, x_low), torch.zeros_like(x_low), max_iter=500, tol=1e-7
        )
    assert info["converged"].all()
    assert info["trace_steps"][-1] < 100
    assert torch.isfinite(z).all() and (z > 0).all()
    assert ((z.double() - exact).norm() / exact.norm()).item() < accuracy


def test_the_floor_follows_autocast():
    from torchdeq_pcdeq.rounding import arithmetic_dtype

    state = torch.zeros(2, 3)
    assert arithmetic_dtype(state) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert arithmetic_dtype(state) == torch.bfloat16
        assert arithmetic_dtype(state.double()) == torch.bfloat16


def test_non_finite_iterates_stop_the_solve_whatever_the_guard():
    calls = []

    def f(z):
        calls.append(1)
        return torch.full_like(z, float("nan")) if len(calls) > 3 else z / 2 + 1

    with pytest.raises(NonFiniteError, match="holds NaN or Inf") as caught:
        pcdeq_fixed_point(f, torch.zeros(2, 3), max_iter=200, guard="off")
    assert len(calls) < 10
    # the checks skip iterates: the message says which ones may hold the first NaN
    assert f"Iterate {len(calls)} of" in str(caught.value)
    assert "the checks skip iterates: it may have arisen from iterate 3 on. f produced" in str(caught.value)
    calls.clear()
    with pytest.raises(NonFiniteError, match=r"^Iterate 4 of .* overflows\)\. f produced"):
        pcdeq_fixed_point(f, torch.zeros(2, 3), max_iter=200, check_every=1)


def test_iterates_growing_without_bound_are_named_as_a_cause_of_the_non_finite_error():
    """relu with rows of W summing to 2: no fixed point, the iterates double until they overflow."""
    weight = torch.full((4, 4), 0.5)
    with pytest.raises(NonFiniteError, match=r"grew without bound.*unbounded one \(relu\)"):
        pcdeq_fixed_point(lambda z: torch.relu(z @ weight.T + 1), torch.zeros(2, 4), max_iter=500)


def test_whole_numbers_of_any_kind_are_iteration_counts_as_in_the_core():
    numpy = pytest.importorskip("numpy")
    given = dict(max_iter=numpy.int64(60), tol=numpy.float32(1e-5), check_every=numpy.int32(3))
    _, states, info = pcdeq_fixed_point(lambda z: z / 2 + 1, torch.zeros(2, 3), indexing=[2.0], **given)
    assert info["trace_steps"].tolist() == [3, 6, 9, 12, 15, 18] and len(states) == 1
    torch.testing.assert_close(states[0], torch.full((2, 3), 1.5))  # the state of iteration 2
    _, from_array, _ = pcdeq_fixed_point(lambda z: z / 2 + 1, torch.zeros(2, 3), indexing=numpy.array([2]))
    assert torch.equal(from_array[0], states[0])
    with pytest.raises(InvalidInputError, match=r"indexing must be a sequence .* pass \[3\]"):
        pcdeq_fixed_point(lambda z: z / 2 + 1, torch.zeros(2, 3), indexing=3)
    for bad in (dict(max_iter=2.5), dict(max_iter=True), dict(check_every=numpy.bool_(True))):
        with pytest.raises(InvalidInputError, match=r"must be .*an integer >= 1, got"):
            pcdeq_fixed_point(lambda z: z / 2 + 1, torch.zeros(2, 3), **bad)


def test_a_non_finite_initial_state_is_named_as_the_cause():
    start = torch.zeros(3, 4)
    start[1, 2] = float("nan")
    with pytest.raises(
        NonFiniteError, match="initial state of the fixed-point solve holds NaN or Inf in 1 of 3"
    ):
        pcdeq_fixed_point(lambda z: z / 2 + 1, start, max_iter=50)
    with pytest.raises(NonFiniteError, match=r"^Iterate 2 .* f produced non-finite values"):
        pcdeq_fixed_point(lambda z: z * math.nan, torch.zeros(3, 4), max_iter=50)


def _one_diverging_sample(calls: list):
    """Sample 0 grows 1e5-fold per iteration (Inf in float32 at the eighth), sample 1 converges to 2."""
    growth = torch.tensor([[1e5], [0.5]])

    def f(z):
        calls.append(1)
        return z * growth + 1

    return f


def test_nonfinite_report_flags_diverged_samples_returns_them_at_the_start_and_ends_with_the_others():
    calls = []
    x0 = torch.full((2, 3), 0.25)
    z, _, info = pcdeq_fixed_point(
        _one_diverging_sample(calls), x0, max_iter=400, tol=1e-6, nonfinite="report"
    )
    assert info["diverged"].tolist() == [True, False]
    assert info["converged"].tolist() == [False, True]
    assert torch.equal(z[0], x0[0])
    torch.testing.assert_close(z[1], torch.full((3,), 2.0), rtol=0, atol=4e-6)
    # it stops when sample 1 converges (about 21 iterations), not at max_iter
    assert len(calls) == int(info["trace_steps"][-1]) < 40
    # the trace shows the overflow; the lowest residual is the one reached before it
    assert info["rel_trace"][0, -1].isnan()
    assert math.isfinite(info["rel_lowest"][0]) and math.isfinite(info["abs_lowest"][0])


def test_nonfinite_report_ends_at_once_when_every_sample_diverged():
    calls = []
    f = _one_diverging_sample(calls)
    z, _, info = pcdeq_fixed_point(lambda z: f(z) * 1e10, torch.ones(2, 3), max_iter=400, nonfinite="report")
    assert info["diverged"].tolist() == [True, True] and not info["converged"].any()
    assert torch.equal(z, torch.ones(2, 3)) and len(calls) < 10


def test_nonfinite_report_without_divergence_reports_none():
    f, x = dense_instance()
    plain = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x))
    reported = pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), nonfinite="report")
    assert torch.equal(plain[0], reported[0])
    assert reported[2]["diverged"].tolist() == [False] * x.shape[0]
    assert set(reported[2]) - set(plain[2]) == {"diverged"}


def test_nonfinite_report_keeps_infinite_bounds_infinite_and_ignores_a_flagged_sample_later():
    # certified: sample 0 diverges, sample 1 (q >= 1) has an infinite bound (but grows only
    # 1.1^60 = 304-fold, far from a divergence), sample 2 converges
    growth = torch.tensor([[1e5], [1.1], [0.5]])
    weights, rate = torch.ones(3, 2), torch.tensor([0.5, 1.5, 0.5])
    _, _, info = pcdeq_fixed_point(
        lambda z: z * growth + 1,
        torch.ones(3, 2),
        max_iter=60,
        weights=weights,
        rate=rate,
        nonfinite="report",
    )
    assert info["diverged"].tolist() == [True, False, False]
    assert info["converged"].tolist() == [False, False, True]
    assert info["abs_lowest"][1] == math.inf and info["rel_lowest"][1] == math.inf

    # a sample flagged when its norm overflowed, whose later iterates are small again: it no
    # longer decides when the solve ends
    calls = []

    def f(z):
        calls.append(1)
        k = len(calls)
        first = torch.full((1, 3), 1e20 * k if k <= 2 else 1.0 + k % 2)
        return torch.cat([first, z[1:] / 2 + 1])

    _, _, info = pcdeq_fixed_point(f, torch.zeros(2, 3), max_iter=300, tol=1e-6, nonfinite="report")
    assert info["diverged"].tolist() == [True, False] and info["converged"].tolist() == [False, True]
    assert int(info["trace_steps"][-1]) < 40


def test_the_guard_keeps_watching_the_samples_that_did_not_diverge():
    calls = []

    def f(z):
        calls.append(1)
        out = z * torch.tensor([[1e5], [0.5]]) + 1
        if len(calls) > 3:
            out[0] = float("nan")  # sample 0 diverges
        if len(calls) > 12:
            out[1] = -1.0  # then sample 1 turns negative
        return out

    with pytest.raises(NotPositiveMonotoneError):
        pcdeq_fixed_point(f, torch.ones(2, 3), max_iter=100, tol=1e-6, guard="raise", nonfinite="report")

    def g(z):  # both at once: the check that first sees the NaN must still see the -1
        calls.append(1)
        out = z * torch.tensor([[2.0], [0.5]]) + 1
        if len(calls) >= 3:
            out[0], out[1] = float("nan"), -1.0
        return out

    for budget in (3, 10):
        calls.clear()
        with pytest.raises(NotPositiveMonotoneError, match="negative entries"):
            pcdeq_fixed_point(
                g, torch.ones(2, 3), max_iter=budget, tol=1e-6, guard="raise", nonfinite="report"
            )


@pytest.mark.parametrize("nonfinite", ["raise", "report"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_a_sample_whose_fixed_point_is_zero_converges_with_a_zero_residual(stop_mode, nonfinite):
    # sample 0 stays exactly 0 (0 / 0 in its relative residual), sample 1 converges to 2
    f = lambda z: z * torch.tensor([[0.5], [0.5]]) + torch.tensor([[0.0], [1.0]])  # noqa: E731
    z, _, info = pcdeq_fixed_point(
        f, torch.zeros(2, 3), max_iter=100, tol=1e-6, stop_mode=stop_mode, guard="raise", nonfinite=nonfinite
    )
    assert info["converged"].tolist() == [True, True]
    assert torch.equal(z[0], torch.zeros(3))
    assert info["rel_trace"][0].tolist() == [0.0] * info["rel_trace"].shape[1]
    assert info["abs_lowest"][0] == 0 and info["rel_lowest"][0] == 0
    assert int(info["nstep"][0]) == int(info["trace_steps"][0])  # within tolerance from the first check
    if nonfinite == "report":
        assert info["diverged"].tolist() == [False, False]


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_an_iterate_whose_norm_overflows_is_never_read_as_converged(stop_mode):
    # 5.43x per iteration: at iteration 26 ||f(z)|| overflows float32 while ||f(z) - z|| does
    # not, and their ratio read 0, "converged", with an iterate of 1e19
    f = lambda z: 5.43 * z + 1  # noqa: E731
    kwargs = dict(max_iter=400, tol=1e-4, stop_mode=stop_mode, check_every=1)
    with pytest.raises(NonFiniteError, match=r"Iterate 26 .* values so large that their norm overflows"):
        pcdeq_fixed_point(f, torch.ones(1, 2), **kwargs)


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("dtype, flagged_at", [(torch.float32, 20), (torch.float64, 44)])
def test_nonfinite_report_flags_growth_past_resolution_before_any_overflow(stop_mode, dtype, flagged_at):
    # ||f(z)|| is 6.43 sqrt(2) at the first check (iteration 1) and grows 5.43x per iteration:
    # past 1/eps^2 times that (7.0e13 in float32, 2.0e31 in float64) at iteration 20 or 44, long
    # before float32 overflows (26) or float64 does (about 420, beyond any budget)
    f = lambda z: 5.43 * z + 1  # noqa: E731
    x0 = torch.ones(1, 2, dtype=dtype)
    kwargs = dict(max_iter=400, tol=1e-4, stop_mode=stop_mode, check_every=1, nonfinite="report")
    z, _, info = pcdeq_fixed_point(f, x0, **kwargs)
    assert info["diverged"].tolist() == [True] and info["converged"].tolist() == [False]
    assert int(info["trace_steps"][-1]) == flagged_at and torch.equal(z, x0)
    # a sample that grows, but less than that, is unconverged and not diverged
    z, _, info = pcdeq_fixed_point(lambda z: 1.1 * z + 1, x0, **{**kwargs, "max_iter": 100})
    assert info["diverged"].tolist() == [False] and info["converged"].tolist() == [False]


def test_nonfinite_report_still_raises_for_a_start_that_was_never_finite():
    x0 = torch.ones(2, 3)
    x0[1, 0] = float("nan")
    with pytest.raises(
        NonFiniteError, match="initial state of the fixed-point solve holds NaN or Inf in 1 of 2 samples"
    ):
        pcdeq_fixed_point(lambda z: z / 2 + 1, x0, nonfinite="report")


def test_an_absolute_certified_stop_says_nothing_of_a_relative_floor(monkeypatch):
    """abs: each sample's limit already covers its rounding (twice it, over 1 - q); the relative
    floor's warning named a 'raised tolerance' the user never set. The absolute one is said."""
    forget_warnings(monkeypatch)
    with pytest.warns(PcDEQWarning) as said:
        _, _, info = pcdeq_fixed_point(
            lambda z: 0.9 * z + 1,
            torch.zeros(2, 3),
            max_iter=400,
            tol=1e-9,
            stop_mode="abs",
            weights=torch.ones(2, 3),
            rate=torch.full((2,), 0.9),
        )
    assert [str(w.message)[:74] for w in said] == [
        "tol=1e-09 (abs) is below what torch.float32 iterates can resolve in 2 of 2"
    ]
    assert info["converged"].all()
    assert (info["error_bound"] <= 2 * 2 * 16 * torch.finfo(torch.float32).eps * 30 / (1 - 0.9)).all()


def test_a_sample_whose_rate_is_not_below_1_does_not_keep_the_others_from_certifying(monkeypatch):
    # q = 0.5 can certify down to 32 eps / (1 - q) = 7.6e-6 relative (its bound stalls at about
    # 3.8e-6, above tol), sample 1 (q = 1.5) nothing
    forget_warnings(monkeypatch)  # the warning is once per process
    growth = torch.tensor([[0.5], [1.5]])
    said = r"cannot go below 7.63e-06 .relative. in torch.float32 .* contraction factor q = 0.5\. "
    with pytest.warns(PcDEQWarning, match=said):
        _, _, info = pcdeq_fixed_point(
            lambda z: z * growth + 1,
            torch.zeros(2, 2),
            max_iter=60,
            tol=3e-6,
            weights=torch.ones(2, 2),
            rate=torch.tensor([0.5, 1.5]),
        )
    assert info["converged"].tolist() == [True, False]


def test_nonfinite_modes_are_validated():
    with pytest.raises(UnknownNameError, match=r"Unknown nonfinite mode 'ignore'\. Valid: 'raise', 'report'"):
        pcdeq_fixed_point(lambda z: z, torch.zeros(2, 3), nonfinite="ignore")
    with pytest.raises(InvalidInputError, match="Use nonfinite='raise' with enclosure=True"):
        pcdeq_fixed_point(lambda z: z, torch.zeros(2, 3), enclosure=True, upper=1.0, nonfinite="report")


def test_empty_and_dtype_changing_states_are_reported():
    with pytest.raises(InvalidInputError, match=r"empty state of shape \(0, 3\)"):
        pcdeq_fixed_point(lambda z: z, torch.zeros(0, 3))
    with pytest.raises(InvalidInputError, match="keep the state's dtype and device"):
        pcdeq_fixed_point(lambda z: z.double() / 2 + 1, torch.zeros(2, 3))


def test_indexing_entries_that_no_solve_reaches_are_refused():
    f, x = dense_instance()
    for indexing in ([0, 2, 4], [-1, 3], [2.5]):
        with pytest.raises(InvalidInputError, match=r"indexing holds iterations that no solve reaches"):
            pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), indexing=indexing)
    _, states, _ = pcdeq_fixed_point(
        lambda z: f(z, x), torch.zeros_like(x), indexing=[2, 4], check_every=1, tol=1e-12
    )
    assert len(states) == 2


def test_a_tolerance_below_autocasts_resolution_names_autocast_and_how_to_avoid_it(monkeypatch):
    """Found by review: a float32 f run under an outer bfloat16 autocast (turned off inside f) is
    judged by bfloat16's floor, and the warning said "bfloat16 iterates" of float32 ones."""
    forget_warnings(monkeypatch)
    f = PcDEQLinear(8)
    x = f.inject(torch.randn(2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(PcDEQWarning) as caught:
        pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x))
    (message,) = [str(w.message) for w in caught]
    assert "below what torch.bfloat16 arithmetic under autocast can resolve" in message
    assert "call the core outside it" in message

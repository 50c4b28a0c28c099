import argparse
import copy
import dataclasses
import functools
import itertools
import math
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
import torchdeq
from torch.nn.utils import parametrize

from conftest import (
    ACTIVATIONS,
    INSTANCES,
    MODES,
    conv_instance,
    dense_instance,
    iterate,
    set_weight,
    upper_bound,
)
from torchdeq_pcdeq import (
    ConvergenceError,
    InvalidInputError,
    NonFiniteError,
    NonNegativeWeightNorm,
    NotPositiveMonotoneError,
    PcDEQConv2d,
    PcDEQCore,
    PcDEQLayer,
    PcDEQLinear,
    PcDEQWarning,
    UnknownNameError,
    add_pcdeq_args,
    pcdeq_fixed_point,
)
from torchdeq_pcdeq.backward import ClosedFormImplicitGradient

TIGHT = dict(f_tol=1e-12, b_tol=1e-12, f_max_iter=5000, b_max_iter=5000)


def solve(deq, f, x, z0=None, path="closed_form"):
    z0 = torch.zeros_like(x) if z0 is None else z0
    return deq(layer_map(f, x, path), z0)


# How the gradient is computed: in closed form for a plain layer call, else through a recorded f.
PATHS = ["closed_form", "recorded"]


def layer_map(f, x, path):
    """``z -> f(z, x)``; ``"recorded"`` hides the layer's own output behind an exact copy."""
    if path == "closed_form":
        return lambda z: f(z, x)
    return lambda z: f(z, x).clone()


# -- the method's claims ----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("make", INSTANCES)
@pytest.mark.parametrize("mode", MODES)
def test_unique_fixed_point_from_different_starts(activation, make, mode):
    f, x = make(activation=activation, scale=3.0, nonnegativity=mode)
    deq = torchdeq.get_deq(core="pcdeq", **TIGHT).eval()
    gen = torch.Generator().manual_seed(3)
    starts = [
        torch.zeros_like(x),
        upper_bound(activation, x),
        torch.rand(x.shape, generator=gen, dtype=x.dtype),
        100 * torch.rand(x.shape, generator=gen, dtype=x.dtype),
    ]
    solutions = [solve(deq, f, x, z0)[0][-1] for z0 in starts]
    for z in solutions[1:]:
        torch.testing.assert_close(z, solutions[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(f(solutions[0], x), solutions[0], rtol=0, atol=1e-11)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("make", INSTANCES)
def test_iterates_increase_from_zero_and_decrease_from_the_upper_bound(activation, make):
    f, x = make(activation=activation, scale=3.0)
    rising = iterate(f, x, torch.zeros_like(x), 60)
    falling = iterate(f, x, upper_bound(activation, x), 60)
    ulps = 4 * torch.finfo(x.dtype).eps  # near the fixed point, iterates move by rounding only
    for a, b in itertools.pairwise(rising):
        assert (b - a).min() >= -ulps * a.abs().max()
    for a, b in itertools.pairwise(falling):
        assert (a - b).min() >= -ulps * a.abs().max()
    assert (rising[-1] - falling[-1]).max() <= ulps * falling[-1].max(), "they bracket the fixed point"
    assert (rising[1] > 0).all()
    assert (rising[10] - rising[1]).max() > 0.01, "the iteration from 0 must actually move"


# -- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("make", [dense_instance, conv_instance])
def test_implicit_gradient_matches_finite_differences_float64(activation, make, path):
    f, x = (
        make(activation=activation, scale=2.0, batch=1, size=3)
        if make is conv_instance
        else make(activation=activation, scale=2.0, batch=2, n=5)
    )
    deq = torchdeq.get_deq(core="pcdeq", **TIGHT)
    u = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def z_star(u):
        return solve(deq, f, f.inject(u), path=path)[0][-1]

    assert torch.autograd.gradcheck(z_star, (u.requires_grad_(),), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
@pytest.mark.parametrize("make", INSTANCES)
@pytest.mark.parametrize("mode", MODES)
def test_weight_gradient_matches_central_differences_float64(gradient, make, mode, path):
    f, x = make(activation="tanh", scale=2.0, nonnegativity=mode)
    deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift", **TIGHT)
    probe = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = list(f.parameters())  # the raw parameters of the mechanism (W, V, or g and v)
    gen = torch.Generator().manual_seed(4)
    directions = [torch.rand(p.shape, dtype=torch.float64, generator=gen) for p in params]

    def loss():
        return (solve(deq, f, x, path=path)[0][-1] * probe).sum()

    loss().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, directions)).item()
    h = 1e-6

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(sign * h * d)
            value = loss()
            for p, d in zip(params, directions):
                p.sub_(sign * h * d)
        return value

    numeric = ((shifted(1) - shifted(-1)) / (2 * h)).item()
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_hook_ift_called_twice_before_backward_does_not_reenter_and_matches_ift():
    grads = {}
    for gradient in ("ift", "hook_ift"):
        torch.manual_seed(0)
        f = PcDEQLinear(6, nonnegativity="project")
        set_weight(f, torch.rand(6, 6) * 0.4)
        deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift")
        u = torch.randn(2, 6, requires_grad=True)
        x = f.inject(u)
        first = solve(deq, f, x)[0][-1]
        second = solve(deq, f, 2 * x)[0][-1]  # same core instance, before backward
        (first.square().sum() + second.sum()).backward()
        grads[gradient] = (u.grad.clone(), f.linear.weight.grad.clone())
    for a, b in zip(grads["ift"], grads["hook_ift"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_pcdeq_phantom_asks_for_phantom_gradients_where_ift_false_cannot_be_typed():
    args = parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--grad", "3", "--pcdeq_phantom"])
    deq = torchdeq.get_deq(args)
    assert (deq.gradient, deq.args.get("ift"), deq.f_max_iter) == ("phantom", False, 200)
    f, x = dense_instance(dtype=torch.float32)
    z_out, _ = solve(deq.train(), f, x)
    assert z_out[-1].requires_grad and not isinstance(deq.produce_grad[-1], ClosedFormImplicitGradient)
    assert torchdeq.get_deq(deq.args).gradient == "phantom"  # rebuilt: the same core
    # a keyword is more specific than the config it rebuilds from: it wins, either way
    assert torchdeq.get_deq(deq.args, ift=True).gradient == "ift"
    assert torchdeq.get_deq(torchdeq.get_deq(core="pcdeq").args, pcdeq_phantom=True).gradient == "phantom"
    with pytest.raises(InvalidInputError, match="tau"):  # checked as for ift=False
        torchdeq.get_deq(core="pcdeq", pcdeq_phantom=True, tau=-1.0)
    for asked in ({"ift": True}, {"hook_ift": True}):
        with pytest.raises(InvalidInputError, match=f"pcdeq_phantom=True .* and {next(iter(asked))}=True"):
            torchdeq.get_deq(core="pcdeq", pcdeq_phantom=True, **asked)
    sys.argv[1:] = []  # a namespace the command line does not explain: ift is not listed as replaced
    with pytest.warns(PcDEQWarning, match="replaced values") as caught:
        torchdeq.get_deq(args)
    assert "ift False" not in str(caught[0].message)


@pytest.mark.parametrize("with_plugin_flags", [True, False])
def test_pcdeq_phantom_from_the_runner_conflicts_with_an_ift_typed_beside_it(monkeypatch, with_plugin_flags):
    from torchdeq_pcdeq.config import RUNNER_OPTIONS_ENV

    monkeypatch.setenv(RUNNER_OPTIONS_ENV, '{"pcdeq_phantom": true}')
    argv = ["--core", "pcdeq", "--norm_type", "pcdeq_nonneg"]
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    if with_plugin_flags:  # (the script's pcdeq_phantom flag, at its default, is no setting)
        add_pcdeq_args(parser)
    sys.argv[1:] = [*argv, "--ift"]
    with pytest.raises(InvalidInputError, match=r"pcdeq_phantom=True \(given to the runner\) .* ift=True"):
        torchdeq.get_deq(parser.parse_args(sys.argv[1:]))
    with pytest.raises(InvalidInputError, match="given to the runner"):
        torchdeq.get_deq({"core": "pcdeq", "ift": True})
    sys.argv[1:] = argv
    assert torchdeq.get_deq(parser.parse_args(argv)).gradient == "phantom"


def test_phantom_gradient_when_a_dict_config_turns_ift_off():
    deq = torchdeq.get_deq({"core": "pcdeq", "ift": False, "grad": 3})
    assert deq.gradient == "phantom"
    f, x = dense_instance(dtype=torch.float32)
    z_out, _ = solve(deq.train(), f, x)
    assert z_out[-1].requires_grad


@pytest.mark.parametrize("path", PATHS)
def test_parametrized_weights_are_computed_once_per_solve(monkeypatch, path):
    calls = []
    original = NonNegativeWeightNorm.forward

    def counting(self, scale, direction):
        calls.append(torch.is_grad_enabled())
        return original(self, scale, direction)

    f = PcDEQLinear(8, "sigmoid")
    monkeypatch.setattr(NonNegativeWeightNorm, "forward", counting)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_check_every=1)
    x = f.inject(torch.randn(4, 8))
    z_out, info = solve(deq, f, x, path=path)
    z_out[-1].sum().backward()
    assert info["nstep"].max() >= 3
    if path == "closed_form":  # once, tracked: the solve's weight is the one the gradient flows to
        assert calls == [True]
    else:  # the solve's (tracked too: whether the closed form applies is known only after
        # it), the tracked step, the adjoint graph
        assert calls == [True, True, True]


def test_the_closed_form_differentiates_its_own_weight_whatever_another_thread_cached():
    # torch's parametrize cache is one for the whole process: another thread caching an
    # untracked W in the middle of a training solve must not cost this step its weight gradient
    def gradients(race: bool):
        torch.manual_seed(0)
        f = PcDEQLinear(6)
        u = torch.randn(3, 6, requires_grad=True)
        x = f.inject(u)
        entered, cached = threading.Event(), threading.Event()

        def other():
            assert entered.wait(timeout=60)
            with parametrize.cached(), torch.no_grad():
                _ = f.weight  # the process-wide cache now holds an untracked W
                cached.set()

        def func(z):
            if not entered.is_set():  # the solve's first call: let the other thread cache first
                entered.set()
                assert cached.wait(timeout=60)
            return f(z, x)

        thread = threading.Thread(target=other)
        thread.start()
        if not race:  # the other thread's block ends before the solve begins
            entered.set()
            thread.join()
        z_out, _ = torchdeq.get_deq(core="pcdeq")(func, torch.zeros_like(x))
        thread.join()
        z_out[-1].square().sum().backward()
        return [p.grad for p in (*f.parameters(), u)]

    for with_race, alone in zip(gradients(race=True), gradients(race=False)):
        assert with_race is not None
        torch.testing.assert_close(with_race, alone, rtol=0, atol=0)


@pytest.mark.parametrize("nonnegativity", ["weight_norm", "parametrize"])
def test_a_solve_in_another_thread_leaves_this_threads_weights_tracked(nonnegativity):
    # The solve's weight cache is its thread's: while another thread is in the middle of an
    # eval solve (its untracked W computed), this thread's training calls and steps are whole.
    torch.manual_seed(0)
    f = PcDEQLinear(6, nonnegativity=nonnegativity)
    x = f.inject(torch.randn(3, 6))
    computed, release = threading.Event(), threading.Event()

    def func(z):
        out = f(z, x)
        if not computed.is_set():  # hold the solve after its first call of f
            computed.set()
            assert release.wait(timeout=60)
        return out

    def evaluate():
        with torch.no_grad():
            torchdeq.get_deq(core="pcdeq").eval()(func, torch.zeros_like(x))

    thread = threading.Thread(target=evaluate)
    thread.start()
    try:
        assert computed.wait(timeout=60)
        assert f(torch.zeros_like(x), x).requires_grad  # a plain training-mode call
        z_out, info = torchdeq.get_deq(core="pcdeq")(lambda z: f(z, x), torch.zeros_like(x))
        z_out[-1].sum().backward()
    finally:
        release.set()
        thread.join()
    assert bool(info["converged"].all())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())


# -- configuration ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # parse() edits it; restored after each test


def parse(argv):
    """``argv`` parsed as a script's command line is: it becomes ``sys.argv``."""
    sys.argv[1:] = argv
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    add_pcdeq_args(parser)
    return parser.parse_args(argv)


def test_argparse_flags_get_pcdeq_defaults_and_the_namespace_is_not_modified():
    args = parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg"])
    before = copy.deepcopy(vars(args))
    deq = torchdeq.get_deq(args)
    assert vars(args) == before
    assert isinstance(deq, PcDEQCore)
    assert (deq.f_tol, deq.f_stop_mode, deq.f_max_iter, deq.b_tol, deq.b_stop_mode) == (
        1e-4,
        "rel",
        200,
        1e-4,
        "rel",
    )
    assert deq.f_solver is torchdeq.get_solver("pcdeq_fixed_point")
    assert deq.b_solver is torchdeq.get_solver("pcdeq_fixed_point")
    assert deq.gradient == "ift"


def test_a_flag_typed_on_the_command_line_wins_even_at_torchdeqs_default():
    argv = ["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--f_max_iter", "40", "--f_tol=1e-3"]
    argv += ["--f_stop_mode", "abs"]
    deq = torchdeq.get_deq(parse(argv))
    assert (deq.f_max_iter, deq.f_tol, deq.f_stop_mode, deq.b_max_iter) == (40, 1e-3, "abs", 200)
    args = parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg"])
    args.f_max_iter = 40  # set in code, at TorchDEQ's default: indistinguishable from untouched
    assert torchdeq.get_deq(args).f_max_iter == 200
    # A keyword of get_deq is set, though get_deq merges it into the Namespace before the core.
    deq = torchdeq.get_deq(
        parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg"]), f_max_iter=40, f_tol=1e-3
    )
    assert (deq.f_max_iter, deq.f_tol, deq.f_stop_mode) == (40, 1e-3, "rel")


def test_an_abbreviated_flag_counts_as_typed_as_argparse_reads_it():
    argv = ["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--f_max", "40", "--f_to=1e-3"]
    deq = torchdeq.get_deq(parse([*argv, "--f_stop", "abs"]))
    assert (deq.f_max_iter, deq.f_tol, deq.f_stop_mode, deq.b_max_iter) == (40, 1e-3, "abs", 200)
    args = parse(argv)
    sys.argv[1:] = [*argv, "--", "--b_max_iter"]  # after "--", a positional argument
    assert torchdeq.get_deq(args).b_max_iter == 200
    # A prefix of several keys is a flag of the script's own: Jupyter's kernel file, a --b 64
    args = parse([])
    sys.argv[1:] = ["--f=/run/jupyter/kernel-1.json", "--b", "64"]
    deq = torchdeq.get_deq(args, core="pcdeq", norm_type="pcdeq_nonneg")
    assert (deq.f_solver, deq.f_tol, deq.f_max_iter, deq.b_tol) == (pcdeq_fixed_point, 1e-4, 200, 1e-4)


def test_keywords_of_get_deq_are_no_evidence_that_the_namespace_was_not_parsed_from_argv():
    args = parse([])  # a script run without flags, which picks the core in code
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq = torchdeq.get_deq(args, core="pcdeq", norm_type="pcdeq_nonneg", ift=False, f_max_iter=40)
        assert (deq.f_max_iter, deq.f_tol, deq.gradient) == (40, 1e-4, "phantom")
        # A core rebuilt from the first one's resolved config is the same core, and quiet.
        for again in (torchdeq.get_deq(deq.args), PcDEQCore(deq.args)):
            assert (again.f_max_iter, again.f_tol, again.gradient) == (40, 1e-4, "phantom")


def test_a_namespace_the_command_line_does_not_explain_warns_of_each_default_it_replaces():
    """parse_args([...]) in a notebook: a typed value at TorchDEQ's default looks untouched."""
    argv = ["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--f_max_iter", "40", "--f_tol", "1e-5"]
    args = parse(argv)
    sys.argv[1:] = []  # not this process's command line
    expected = (
        r"pcDEQ's \(f_solver 'fixed_point_iter' -> 'pcdeq_fixed_point', b_solver 'fixed_point_iter' -> "
        r"'pcdeq_fixed_point', f_max_iter 40 -> 200, b_max_iter 40 -> 200, b_tol 1e-06 -> 0.0001, "
        r"f_stop_mode 'abs' -> 'rel', b_stop_mode 'abs' -> 'rel', ift False -> True\)\. It was not parsed "
        r"from this process's command line \(core='pcdeq', f_tol=1e-05, norm_type='pcdeq_nonneg' without"
    )
    with pytest.warns(PcDEQWarning, match=expected):
        deq = torchdeq.get_deq(args)
    assert (deq.f_max_iter, deq.f_tol) == (200, 1e-5)  # f_tol differs from TorchDEQ's default: kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq = torchdeq.get_deq(
            args,
            f_max_iter=40,
            f_solver="pcdeq_fixed_point",
            b_solver="pcdeq_fixed_point",
            b_max_iter=200,
            b_tol=1e-4,
            f_stop_mode="rel",
            b_stop_mode="rel",
            ift=True,
        )
        assert deq.f_max_iter == 40  # the advice works, and says nothing more


def test_explicit_flags_and_dict_keys_win_and_the_dict_is_not_modified():
    args = parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--f_tol", "1e-6", "--f_max_iter", "30"])
    deq = torchdeq.get_deq(args)
    assert (deq.f_tol, deq.f_max_iter, deq.f_stop_mode) == (1e-6, 30, "rel")
    config = {"core": "pcdeq", "f_stop_mode": "abs", "b_max_iter": 7, "pcdeq_guard": "warn"}
    before = dict(config)
    deq = torchdeq.get_deq(config)
    assert config == before
    assert (deq.f_stop_mode, deq.b_max_iter, deq.guard) == ("abs", 7, "warn")


def test_phantom_gradient_options_unused_under_the_default_ift_are_said():
    """An existing TorchDEQ script with --grad / --tau switched to --core pcdeq gets IFT."""
    args = parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--grad", "5", "--tau", "0.8"])
    with pytest.warns(PcDEQWarning, match=r"grad=\[5\] and tau=0.8 configure TorchDEQ's phantom gradient"):
        assert torchdeq.get_deq(args).gradient == "ift"
    with pytest.warns(
        PcDEQWarning, match=r"grad=3 configures .*--pcdeq_phantom .*get_deq\(args, ift=False\)"
    ):
        torchdeq.get_deq(core="pcdeq", grad=3)
    states = r"sup_gap=2 and sup_loc=\[1\] configure .*returns one state in training"
    with pytest.warns(PcDEQWarning, match=states):
        torchdeq.get_deq(core="pcdeq", sup_gap=2, sup_loc=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PcDEQCore(args, ift=False).gradient == "phantom"  # the advice works
        assert torchdeq.get_deq(args, ift=False).gradient == "phantom"
        assert torchdeq.get_deq(args, pcdeq_phantom=True).gradient == "phantom"
        phantom = parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--grad", "5", "--pcdeq_phantom"])
        assert torchdeq.get_deq(phantom).gradient == "phantom"
        assert torchdeq.get_deq(core="pcdeq", sup_loc=[], sup_gap=-1).gradient == "ift"  # unused: quiet
        assert torchdeq.get_deq(core="pcdeq", grad=3, ift=True).gradient == "ift"  # chosen: quiet
        assert torchdeq.get_deq(core="pcdeq", grad=3, n_states=2).gradient == "ift"  # grad is used


def test_warns_for_a_solver_without_guarantee_and_still_reports_convergence():
    with pytest.warns(PcDEQWarning, match=r"f_solver='anderson' is without a convergence guarantee.*guard"):
        deq = torchdeq.get_deq(core="pcdeq", f_solver="anderson")
    f, x = dense_instance(dtype=torch.float32)
    _, info = solve(deq.eval(), f, x)
    assert info["converged"].dtype == torch.bool and info["converged"].all()


def test_a_solver_assigned_after_construction_is_reported_as_the_config_check_would():
    x = torch.rand(4, 6, dtype=torch.float64) + 0.5
    falling = lambda z: torch.tanh(x - 0.5 * z)  # noqa: E731  (not monotone: the guard's case)
    deq = torchdeq.get_deq(core="pcdeq").eval()
    with pytest.raises(NotPositiveMonotoneError):
        deq(falling, torch.zeros_like(x))
    deq.f_solver = torchdeq.get_solver("anderson")
    with pytest.warns(PcDEQWarning, match=r"f_solver was replaced by 'anderson_solver' .* no guard"):
        _, info = deq(falling, torch.zeros_like(x))
    assert bool(info["converged"].all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(falling, torch.zeros_like(x))  # said once per solver
    certified = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True).eval()
    certified.f_solver = torchdeq.get_solver("anderson")
    with pytest.raises(InvalidInputError, match=r"replaced by 'anderson_solver' .* pcdeq_enclosure=True"):
        certified(falling, torch.zeros_like(x))


def test_a_certificate_that_the_chosen_solver_cannot_give_is_refused():
    with pytest.raises(InvalidInputError, match=r"f_solver='anderson' would return no info\['error_bound'\]"):
        torchdeq.get_deq(core="pcdeq", f_solver="anderson", pcdeq_enclosure=True)


def test_warns_when_norm_type_allows_negative_weights():
    with pytest.warns(PcDEQWarning, match=r"norm_type='weight_norm' allows negative weights.*pcdeq_nonneg"):
        torchdeq.get_deq(parse(["--core", "pcdeq"]))


def test_a_core_rebuilt_from_another_cores_config_is_the_same_core():
    first = torchdeq.get_deq(core="pcdeq", hook_ift=True, f_max_iter=50, pcdeq_guard="warn")
    second = torchdeq.get_deq(first.args)
    assert (second.gradient, second.f_max_iter, second.guard) == ("hook_ift", 50, "warn")
    # TorchDEQ's get_deq and apply_norm update the config they are given in place: a copy here
    assert torchdeq.get_deq(first.args, f_max_iter=7).f_max_iter == 7
    torchdeq.apply_norm(torch.nn.Linear(2, 2), args=first.args, norm_type="none")
    assert first.args.get("f_max_iter") == 50 and torchdeq.get_deq(first.args).f_max_iter == 50
    with pytest.raises(InvalidInputError, match=r"a change \(f_tol\) would not reach the core"):
        first.args.update(f_tol=1e-3)


def test_a_mapping_config_is_read_by_its_items_or_refused_where_torchdeq_drops_them():
    """Found by review: an OmegaConf / Hydra config or a UserDict lost every value (TorchDEQ
    reads an unknown type by its attributes), with no word from the plugin."""
    from collections import UserDict

    core = PcDEQCore(UserDict(f_max_iter=7, pcdeq_guard="warn"))
    assert (core.f_max_iter, core.guard) == (7, "warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (TorchDEQ's "Unrecognized config type")
        with pytest.raises(InvalidInputError, match=r"attributes \['data'\].*Pass dict\(config\)"):
            torchdeq.get_deq(UserDict(core="pcdeq", f_max_iter=7), core="pcdeq")


def test_a_cores_config_saved_as_plain_data_rebuilds_the_same_core(monkeypatch):
    """Found by review: a core's args saved as JSON (or dict(...) in a checkpoint) lost the
    mark of a resolved config and read as argparse's: f_max_iter 40 became 200 and f_tol 1e-3
    became 1e-4 in the rebuilt core, with a warning that called it an argparse config."""
    import json

    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    argv = ["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--f_max_iter", "40", "--f_tol", "1e-3"]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    first = torchdeq.get_deq(parser.parse_args(argv))
    monkeypatch.setattr(sys, "argv", ["eval.py", "--checkpoint", "run1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for saved in (json.loads(json.dumps(first.args.config)), dict(first.args.config)):
            rebuilt = torchdeq.get_deq(saved)
            assert (rebuilt.f_max_iter, rebuilt.f_tol, rebuilt.gradient) == (40, 1e-3, "ift")
    assert torchdeq.get_deq(json.loads(json.dumps(first.args.config)), f_max_iter=9).f_max_iter == 9


def test_a_core_built_directly_rebuilds_as_a_pcdeq_core(monkeypatch):
    """Found by review: PcDEQCore(args) recorded no core (or argparse's default 'sliced'), so
    get_deq(core.args, ...), the remedy the core's own errors name, built TorchDEQ's DEQSliced."""
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    argv = ["--norm_type", "pcdeq_nonneg"]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])  # (parsed from this command line)
    for first in (PcDEQCore({"f_max_iter": 5}), PcDEQCore(parser.parse_args(argv), f_max_iter=5)):
        assert first.args.get("core") == "pcdeq"
        rebuilt = torchdeq.get_deq(first.args, f_tol=1e-3)
        assert type(rebuilt) is PcDEQCore and (rebuilt.f_max_iter, rebuilt.f_tol) == (5, 1e-3)


def test_a_core_rebuilt_from_another_cores_config_differentiates_as_its_own_keys_say():
    first = torchdeq.get_deq(core="pcdeq", f_max_iter=50)
    assert first.gradient == "ift"
    assert PcDEQCore(first.args, hook_ift=True).gradient == "hook_ift"
    assert PcDEQCore(first.args, ift=False).gradient == "phantom"
    assert torchdeq.get_deq(first.args, hook_ift=True).gradient == "hook_ift"  # (written into first.args)
    # how it differentiates is not a key of its own: a config saved by an earlier version holds
    # it, which is read quietly where it agrees with ift / hook_ift, and ignored with a warning
    assert torchdeq.get_deq({"core": "pcdeq", "pcdeq_gradient": "ift"}).gradient == "ift"
    with pytest.warns(PcDEQWarning, match="pcdeq_gradient='phantom' is ignored: .* \\('ift' here\\)"):
        assert torchdeq.get_deq(core="pcdeq", pcdeq_gradient="phantom").gradient == "ift"


def test_every_unknown_keyword_override_is_reported_even_with_an_argparse_config():
    args = parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg"])
    with pytest.warns(PcDEQWarning, match="'f_tolerance' is ignored .* neither a TorchDEQ key"):
        assert PcDEQCore(args, f_tolerance=1e-6).f_tol == 1e-4
    with pytest.warns(PcDEQWarning, match="'f_maxiter' is ignored .* Did you mean 'f_max_iter'"):
        PcDEQCore(args, f_maxiter=10)
    with warnings.catch_warnings():  # the script's own flags, in the namespace, are not reported
        warnings.simplefilter("error")
        PcDEQCore(argparse.Namespace(**vars(args), f_thresh=30))


def test_torch_func_transforms_over_the_core_are_a_typed_error():
    from torch.func import functional_call, grad, vmap

    f = PcDEQLinear(4)
    x = f.inject(torch.randn(3, 4))
    deq, z0 = torchdeq.get_deq(core="pcdeq"), torch.zeros_like(x)  # z0 made outside the transform
    params = {name: p.detach() for name, p in f.named_parameters()}

    def loss(params):
        return deq(lambda z: functional_call(f, params, (z, x)), z0)[0][-1].sum()

    def solve(x):
        return deq(lambda z: f(z, x), torch.zeros_like(x))[0][-1]

    for transformed, argument in ((grad(loss), params), (vmap(solve), x.unsqueeze(1))):
        with pytest.raises(InvalidInputError, match=r"under torch.func transforms .*loss\.backward\(\)"):
            transformed(argument)
    assert bool(deq(lambda z: f(z, x), z0)[1]["converged"].all())  # and nothing stays switched on


def test_sradius_mode_in_the_config_is_reported_as_a_call_argument():
    deq = None
    with pytest.warns(PcDEQWarning, match=r"ignored .* Pass it there: deq\(f, z0, sradius_mode=True\)"):
        deq = torchdeq.get_deq(core="pcdeq", sradius_mode=True)
    f = PcDEQLinear(4)
    x = f.inject(torch.randn(2, 4))
    with torch.no_grad():
        assert torch.equal(deq.eval()(lambda z: f(z, x), torch.zeros_like(x))[1]["sradius"], torch.zeros(1))
        assert deq(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)[1]["sradius"].shape == (2,)
    with warnings.catch_warnings():  # a script's --sradius_mode flag is the script's to pass on
        warnings.simplefilter("error")
        PcDEQCore(parse(["--core", "pcdeq", "--norm_type", "pcdeq_nonneg", "--sradius_mode"]))


def test_unknown_and_misspelt_keys_are_named_with_the_closest_valid_key():
    with pytest.raises(UnknownNameError, match=r"'pcdeq_gaurd'.*Did you mean 'pcdeq_guard'"):
        torchdeq.get_deq({"core": "pcdeq", "pcdeq_gaurd": "off"})
    with pytest.warns(PcDEQWarning, match="'stop_mode'.*Did you mean '[fb]_stop_mode'"):
        torchdeq.get_deq({"core": "pcdeq", "stop_mode": "abs"})


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"pcdeq_guard": "strict"}, UnknownNameError, "Valid: 'off', 'raise', 'warn'"),
        ({"pcdeq_nonconvergence": "fail"}, UnknownNameError, "Valid: 'ignore', 'raise', 'warn'"),
        (
            {"pcdeq_guard": None},
            UnknownNameError,
            r"^Unknown pcdeq_guard None\. Valid: 'off', 'raise', 'warn'\.$",
        ),
        ({"pcdeq_check_every": 0}, InvalidInputError, "'auto' or an integer >= 1"),
        ({"pcdeq_check_every": np.float32(5.5)}, InvalidInputError, r"integer >= 1, got np.float32\(5.5\)"),
        ({"pcdeq_check_every": math.inf}, InvalidInputError, "'auto' or an integer >= 1, got inf"),
        ({"f_max_iter": 0}, InvalidInputError, "f_max_iter must be an integer >= 1, got 0"),
        ({"b_tol": -1.0}, InvalidInputError, "b_tol must be a positive finite number"),
        ({"f_stop_mode": "relative"}, UnknownNameError, "Valid: 'abs', 'rel'"),
        ({"ift": "False"}, InvalidInputError, "ift must be True or False, got 'False' \\(str\\)"),
        ({"hook_ift": None}, InvalidInputError, "hook_ift must be True or False, got None"),
        ({"f_tol": "1e-4"}, InvalidInputError, "f_tol must be a positive finite number, got '1e-4'"),
        ({"eval_factor": "2"}, InvalidInputError, "eval_factor must be a positive finite number, got '2'"),
        ({"eval_f_max_iter": 50.5}, InvalidInputError, r"eval_f_max_iter \(.*must be an integer, got 50.5"),
        ({"eval_factor": 0, "f_max_iter": 10}, InvalidInputError, "eval_factor must be a positive finite"),
        ({"tau": 0, "n_states": 2}, InvalidInputError, "tau must be a positive finite number, got 0"),
        ({"grad": 0}, InvalidInputError, r"grad \(the phantom gradient's steps\) must be an integer >= 1"),
        ({"grad": [2, 0.5]}, InvalidInputError, r"nonempty list of them.*got \[2, 0.5\]"),
        ({"grad": []}, InvalidInputError, r"nonempty list of them, got \[\]"),
        ({"grad": [1, 2], "n_states": 3}, InvalidInputError, r"gives 2 .* returns 3 states \(n_states=3"),
        ({"n_states": 2.5}, InvalidInputError, "n_states .* must be an integer, got 2.5"),
        ({"indexing": "5"}, InvalidInputError, r"indexing .* must be a list of integers, got '5'"),
        ({"indexing": [2.5]}, InvalidInputError, r"indexing .* must be a list of integers, got \[2.5\]"),
    ],
)
def test_invalid_config_values(config, error, match):
    with pytest.raises(error, match=match):
        torchdeq.get_deq(core="pcdeq", **config)


def test_numpy_tensor_and_whole_float_integers_are_taken_as_ints():
    deq = torchdeq.get_deq(
        core="pcdeq",
        f_max_iter=np.int64(30),
        b_max_iter=torch.tensor(20),
        eval_f_max_iter=40.0,  # a config read from JSON
        n_states=np.int64(2),
        f_tol=np.float32(1e-3),
    )
    assert (deq.f_max_iter, deq.b_max_iter, deq.eval_f_max_iter, deq.indexing) == (30, 20, 40, [15, 15])
    assert all(type(value) is int for value in (deq.f_max_iter, deq.b_max_iter, deq.eval_f_max_iter))
    assert type(deq.f_tol) is float and deq.f_tol == pytest.approx(1e-3)
    assert torchdeq.get_deq(core="pcdeq", indexing=np.array([5]), grad=(np.int64(2),)).indexing == [5, 195]
    for grad in (np.int64(2), 2.0):  # TorchDEQ asserts that a single step is an int
        assert torchdeq.get_deq(core="pcdeq", ift=False, grad=grad).args.get("grad") == 2


@pytest.mark.parametrize(
    "config",
    [
        {"n_states": 0},  # TorchDEQ: no split
        {"n_states": -1},
        {"indexing": None},  # TorchDEQ's default value, which its core cannot unpack
        {"indexing": range(5, 6)},
        {"eval_factor": 0, "eval_f_max_iter": 50},  # the factor is unused
        {"tau": 0},  # unused by the implicit gradient of one state (warned about)
    ],
)
def test_values_torchdeq_gives_a_meaning_stay_valid(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PcDEQWarning)
        deq = torchdeq.get_deq(core="pcdeq", **config)
    f, x = dense_instance(dtype=torch.float32)
    z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    assert info["converged"].all() and len(z_out) == (2 if config.get("indexing") else 1)


def test_per_call_solver_kwargs_are_checked_against_the_core():
    f, x = dense_instance(dtype=torch.float32)
    deq = torchdeq.get_deq(core="pcdeq", n_states=3, pcdeq_nonconvergence="ignore")

    def call(**solver_kwargs):
        return deq(lambda z: f(z, x), torch.zeros_like(x), solver_kwargs=solver_kwargs)

    with pytest.raises(InvalidInputError, match=r"'f_max_iter'\]=2 is split by n_states=3.*\[0, 0, 0\]"):
        call(f_max_iter=2)
    with pytest.raises(InvalidInputError, match=r"\['f_max_iter'\] must be an integer >= 1, got 6.5"):
        call(f_max_iter=6.5)
    for key, instead in (("tol", "f_tol"), ("stop_mode", "f_stop_mode"), ("max_iter", "'f_max_iter': n")):
        with pytest.raises(InvalidInputError, match=rf"cannot hold '{key}'.*{instead}"):
            call(**{key: 1})
    # a NumPy budget is used in training, where TorchDEQ reads only int and float budgets; a
    # whole float is TorchDEQ's own type; None keeps the configured budget
    for budget in (np.int64(6), 6.0):
        z_out, info = call(f_max_iter=budget)
        assert len(z_out) == 3 and int(info["trace_steps"][-1]) <= 2
    z_out, info = call(f_max_iter=None)
    assert len(z_out) == 3 and info["converged"].all()
    assert deq.eval()(lambda z: f(z, x), torch.zeros_like(x), solver_kwargs={"f_max_iter": np.int64(1)})[1][
        "trace_steps"
    ].tolist() == [1]


def test_add_pcdeq_args_help_and_choices():
    parser = add_pcdeq_args(argparse.ArgumentParser())
    text = parser.format_help()
    for flag in ("--pcdeq_guard", "--pcdeq_nonconvergence", "--pcdeq_check_every"):
        assert flag in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--pcdeq_guard", "loud"])
    assert (
        torchdeq.get_deq(
            parse(["--core", "pcdeq", "--norm_type", "none", "--pcdeq_check_every", "3"])
        ).check_every
        == 3
    )


# -- checks at run time -----------------------------------------------------------------------


def test_initial_state_errors_before_any_solve():
    deq = torchdeq.get_deq(core="pcdeq")
    f, x = dense_instance(dtype=torch.float32)
    with pytest.raises(InvalidInputError, match=r"negative entries \(min -1\).*zeros_like"):
        solve(deq, f, x, -torch.ones_like(x))
    bad = torch.zeros_like(x)
    bad[0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        solve(deq, f, x, bad)
    with pytest.raises(
        InvalidInputError, match="one tensor, or several as a list or tuple of tensors, got dict"
    ):
        deq(lambda z: z, {"z": x})
    with pytest.raises(InvalidInputError, match=r"batch dimension first, got torch.float32 of shape \(12,\)"):
        deq(lambda z: z, x[0])


def test_guard_through_the_core():
    torch.manual_seed(0)
    w = torch.rand(4, 4) * 0.3
    x = -torch.rand(2, 4)  # not admissible for tanh
    with pytest.raises(NotPositiveMonotoneError, match="negative entries"):
        torchdeq.get_deq(core="pcdeq")(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x))
    with pytest.warns(PcDEQWarning, match="pcDEQ guard"):
        torchdeq.get_deq(core="pcdeq", pcdeq_guard="warn")(
            lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x)
        )
    torchdeq.get_deq(core="pcdeq", pcdeq_guard="off")(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x))


def slow_instance():
    f, x = dense_instance(activation="tanh", scale=2.0, dtype=torch.float32)
    return f, x * 1e-6  # from a tiny injection the iterates need many steps to grow


def test_the_nonconvergence_message_counts_the_iterations_each_solver_ran():
    f, x = slow_instance()
    with pytest.warns(PcDEQWarning, match=r"did not reach rel tol 0.0001 within 1 iteration \(best"):
        solve(torchdeq.get_deq(core="pcdeq", f_max_iter=1), f, x)
    # TorchDEQ's solvers run their whole budget and return each sample's best iterate, whose
    # iteration is their nstep: that is not the count of iterations run.
    with pytest.warns(PcDEQWarning, match="f_solver='anderson' is without a convergence guarantee"):
        anderson = torchdeq.get_deq(core="pcdeq", f_solver="anderson", f_max_iter=5)
    expected = (
        r"did not reach rel tol 0.0001 within its f_max_iter budget \(best rel residual reached by the "
        r"worst sample: [\d.e-]+; the solver returns each sample's best iterate, here from iterations "
        r"up to 5\)"
    )
    with pytest.warns(PcDEQWarning, match=expected):
        solve(anderson, f, x)


def test_nonconvergence_warns_by_default_and_can_raise_or_be_ignored():
    f, x = slow_instance()
    with pytest.warns(
        PcDEQWarning, match=r"forward solve: 3 of 3 samples did not reach rel tol 0.0001 within 3 iterations"
    ):
        _, info = solve(torchdeq.get_deq(core="pcdeq", f_max_iter=3), f, x)
    assert not info["converged"].any()
    with pytest.raises(ConvergenceError, match="Try a larger f_max_iter"):
        solve(torchdeq.get_deq(core="pcdeq", f_max_iter=3, pcdeq_nonconvergence="raise"), f, x)
    _, info = solve(torchdeq.get_deq(core="pcdeq", f_max_iter=3, pcdeq_nonconvergence="ignore"), f, x)
    assert not info["converged"].any()


def test_backward_statistics_reach_the_writer_and_nonconvergence_is_reported():
    f, x = dense_instance(activation="tanh", scale=2.0, dtype=torch.float32)
    seen = []
    deq = torchdeq.get_deq(core="pcdeq", b_max_iter=2)
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x), backward_writer=seen.append)
    with pytest.warns(PcDEQWarning, match="backward solve: .* Try a larger b_max_iter"):
        z_out[-1].sum().backward()
    assert len(seen) == 1 and not seen[0]["converged"].all()
    assert seen[0]["nstep"].max() == 2


def _stopped_short_of_saturation(dtype=torch.float32):
    """relu6 with W = 5.4 and injections [1e-6, 1e-6, 12.6] (Hypothesis found it, in test_fuzz).

    The forward stops at iteration 2: its relative residual (1e-6) is dominated by the saturated
    entry, while the two others, at 6.4e-6, still grow 5.4x per iteration towards 6. Linearized
    there, the adjoint grows 5.4x per product without bound: float32's norm overflows at about
    the 50th product, float64's only at about the 210th, beyond TorchDEQ's default budget (200),
    so that float64 relies on the solver's growth limit.
    """
    f = PcDEQLinear(1, "relu6", dtype=dtype)
    set_weight(f, torch.full((1, 1), 5.432, dtype=dtype))
    u = torch.tensor([[[-20.0], [-21.0], [12.6]]], dtype=dtype, requires_grad=True)
    return f, u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", PATHS)
def test_a_diverging_adjoint_is_reported_and_gets_the_one_step_gradient(path, dtype):
    f, u = _stopped_short_of_saturation(dtype)
    x = f.inject(u)
    seen = []
    deq = torchdeq.get_deq(core="pcdeq")  # b_max_iter: TorchDEQ's default
    z_out, info = deq(layer_map(f, x, path), torch.zeros_like(x), backward_writer=seen.append)
    assert info["converged"].all() and int(info["trace_steps"][-1]) == 2
    g = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=dtype)
    with pytest.warns(PcDEQWarning, match=r"adjoint iteration diverged .* for 1 of 1 samples"):
        (z_out[-1] * g).sum().backward()
    assert seen[0]["diverged"].tolist() == [True] and seen[0]["converged"].tolist() == [False]

    # the one-step gradient at the state the gradient linearizes at: the solve's last input
    # (closed form, which returns z_2 = f(z_1)), or its output (recorded: f(z_2))
    with torch.no_grad():
        z_lin = iterate(f, x, torch.zeros_like(x), 1 if path == "closed_form" else 2)[-1]
    u2 = u.detach().clone().requires_grad_()
    expected = torch.autograd.grad((f(z_lin, f.inject(u2)) * g).sum(), [u2, *f.parameters()])
    torch.testing.assert_close(u.grad, expected[0], rtol=1e-6, atol=0)
    for p, e in zip(f.parameters(), expected[1:]):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)
    # (the 1 x 1 weight norm's direction gets none: 0 exactly in float64, rounding in float32)
    assert any(p.grad.abs().sum() > 0 for p in f.parameters())


def test_a_diverging_adjoint_raises_under_the_raise_policy_and_a_tighter_forward_avoids_it():
    f, u = _stopped_short_of_saturation()
    x = f.inject(u)
    deq = torchdeq.get_deq(core="pcdeq", b_max_iter=400, pcdeq_nonconvergence="raise")
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
    with pytest.raises(
        ConvergenceError, match=r"Use a smaller f_tol, or \(bounded activations\) pcdeq_enclosure=True"
    ):
        z_out[-1].sum().backward()
    # the advice holds: either forward runs until the small entries saturate
    for option in (dict(f_tol=1e-6), dict(pcdeq_enclosure=True)):
        seen = []
        deq = torchdeq.get_deq(core="pcdeq", b_max_iter=400, pcdeq_nonconvergence="raise", **option)
        z_out, _ = deq(lambda z: f(z, f.inject(u)), torch.zeros_like(x), backward_writer=seen.append)
        z_out[-1].sum().backward()
        assert seen[0]["converged"].all(), option
        assert "diverged" not in seen[0] or not seen[0]["diverged"].any()


def test_a_backward_solver_that_raises_for_its_own_reasons_keeps_its_message():
    # a solver registered under another name does not get nonfinite="report": the overflowing
    # adjoint raises the solver's own error, not one that blames the (finite) loss gradient
    torchdeq.solver.register_solver(
        "pcdeq_every_iteration", functools.partial(pcdeq_fixed_point, check_every=1)
    )
    try:
        f, u = _stopped_short_of_saturation()
        x = f.inject(u)
        with pytest.warns(PcDEQWarning, match="without a convergence guarantee"):
            deq = torchdeq.get_deq(core="pcdeq", b_solver="pcdeq_every_iteration", b_max_iter=400)
        z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
        with pytest.raises(NonFiniteError, match="f produced non-finite values"):
            z_out[-1].sum().backward()
    finally:
        torchdeq.solver._solvers.pop("pcdeq_every_iteration")


def test_a_forward_solve_told_to_report_divergence_is_reported_as_a_forward_solve():
    growth = torch.tensor([[1e5], [0.5]])
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=100).eval()
    with pytest.warns(PcDEQWarning, match="pcdeq forward solve: 1 of 2 samples did not reach"):
        _, info = deq(lambda z: z * growth + 1, torch.zeros(2, 3), solver_kwargs={"nonfinite": "report"})
    assert info["diverged"].tolist() == [True, False]


def test_a_non_finite_loss_gradient_is_not_mistaken_for_a_diverging_adjoint():
    f, x = dense_instance(dtype=torch.float32)
    u = torch.randn(x.shape, requires_grad=True)
    z_out, _ = torchdeq.get_deq(core="pcdeq")(lambda z: f(z, f.inject(u)), torch.zeros_like(x))
    with pytest.raises(NonFiniteError, match="The loss gradient arriving at the pcdeq core holds NaN or Inf"):
        (z_out[-1] * torch.tensor(float("nan"))).sum().backward()


def test_eval_mode_returns_the_fixed_point_and_optional_spectral_radius():
    f, x = dense_instance(activation="sigmoid", scale=2.0, dtype=torch.float32)
    deq = torchdeq.get_deq(core="pcdeq").eval()
    z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
    assert len(z_out) == 1 and not z_out[0].requires_grad
    assert info["converged"].all()
    assert (info["sradius"] < 0.5 + 1e-3).all(), "pcDEQ-2 (sigmoid) has spectral radius <= 1/2"


def test_unknown_solver_names_list_the_valid_ones():
    with pytest.raises(
        UnknownNameError, match=r"Unknown f_solver 'andersen'.*'pcdeq_fixed_point'.*Did you mean 'anderson'"
    ):
        torchdeq.get_deq(core="pcdeq", f_solver="andersen")


def test_torchdeq_simple_solver_works_as_backward_solver():
    f, x = dense_instance(scale=2.0)
    u = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    grads = []
    for b_solver in ("pcdeq_fixed_point", "simple_fixed_point_iter"):
        if b_solver == "pcdeq_fixed_point":
            deq = torchdeq.get_deq(core="pcdeq", **TIGHT)
        else:
            with pytest.warns(PcDEQWarning, match="b_solver='simple_fixed_point_iter' is plain iteration"):
                deq = torchdeq.get_deq(core="pcdeq", b_solver=b_solver, b_max_iter=300, f_tol=1e-12)
        solve(deq, f, f.inject(u))[0][-1].square().sum().backward()
        grads.append(u.grad.clone())
        u.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"n_states": 300}, r"^n_states=300 splits f_max_iter=200"),
        ({"indexing": [250]}, r"^indexing=\[250\] splits .*segments of \[250, -50\].*Raise f_max_iter"),
        ({"indexing": [20, 5]}, r"^indexing=\[20, 5\] splits .*\[20, -15, 195\].* strictly increase"),
        ({"indexing": [0, 5]}, r"^indexing=\[0, 5\] splits .*\[0, 5, 195\].* strictly increase"),
        ({"eval_factor": 0.001}, r"eval solve gets 0 iterations.*eval_factor=0.001"),
    ],
)
def test_iteration_budgets_are_checked_when_the_core_is_built(config, match):
    with pytest.raises(InvalidInputError, match=match):
        torchdeq.get_deq(core="pcdeq", **config)


@pytest.mark.parametrize("config", [{"n_states": 2}, {"indexing": [3]}])
def test_several_states_train_with_the_implicit_gradient_of_the_last(config):
    f, x = dense_instance(scale=2.0)
    u = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    z_out, _ = solve(torchdeq.get_deq(core="pcdeq", **TIGHT, **config), f, f.inject(u))
    assert len(z_out) == 2
    z_out[-1].sum().backward()
    several = u.grad.clone()
    u.grad = None
    solve(torchdeq.get_deq(core="pcdeq", **TIGHT), f, f.inject(u))[0][-1].sum().backward()
    torch.testing.assert_close(several, u.grad, rtol=1e-9, atol=1e-12)


def test_inference_mode_runs_the_solve_and_the_rate_bound_and_refuses_the_power_method():
    f, x = dense_instance(dtype=torch.float32)
    rated = torchdeq.get_deq(core="pcdeq", pcdeq_rate_bound=True).eval()
    with torch.no_grad():
        _, reference = rated(lambda z: f(z, x), torch.zeros_like(x))  # (q in closed form)
    with torch.inference_mode():
        _, info = torchdeq.get_deq(core="pcdeq").eval()(lambda z: f(z, x), torch.zeros_like(x))
        assert info["converged"].all()
        # The rate bound's forward-mode products run on a copy made outside inference mode
        # (it was refused); q is taken at z*'s iterate instead of the one before: as valid.
        z_out, rated_info = rated(lambda z: f(z, x), torch.zeros_like(x))
        q = rated_info["rate_bound"]
        certified = torchdeq.get_deq(core="pcdeq", pcdeq_sradius="rate_bound").eval()
        _, sradius = certified(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
        with pytest.raises(InvalidInputError, match="sradius_mode with pcdeq_sradius='power' cannot run"):
            torchdeq.get_deq(core="pcdeq").eval()(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
        # a training-mode core with grad on: inference tensors have no version counter, so the
        # last step is not differentiated in closed form (it was a RuntimeError from the chain)
        with torch.enable_grad():
            _, info = torchdeq.get_deq(core="pcdeq")(lambda z: f(z, x), torch.zeros_like(x))
        assert info["converged"].all()
    z_star = z_out[-1].clone()
    w = f.weight.detach()
    slope = 1 - torch.tanh(z_star.double() @ w.double().T + x.double()) ** 2
    radius = torch.linalg.eigvals(slope[:, :, None] * w.double()).abs().amax(dim=1)
    assert (radius <= q).all() and (q < 1).all()
    assert torch.allclose(q, reference["rate_bound"], rtol=1e-2)
    assert torch.equal(sradius["sradius"], q)


def test_training_inside_an_outer_parametrize_cache_is_refused():
    from torch.nn.utils import parametrize

    f = PcDEQLinear(4)
    x = f.inject(torch.randn(2, 4))
    with parametrize.cached(), pytest.raises(InvalidInputError, match="cached weights carry no gradient"):
        torchdeq.get_deq(core="pcdeq")(lambda z: f(z, x), torch.zeros_like(x))


@pytest.mark.parametrize("path", PATHS)
def test_hook_ift_gives_the_implicit_gradient_on_every_backward_of_a_retained_graph(path):
    f, x = dense_instance(scale=2.0)
    u = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    reference = torchdeq.get_deq(core="pcdeq", **TIGHT)
    solve(reference, f, f.inject(u), path="recorded")[0][-1].sum().backward()
    expected = u.grad.clone()
    u.grad = None
    z = solve(torchdeq.get_deq(core="pcdeq", hook_ift=True, **TIGHT), f, f.inject(u), path=path)[0][-1]
    loss = z.sum()
    for _ in range(2):
        loss.backward(retain_graph=True)
        torch.testing.assert_close(u.grad, expected, rtol=1e-9, atol=1e-12)
        u.grad = None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backward", [True, False], ids=["after backward", "without backward"])
@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
def test_a_training_step_frees_every_state_tensor_it_made(gradient, backward, path):
    """A graph that refers to itself through a hook is never collected: one leaked state per step."""
    import gc
    import weakref

    f, x = dense_instance(scale=2.0, dtype=torch.float32)
    deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift")
    u = torch.randn(x.shape, requires_grad=True)
    states, step = [], {}

    def tracked(z):
        states.append(weakref.ref(z))
        return layer_map(f, step["x"], path)(z)

    for _ in range(3):
        step["x"] = f.inject(u)
        z_out, _ = deq(tracked, torch.zeros_like(step["x"]))
        if backward:
            z_out[-1].sum().backward()
        del z_out
        step.clear()
    gc.collect()
    assert len(states) > 6
    assert [ref for ref in states if ref() is not None] == []


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
def test_a_second_order_gradient_through_the_solve_is_an_error_not_a_wrong_number(gradient, path):
    f, x = dense_instance(scale=2.0)
    u = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift")
    z = solve(deq, f, f.inject(u), path=path)[0][-1]
    with pytest.raises(InvalidInputError, match=r"second-order gradient .* \(create_graph=True\)"):
        torch.autograd.grad(z.square().sum(), u, create_graph=True)
    (du,) = torch.autograd.grad(z.square().sum(), u)  # the first order is unaffected
    assert torch.isfinite(du).all() and (du != 0).any()


def _weight_tied_blocks(deq, f, u, bind):
    """Two weight-tied blocks written as a loop; ``bind=False``: the closure reads the loop's
    ``x`` when it is called, so a backward that calls ``f`` again sees the second block's."""
    h = u
    for _ in range(2):
        x = f.inject(h)
        func = (lambda z, x=x: f(z, x) * 1.0) if bind else (lambda z: f(z, x) * 1.0)  # (recorded path)
        h = deq(func, torch.zeros_like(x))[0][-1]
    return h.square().sum()


@pytest.mark.parametrize(
    "config",
    [{}, {"pcdeq_enclosure": True}, {"hook_ift": True, "pcdeq_rate_bound": True}],
    ids=["ift", "enclosure", "hook_ift-certified"],
)
def test_an_f_that_computes_differently_in_backward_is_refused_and_a_bound_one_is_right(config):
    f, _ = dense_instance(scale=2.0, n=6)
    deq = torchdeq.get_deq(core="pcdeq", **TIGHT, **config)
    u = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss = _weight_tied_blocks(deq, f, u.clone().requires_grad_(), bind=False)
    changed = r"f computes differently in backward\(\) .* differs .* by up to 0\.\d+"
    with pytest.raises(InvalidInputError, match=changed):
        loss.backward()

    def bound(u):
        return _weight_tied_blocks(deq, f, u, bind=True)

    assert torch.autograd.gradcheck(bound, (u.clone().requires_grad_(),), atol=1e-7, rtol=1e-5)


def test_hook_ift_keeps_the_forwards_graph_so_a_late_bound_closure_gets_its_own_gradient():
    f, _ = dense_instance(scale=2.0, n=6)
    u = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for bind in (False, True):
        leaf = u.clone().requires_grad_()
        _weight_tied_blocks(torchdeq.get_deq(core="pcdeq", hook_ift=True, **TIGHT), f, leaf, bind).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
def test_batched_backward_and_forward_mode_ad_are_errors_not_raw_tracebacks(gradient, path):
    import torch.autograd.forward_ad as forward_ad

    f, x = dense_instance(scale=2.0)
    deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift")
    u = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)

    def model(u):
        return solve(deq, f, f.inject(u), path=path)[0][-1]

    with pytest.raises(InvalidInputError, match=r"batched backward .* one gradient at a time"):
        torch.autograd.functional.jacobian(model, u, vectorize=True)
    forward_mode = pytest.raises(InvalidInputError, match=r"Forward-mode AD .* Use reverse mode")
    with forward_mode, forward_ad.dual_level(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        model(forward_ad.make_dual(u.detach(), torch.ones_like(u)))
    jacobian = torch.autograd.functional.jacobian(model, u)  # one gradient at a time works
    assert jacobian.shape == (*x.shape, *x.shape) and torch.isfinite(jacobian).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [1e-25, 1e-30, 1e25], ids=["1e-25", "1e-30", "1e25"])
def test_a_loss_gradient_beyond_the_norms_range_gets_the_same_gradient_scaled(scale, path):
    """float32 squares underflow below 1e-19: the adjoint's residual test read 0 / 0 and stopped a
    sample at its first check, with half its gradient missing; beyond 1e19 they overflow."""
    f, x = dense_instance(scale=1.8, n=16, dtype=torch.float32)
    deq = torchdeq.get_deq(core="pcdeq")
    probe = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    grads, steps = [], []
    for factor in (1.0, scale):
        u = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).requires_grad_()
        infos = []
        z = deq(layer_map(f, f.inject(u), path), torch.zeros_like(x), backward_writer=infos.append)[0][-1]
        (factor * probe * z).sum().backward()
        grads.append(u.grad.double() / factor)
        steps.append(infos[0]["nstep"])
        assert bool(infos[0]["converged"].all())
    assert (steps[0] > 4).all(), "the adjoint needs several iterations: a stop at the first check shows"
    torch.testing.assert_close(steps[1], steps[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=0)


def test_hook_ift_on_a_frozen_layer_of_a_constant_input_solves_no_adjoint():
    f, x = dense_instance(scale=2.0)
    f.requires_grad_(False)
    head = torch.nn.Linear(x.shape[1], 2, dtype=x.dtype)
    for gradient in ("ift", "hook_ift"):
        calls = []
        deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift")
        z = deq(lambda z: f(z, x) * 1.0, torch.zeros_like(x), backward_writer=calls.append)[0][-1]
        head(z).sum().backward()
        assert not z.requires_grad and calls == [], gradient
        assert head.weight.grad is not None
        head.zero_grad()


def test_a_deep_copy_of_the_core_applies_its_own_policy_in_backward():
    f, x = dense_instance(scale=2.0, dtype=torch.float32)
    original = torchdeq.get_deq(core="pcdeq", b_max_iter=1)
    clone = copy.deepcopy(original)
    clone.nonconvergence = "raise"
    u = torch.randn(x.shape, requires_grad=True)
    with pytest.raises(ConvergenceError, match="backward solve"):
        solve(clone, f, f.inject(u))[0][-1].sum().backward()
    with pytest.warns(PcDEQWarning, match="backward solve"):
        solve(original, f, f.inject(u))[0][-1].sum().backward()


@pytest.mark.cuda
def test_no_host_sync_per_iteration_on_cuda():
    import warnings

    f, x = dense_instance(activation="relu6", scale=0.97, dtype=torch.float32)
    f, x = f.cuda(), x.cuda()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, info = torchdeq.get_deq(core="pcdeq", f_tol=1e-6, f_max_iter=150).eval()(
                lambda z: f(z, x), torch.zeros_like(x)
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    iterations = int(info["trace_steps"][-1])
    assert iterations > 30
    assert syncs <= info["trace_steps"].numel() + 10 < iterations


@pytest.mark.cuda
@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
def test_training_steps_on_cuda_return_the_device_memory_they_take(gradient):
    """The leak that showed on an H200 as 4 GB per single-conv epoch: allocated memory is flat."""
    f, _ = conv_instance(channels=16, size=28, batch=32, dtype=torch.float32)
    f = f.cuda()
    deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift")
    u = torch.randn(32, 16, 28, 28, device="cuda", requires_grad=True)

    def step():
        x = f.inject(u)
        deq(lambda z: f(z, x), torch.zeros_like(x))[0][-1].sum().backward()
        u.grad = None
        f.zero_grad(set_to_none=True)

    step()  # the first step allocates what every step reuses (workspaces, gradients' buffers)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    state_bytes = u.numel() * u.element_size()
    assert torch.cuda.memory_allocated() - before < state_bytes  # three states per step leaked before


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
def test_the_graph_kept_for_backward_does_not_grow_with_the_iteration_budget(gradient, path):
    f, x = dense_instance(activation="relu6", scale=0.99, dtype=torch.float32)
    x = x * 1e-3  # a slow solve: more than 100 iterations

    def saved_bytes(budget):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        deq = torchdeq.get_deq(
            core="pcdeq", f_max_iter=budget, hook_ift=gradient == "hook_ift", pcdeq_nonconvergence="ignore"
        )
        u = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, info = deq(layer_map(f, u, path), torch.zeros_like(u))
        assert int(info["nstep"].max()) == budget
        return sum(total)

    assert saved_bytes(10) == saved_bytes(100) > 0


# -- the closed-form implicit gradient ------------------------------------------------------------


def _step(deq, f, u, path, probe):
    """One training step's solve and backward; its gradients, statistics and heavy passes."""
    from benchmarks.micro import WorkCounter

    backward_stats = []
    f.zero_grad(set_to_none=True)
    u.grad = None
    with WorkCounter() as counter:
        x = f.inject(u)
        z_out, _ = deq(layer_map(f, x, path), torch.zeros_like(x), backward_writer=backward_stats.append)
        (z_out[-1] * probe).sum().backward()
    grads = [u.grad] + [p.grad for p in f.parameters()]
    return type(z_out[-1].grad_fn).__name__, grads, backward_stats, counter.totals()["passes"]


@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
@pytest.mark.parametrize("make", INSTANCES)
def test_the_closed_form_gradient_equals_the_recorded_one_with_two_passes_fewer(make, gradient):
    """No tracked application of f, and no product with W that the gradient does not use."""
    f, x = make(scale=2.0, nonnegativity="weight_norm")
    deq = torchdeq.get_deq(core="pcdeq", hook_ift=gradient == "hook_ift", **TIGHT)
    u = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u.requires_grad_()
    probe = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    closed = _step(deq, f, u, "closed_form", probe)
    recorded = _step(deq, f, u, "recorded", probe)
    assert closed[0] == "_ClosedFormImplicitGradBackward"
    assert recorded[0] in ("_ImplicitGradBackward", "_ImplicitGradOnGraphBackward")
    for a, b in zip(closed[1], recorded[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    (closed_stats,), (recorded_stats,) = closed[2], recorded[2]
    assert bool(closed_stats["converged"].all())
    assert torch.equal(closed_stats["nstep"], recorded_stats["nstep"])
    assert recorded[3] - closed[3] == 2


class _WithoutVjp(PcDEQLinear):
    operator_vjp = PcDEQLayer.operator_vjp  # a layer class that does not implement it


class _OtherOperator(PcDEQLinear):
    """Changes the operator (W z plus a shift of z, still nonnegative) and inherits the VJP."""

    def apply_operator(self, z, weight):
        return super().apply_operator(z, weight) + 0.3 * z.roll(1, dims=-1)


@pytest.mark.parametrize(
    "case",
    [
        "two layers",
        "a new injection per call",
        "one iteration",
        "autocast",
        "enclosure",
        "no operator vjp",
        "an operator changed in a subclass",
        "an activation without slope",
        "a backward hook on the layer",
    ],
)
def test_the_closed_form_is_used_only_where_it_holds_and_the_gradient_is_right_everywhere(case):
    f, x = dense_instance(scale=2.0)
    replace = {"no operator vjp": _WithoutVjp, "an operator changed in a subclass": _OtherOperator}
    if case in replace:
        weight = f.weight.detach()
        f = replace[case](x.shape[1], nonnegativity="project", dtype=torch.float64)
        set_weight(f, weight)
    if case == "an activation without slope":  # e.g. a user-registered one
        f.activation = dataclasses.replace(f.activation, slope=None)
    if case == "a backward hook on the layer":
        f.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    g, _ = dense_instance(scale=1.0, seed=1)
    u = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    u.requires_grad_()
    config = dict(TIGHT, pcdeq_nonconvergence="ignore")
    config.update(
        {
            "one iteration": dict(f_max_iter=1),
            "enclosure": dict(pcdeq_enclosure=True),
            "autocast": dict(f_tol=5e-2, b_tol=5e-2),
        }.get(case, {})
    )
    deq = torchdeq.get_deq(core="pcdeq", **config)

    def run(path):
        u.grad = None
        x = f.inject(u)
        if case == "two layers":
            func = lambda z: g(f(z, x), x)  # noqa: E731
        elif case == "a new injection per call":
            func = lambda z: f(z, x * 1)  # noqa: E731
        else:
            func = layer_map(f, x, path)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            z_out, _ = deq(func, torch.zeros_like(x))
        z_out[-1].float().sum().backward()
        return type(z_out[-1].grad_fn).__name__, u.grad.clone()

    name, grad = run("closed_form")
    assert name != "_ClosedFormImplicitGradBackward", case
    assert torch.isfinite(grad).all() and (grad != 0).any()
    if case not in ("two layers", "a new injection per call", "one iteration", "autocast"):
        # the same f, recorded by hand
        torch.testing.assert_close(grad, run("recorded")[1], rtol=1e-8, atol=1e-10)


def test_a_layer_chain_stops_at_any_other_call_and_at_any_edit_in_place():
    from torchdeq_pcdeq.layers import record_layer_chain

    f, x = dense_instance(scale=2.0)
    g, _ = dense_instance(scale=2.0, seed=1)

    def run(calls):
        with record_layer_chain() as chain:
            z = torch.zeros_like(x)
            for call in calls:
                z = call(z)
        return chain, z

    plain = lambda z: f(z, x)  # noqa: E731
    chain, z = run([plain] * 3)
    step = chain.last_step(z.detach())
    assert step.layer is f and step.x is x and chain.calls == 3
    assert torch.equal(f(step.z_in, x), z)
    assert chain.last_step(z.clone()) is None, "another tensor, even with the same values"
    assert run([plain])[0].last_step(run([plain])[1]) is None, "one call: f's input is unknown"
    assert run([plain, lambda z: g(z, x), plain])[0].broken
    assert run([plain, lambda z: f(z.clone(), x), plain])[0].broken
    assert run([plain, lambda z: f(z, x.clone()), plain])[0].broken
    chain, z = run([plain] * 3)
    z.add_(0)
    assert chain.last_step(z) is None, "the state was edited in place"
    chain, z = run([plain] * 3)
    x.add_(0)
    assert chain.last_step(z) is None, "the injection was edited in place"


# -- the first iteration from zero ---------------------------------------------------------------


def _count_products(f):
    """Make ``f`` count its products with ``W``; return the counter."""
    calls = {"n": 0}
    apply = f.apply_operator

    def counting(z, weight):
        calls["n"] += 1
        return apply(z, weight)

    f.apply_operator = counting
    return calls


@pytest.mark.parametrize("make", INSTANCES)
@pytest.mark.parametrize("training", [False, True])
def test_a_solve_from_zero_skips_one_product_with_w_and_changes_nothing(make, training):
    results = {}
    for variant in ("skip", "full"):
        f, x = make(scale=2.0)
        x.requires_grad_(training)
        calls = _count_products(f)
        deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-10, f_max_iter=500).train(training)
        z_init = torch.zeros_like(x)
        # a copy of the initial state is not the initial state object: the layer computes W 0
        # in full (the later calls get the layer's own outputs: the same gradient path)
        func = (lambda z: f(z, x)) if variant == "skip" else (lambda z: f(z.clone() if z is z_init else z, x))
        z_out, info = deq(func, z_init)
        # f counting its products is patched on the instance: the gradient records f once more
        tracked = 1 if training else 0
        results[variant] = (z_out[-1], int(info["trace_steps"][-1]) + tracked, calls["n"])
        if training:
            z_out[-1].square().sum().backward()
            results[variant] += ([x.grad, *(p.grad for p in f.parameters())],)
    (z_skip, iterations, products_skip), (z_full, _, products_full) = results["skip"][:3], results["full"][:3]
    assert torch.equal(z_skip, z_full)  # W 0 + x == x exactly
    assert products_full == iterations and products_skip == iterations - 1
    if training:
        for skip, full in zip(results["skip"][3], results["full"][3], strict=True):
            assert torch.equal(skip, full)


def test_a_solve_from_a_nonzero_state_computes_every_product():
    f, x = dense_instance(scale=2.0)
    calls = _count_products(f)
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-10, f_max_iter=500).eval()
    _, info = deq(lambda z: f(z, x), torch.full_like(x, 0.5))
    assert calls["n"] == int(info["trace_steps"][-1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("activation", ["tanh", "relu6"])
@pytest.mark.parametrize("budget", [1, 200])
def test_a_non_finite_weight_is_still_reported_when_the_first_product_is_skipped(bad, activation, budget):
    # Inf * 0 is NaN in the product; tanh(Inf) = 1 would hide an Inf weight from then on.
    f, x = dense_instance(scale=2.0, activation=activation)
    with torch.no_grad():
        f.linear.weight[0, 0] = bad
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=budget, eval_f_max_iter=budget).eval()
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        deq(lambda z: f(z, x), torch.zeros_like(x))


def test_zero_state_keeps_the_gradient_of_a_state_that_requires_grad():
    from torchdeq_pcdeq.layers import zero_state

    f, x = dense_instance()
    grads = []
    for marked in (False, True):
        z = torch.zeros_like(x, requires_grad=True)
        with zero_state(z if marked else None):
            f(z, x).sum().backward()
        grads.append(z.grad)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


def test_a_zero_state_changed_in_place_or_under_inference_mode_is_computed_in_full():
    f, x = dense_instance(scale=2.0)
    calls = _count_products(f)
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-10, f_max_iter=500).eval()

    def shifted(z):  # a (buggy) f that edits the solver's state in place
        return f(z.add_(0.5) if z is z_init else z, x)

    z_init = torch.zeros_like(x)
    z_edit, info = deq(shifted, z_init)
    assert calls["n"] == int(info["trace_steps"][-1])  # no product skipped
    full = torchdeq.get_deq(core="pcdeq", f_tol=1e-10, f_max_iter=500).eval()
    torch.testing.assert_close(z_edit[-1], full(lambda z: f(z, x), torch.full_like(x, 0.5))[0][-1])
    calls["n"] = 0
    with torch.inference_mode():
        _, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    assert calls["n"] == int(info["trace_steps"][-1])


def test_a_zero_state_laid_out_unlike_the_injection_is_computed_in_full():
    f, x = conv_instance(scale=2.0)
    calls = _count_products(f)
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-10, f_max_iter=500).eval()
    z_init = torch.zeros_like(x).contiguous(memory_format=torch.channels_last)
    _, info = deq(lambda z: f(z, x), z_init)
    assert calls["n"] == int(info["trace_steps"][-1])


def test_solves_in_several_threads_keep_their_layer_contexts_apart():
    import threading

    from torchdeq_pcdeq.layers import _CONTEXT

    threads_count = 4
    inside = threading.Barrier(threads_count, timeout=30)
    errors, results = [], {}

    def work(seed):
        try:
            f, x = dense_instance(seed=seed, scale=2.0)
            x = x * (seed + 1)  # each thread its own smallest injection
            deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-10, f_max_iter=500).eval()
            calls = [0]

            def func(z):
                calls[0] += 1
                if calls[0] == 1:
                    inside.wait()  # every thread is inside its solve's contexts at once
                return f(z, x)

            z, info = deq(func, torch.zeros_like(x))
            results[seed] = (z[-1], iterate(f, x, torch.zeros_like(x), 500)[-1], info, x)
            assert not _CONTEXT.zero_states and not _CONTEXT.observers
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for z, reference, info, x in results.values():
        torch.testing.assert_close(z, reference, rtol=0, atol=1e-9)
        # a layer called by another thread's solve would lower this solve's minimum
        assert torch.equal(info["min_injection"], x.amin(dim=1).to(info["min_injection"].dtype))


def test_warnings_point_at_the_users_line_whatever_the_path_in():
    f, x = dense_instance(dtype=torch.float32)

    def located(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert caught and all(w.category is PcDEQWarning for w in caught)
        return {(w.filename, str(w.message)[:30]) for w in caught}

    # through get_deq (TorchDEQ's frames in between) and through the constructor
    assert {name for name, _ in located(lambda: torchdeq.get_deq(core="pcdeq", f_maxiter=3))} == {__file__}
    assert {name for name, _ in located(lambda: PcDEQCore(f_maxiter=3))} == {__file__}
    # through Module.__call__, in the forward; through autograd, in the backward
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=1, b_max_iter=1, b_tol=1e-7)
    u = x.detach().clone().requires_grad_()
    outputs = []
    assert {
        name for name, _ in located(lambda: outputs.append(deq(lambda z: f(z, u), torch.zeros_like(x))))
    } == {__file__}
    assert {name for name, _ in located(lambda: outputs[0][0][-1].sum().backward())} == {__file__}


_BUILT_IN = [("f_max_iter", "f_max_iter"), ("b_max_iter", "b_max_iter"), ("b_tol", "b_tol")]
_BUILT_IN += [("b_stop_mode", "b_stop_mode"), ("b_solver", "b_solver"), ("gradient", "ift")]
_BUILT_IN += [("certify_rate", "pcdeq_rate_bound"), ("indexing", "indexing")]


@pytest.mark.parametrize(("name", "key"), _BUILT_IN)
def test_an_attribute_read_when_the_core_was_built_cannot_be_assigned_to_no_effect(name, key):
    """core.b_tol = 1e-7 used to leave the backward at the old tolerance, and its statistics then
    said converged above the new one; the attributes read at each solve can still be assigned."""
    deq = torchdeq.get_deq(core="pcdeq")
    message = rf"core\.{name} was read when the core was built.*{key}=\.\.\."
    with pytest.raises(InvalidInputError, match=message):
        setattr(deq, name, getattr(deq, name))
    deq.f_tol, deq.eval_f_max_iter = 1e-7, 3
    f, x = dense_instance()
    with pytest.warns(PcDEQWarning, match="did not reach rel tol 1e-07 within 3 iterations"):
        copy.deepcopy(deq).eval()(lambda z: f(z, x), torch.zeros_like(x))


def test_an_eval_mode_core_returns_z_star_without_its_graph_as_torchdeq_does_and_train_mode_differentiates():
    f, x0 = dense_instance()
    u = x0.clone().requires_grad_()
    deq = torchdeq.get_deq(core="pcdeq").eval()
    z, _ = deq(lambda z: f(z, u), torch.zeros_like(u))
    assert not z[0].requires_grad  # (README: a head can train on such frozen features)
    z, _ = deq.train()(lambda z: f(z, u), torch.zeros_like(u))
    assert torch.autograd.grad(z[-1].sum(), u)[0].abs().sum() > 0


@pytest.mark.parametrize("key", ["ift", "hook_ift", "tau", "pcdeq_rate_bound", "pcdeq_guard"])
def test_a_config_key_assigned_to_a_built_core_is_refused_not_kept_as_a_stray_attribute(key):
    """core.ift = False or core.pcdeq_rate_bound = True made a new attribute that nothing read."""
    deq = torchdeq.get_deq(core="pcdeq")
    message = rf"core\.{key} is a config key.*get_deq\(core\.args, {key}=\.\.\.\)"
    with pytest.raises(InvalidInputError, match=message):
        setattr(deq, key, True)
    assert key not in vars(deq)


def _two_scale_model(dtype=torch.float64):
    """Two pcDEQ conv layers at two resolutions, the coarse one fed by the pooled fine state (a
    nonnegative, monotone coupling: the pair is a pcDEQ map), and their raw injections."""
    torch.manual_seed(0)
    fine, coarse = PcDEQConv2d(3, dtype=dtype), PcDEQConv2d(3, dtype=dtype)
    u = (torch.randn(2, 3, 6, 6, dtype=dtype), torch.randn(2, 3, 3, 3, dtype=dtype))

    def make_f():
        x_fine, x_coarse = fine.inject(u[0]), coarse.inject(u[1])

        def f(z_fine, z_coarse):
            return fine(z_fine, x_fine), coarse(
                z_coarse, x_coarse + torch.nn.functional.avg_pool2d(z_fine, 2)
            )

        return f, [torch.zeros_like(x_fine), torch.zeros_like(x_coarse)]

    return [fine, coarse], make_f


@pytest.mark.parametrize("options", [{}, {"hook_ift": True, "pcdeq_rate_bound": True}, {"n_states": 2}])
def test_several_states_are_solved_as_torchdeq_packs_them(options):
    layers, make_f = _two_scale_model()
    params = [p for layer in layers for p in layer.parameters()]

    def solve_and_grad(core, **kw):
        f, z0 = make_f()
        deq = torchdeq.get_deq(core=core, f_tol=1e-12, b_tol=1e-12, f_max_iter=100, b_max_iter=100, **kw)
        z_out, info = deq(f, tuple(z0))
        loss = sum((z**2).sum() for z in z_out[-1])
        return z_out, info, torch.autograd.grad(loss, params)

    ours, info, grads = solve_and_grad("pcdeq", **options)
    n_states = options.get("n_states", 1)
    theirs, _, expected = solve_and_grad(
        "sliced", f_solver="fixed_point_iter", b_solver="fixed_point_iter", ift=True, n_states=n_states
    )
    assert [[tuple(z.shape) for z in states] for states in ours] == [
        [tuple(z.shape) for z in states] for states in theirs
    ]
    assert len(ours) == n_states and info["converged"].tolist() == [True, True]
    for a, b in zip(ours[-1], theirs[-1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    if "pcdeq_rate_bound" in options:
        assert bool((info["rate_bound"] < 1).all())


def test_several_states_in_eval_and_with_the_enclosure():
    _, make_f = _two_scale_model()
    f, z0 = make_f()
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, f_tol=1e-10).eval()
    z_out, info = deq(f, z0, sradius_mode=True)
    ((fine, coarse),) = z_out
    assert fine.shape == z0[0].shape and coarse.shape == z0[1].shape
    residual = max((a - b).abs().max().item() for a, b in zip(f(fine, coarse), (fine, coarse)))
    assert residual < 1e-9 and bool((info["error_bound"] < 1e-9).all())
    assert 0 < float(info["sradius"].max()) < 1


def test_several_states_errors_name_the_mismatch():
    _, make_f = _two_scale_model()
    f, z0 = make_f()
    deq = torchdeq.get_deq(core="pcdeq")
    with pytest.raises(InvalidInputError, match=r"return as many.*got torch.float64 of shape \(2, 3, 6, 6\)"):
        deq(lambda a, b: f(a, b)[0], z0)
    with pytest.raises(
        InvalidInputError, match=r"dtype torch.float64, got tuple of \[.*torch.float32 of shape"
    ):
        deq(lambda a, b: (a, b.float()), z0)
    with pytest.raises(
        InvalidInputError, match=r"share their batch size.*\[\(2, torch.float64, 'cpu'\), \(1,"
    ):
        deq(f, [z0[0], z0[1][:1]])
    with pytest.raises(InvalidInputError, match=r"got list of \[\]"):
        deq(f, [])


def test_unknown_call_keywords_are_reported_not_dropped():
    f, x = dense_instance()
    deq = torchdeq.get_deq(core="pcdeq")
    with pytest.warns(
        PcDEQWarning,
        match=r"ignores the keyword arguments \['writer'\].* Did you mean 'backward_writer'\?$",
    ):
        deq(lambda z: f(z, x), torch.zeros_like(x), writer=print)
    with pytest.warns(PcDEQWarning, match=r"\['sradius'\].*Did you mean 'sradius_mode'\?"):
        deq(lambda z: f(z, x), torch.zeros_like(x), sradius=True)


def test_sradius_mode_under_inference_mode_in_training_is_ignored_as_torchdeq_does():
    f, x = dense_instance()
    deq = torchdeq.get_deq(core="pcdeq")  # training mode: TorchDEQ computes sradius in eval only
    with torch.inference_mode():
        _, info = deq(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
    assert bool(info["converged"].all())
    with (
        torch.inference_mode(),
        pytest.raises(InvalidInputError, match=r"cannot run under torch\.inference_mode"),
    ):
        deq.eval()(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)

"""The bad-input matrix of README's "Errors and guarantees" section, run against README itself.

Each case below builds a small situation, performs one wrong action and names the README row
that documents it. The test checks that the action raises (or warns) exactly what README says,
word for word, and that nothing was corrupted on the way: the parameters of every module
involved and TorchDEQ's and this package's registries are unchanged after the error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchdeq

import torchdeq_pcdeq
import torchdeq_pcdeq.__main__ as runner
from conftest import dense_instance, forget_warnings
from torchdeq_pcdeq import PcDEQConv2d, PcDEQLinear, pcdeq_fixed_point
from torchdeq_pcdeq import activations as activation_registry

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Errors and guarantees"


def documented_rows() -> dict[str, tuple[str, str]]:
    """``{case: (raised, message)}`` from the table of README's "Errors and guarantees"."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    lines = text.split(SECTION, 1)[1].splitlines()
    start = lines.index("| case | raised | message |") + 2  # after the header and its rule
    rows = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break  # the end of the table
        case, raised, message = (c.strip() for c in line.strip().strip("|").split(" | "))
        rows[case] = (raised.strip("`"), message.strip("`"))
    return rows


# -- the cases ------------------------------------------------------------------------------------
# Each returns (action, modules whose parameters must survive the error).


def _deq():
    return torchdeq.get_deq(core="pcdeq")


def nan_or_inf_injection():
    f = PcDEQLinear(4)
    u = torch.zeros(2, 4)
    u[0, 0], u[1, 1] = float("nan"), float("inf")
    return lambda: _deq()(lambda z: f(z, f.inject(u)), torch.zeros(2, 4)), [f]


def nan_or_inf_initial_state():
    f = PcDEQLinear(4)
    x = f.inject(torch.zeros(2, 4))
    z0 = torch.zeros(2, 4)
    z0[0, 0] = float("inf")
    return lambda: _deq()(lambda z: f(z, x), z0), [f]


def empty_batch():
    f = PcDEQLinear(4)
    x = f.inject(torch.zeros(0, 4))
    return lambda: _deq()(lambda z: f(z, x), torch.zeros_like(x)), [f]


def negative_injection():
    f = PcDEQLinear(4, "tanh")
    return lambda: _deq()(lambda z: f(z, -torch.ones(2, 4)), torch.zeros(2, 4)), [f]


def negative_initial_state():
    f = PcDEQLinear(4)
    x = f.inject(torch.zeros(2, 4))
    return lambda: _deq()(lambda z: f(z, x), -torch.ones(2, 4)), [f]


def one_dimensional_state():
    f = PcDEQLinear(4)
    return lambda: _deq()(lambda z: f(z, torch.ones(4)), torch.zeros(4)), [f]


def batch_dimension_not_first():
    f = PcDEQConv2d(8)
    channels_first = torch.zeros(8, 2, 5, 5)  # (channels, batch, height, width) by mistake
    return lambda: f.inject(channels_first), [f]


def dtype_mismatch():
    f = PcDEQLinear(4)  # float32 weights
    x = torch.ones(2, 4, dtype=torch.float64)
    return lambda: _deq()(lambda z: f(z, x), torch.zeros(2, 4, dtype=torch.float64)), [f]


def device_mismatch():
    f = PcDEQLinear(4)  # weights on the CPU; "meta" stands in for any other device
    x = torch.ones(2, 4, device="meta")
    return lambda: f(torch.zeros(2, 4, device="meta"), x), [f]


def conv_channels_mismatch():
    f = PcDEQConv2d(8)
    x = torch.ones(2, 3, 5, 5)
    return lambda: _deq()(lambda z: f(z, x), torch.zeros(2, 3, 5, 5)), [f]


def max_iter_not_positive():
    return lambda: torchdeq.get_deq(core="pcdeq", f_max_iter=0), []


def solver_max_iter_not_positive():
    f, x = dense_instance(dtype=torch.float32)
    return lambda: pcdeq_fixed_point(lambda z: f(z, x), torch.zeros_like(x), max_iter=0), [f]


def tolerance_not_positive():
    return lambda: torchdeq.get_deq(core="pcdeq", f_tol=0.0), []


def config_value_of_the_wrong_type():
    return lambda: torchdeq.get_deq(core="pcdeq", eval_factor="2"), []


def per_call_budget_too_small_for_the_states():
    f, x = dense_instance(dtype=torch.float32)
    deq = torchdeq.get_deq(core="pcdeq", n_states=3)
    return lambda: deq(lambda z: f(z, x), torch.zeros_like(x), solver_kwargs={"f_max_iter": 2}), [f]


def unknown_activation():
    return lambda: PcDEQLinear(4, "tahn"), []


def unknown_core_option():
    return lambda: torchdeq.get_deq(core="pcdeq", pcdeq_gaurd="warn"), []


def invalid_core_option_value():
    return lambda: torchdeq.get_deq(core="pcdeq", pcdeq_guard="loud"), []


def unknown_nonnegativity_mode():
    return lambda: PcDEQLinear(4, nonnegativity="clamp"), []


def unknown_norm_in_core_config():
    return lambda: torchdeq.get_deq(core="pcdeq", norm_type="pcdeq_nonnegg"), []


# The start of a TorchDEQ argparse script: it never imports torchdeq_pcdeq.
SCRIPT_HEAD = (
    "import argparse, torch, torchdeq\n"
    "parser = argparse.ArgumentParser()\n"
    "torchdeq.utils.add_deq_args(parser)\n"
    "args = parser.parse_args()\n"
)


def _through_the_runner(tmp_path, monkeypatch, statement: str, flags: list[str]):
    """A TorchDEQ script ending in ``statement``, run by ``python -m torchdeq_pcdeq`` with ``flags``."""
    # The runner sets sys.argv, sys.path and PYTHONPATH for the script it runs: undo afterwards.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT_HEAD + statement + "\n")
    return lambda: runner.main([str(script), *flags]), []


def unknown_norm_through_the_runner(tmp_path, monkeypatch):
    statement = "torchdeq.apply_norm(torch.nn.Linear(3, 3), args=args)"
    return _through_the_runner(tmp_path, monkeypatch, statement, ["--norm_type", "pcdeq_nonnegg"])


def unknown_core_through_the_runner(tmp_path, monkeypatch):
    return _through_the_runner(tmp_path, monkeypatch, "torchdeq.get_deq(args)", ["--core", "pcdq"])


def not_positive_monotone():
    f = PcDEQLinear(4)
    x = f.inject(torch.zeros(2, 4))
    # -W z: a user f with a sign error, so the map is not monotone.
    return lambda: _deq()(lambda z: torch.tanh(-f.apply_operator(z, f.weight) + x), torch.zeros(2, 4)), [f]


def enclosure_upper_below_the_fixed_point():
    f = PcDEQLinear(4)
    x = f.inject(torch.ones(2, 4))
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, pcdeq_enclosure_upper=0.1, pcdeq_guard="off")
    return lambda: deq(lambda z: f(z, x), torch.zeros(2, 4)), [f]


def weight_made_negative_by_hand_in_project_mode():
    f = PcDEQLinear(4, nonnegativity="project")
    with torch.no_grad():
        f.linear.weight[0, 0] = -0.5
    x = f.inject(torch.zeros(2, 4))
    return lambda: _deq()(lambda z: f(z, x), torch.zeros(2, 4)), [f]


def solve_not_converged():
    f, x = dense_instance(dtype=torch.float32, scale=1.8)
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=2, pcdeq_nonconvergence="raise")
    return lambda: deq(lambda z: f(z, x), torch.zeros_like(x)), [f]


def adjoint_diverged():
    # the forward stops at iteration 2 while two entries at the injection floor still grow 5.4x
    # per iteration (test_core.test_a_diverging_adjoint_is_reported_and_gets_the_one_step_gradient)
    f = PcDEQLinear(1, "relu6", nonnegativity="project")
    with torch.no_grad():
        f.operator.weight.fill_(5.432)
    x = f.inject(torch.tensor([[[-20.0], [-21.0], [12.6]]]))
    deq = torchdeq.get_deq(core="pcdeq", b_max_iter=400, pcdeq_nonconvergence="raise")
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
    return lambda: z_out[-1].sum().backward(), [f]


def nan_loss_gradient():
    f, x = dense_instance(dtype=torch.float32)
    z_out, _ = _deq()(lambda z: f(z, x), torch.zeros_like(x))
    return lambda: (z_out[-1] * float("nan")).sum().backward(), [f]


def second_order_gradient():
    f, x = dense_instance(dtype=torch.float32)
    u = torch.randn(x.shape, requires_grad=True)
    z = _deq()(lambda z: f(z, f.inject(u)), torch.zeros_like(x))[0][-1]
    return lambda: torch.autograd.grad(z.square().sum(), u, create_graph=True), [f]


def torch_func_transform():
    from torch.func import vmap

    f, x = dense_instance(dtype=torch.float32)
    deq = _deq()
    return lambda: vmap(lambda x: deq(lambda z: f(z, x), torch.zeros_like(x))[0][-1])(x.unsqueeze(1)), [f]


def f_changed_before_backward():
    f, x = dense_instance(dtype=torch.float32)
    h, deq = torch.randn(x.shape, requires_grad=True), _deq()
    for _ in range(2):  # weight-tied blocks; the closure reads x when backward() calls f again
        x = f.inject(h)
        h = deq(lambda z: f(z, x) * 1.0, torch.zeros_like(x))[0][-1]
    return lambda: h.sum().backward(), [f]


def batched_backward():
    f, x = dense_instance(dtype=torch.float32)
    u = torch.randn(x.shape, requires_grad=True)
    z = _deq()(lambda z: f(z, f.inject(u)), torch.zeros_like(x))[0][-1]
    ones = torch.ones(3, *z.shape)
    return lambda: torch.autograd.grad(z, u, ones, is_grads_batched=True), [f]


def forward_mode_ad_in_training():
    import torch.autograd.forward_ad as forward_ad

    f, x = dense_instance(dtype=torch.float32)
    deq = _deq()

    def action():
        with forward_ad.dual_level(), warnings.catch_warnings():
            # (torch's forward-mode rules script a function on first use, which it deprecates)
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            dual = forward_ad.make_dual(x, torch.ones_like(x))
            deq(lambda z: f(z, dual), torch.zeros_like(x))

    return action, [f]


def ift_that_is_not_a_bool():
    return lambda: torchdeq.get_deq(core="pcdeq", ift="False"), []


def tolerance_below_dtype_resolution(monkeypatch):
    forget_warnings(monkeypatch)  # warned once per process
    f, x = dense_instance(dtype=torch.float32)
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-9)
    return lambda: deq(lambda z: f(z, x), torch.zeros_like(x)), [f]


CASES = {
    "NaN or Inf in the injection": nan_or_inf_injection,
    "NaN or Inf in `z_init`": nan_or_inf_initial_state,
    "empty batch": empty_batch,
    "negative injection, pcDEQ-1 activation": negative_injection,
    "negative `z_init`": negative_initial_state,
    "1-D state": one_dimensional_state,
    "batch dimension not first": batch_dimension_not_first,
    "dtype mismatch": dtype_mismatch,
    "device mismatch": device_mismatch,
    "conv channels mismatch": conv_channels_mismatch,
    "`f_max_iter` <= 0": max_iter_not_positive,
    "solver `max_iter` <= 0": solver_max_iter_not_positive,
    "tolerance <= 0": tolerance_not_positive,
    "config value of the wrong type": config_value_of_the_wrong_type,
    "per-call `f_max_iter` below `n_states`": per_call_budget_too_small_for_the_states,
    "unknown activation": unknown_activation,
    "unknown core option": unknown_core_option,
    "invalid core option value": invalid_core_option_value,
    "unknown nonnegativity mode": unknown_nonnegativity_mode,
    "unknown norm name (core config)": unknown_norm_in_core_config,
    "unknown norm name (runner)": unknown_norm_through_the_runner,
    "unknown core name (runner)": unknown_core_through_the_runner,
    "`f` not positive-monotone": not_positive_monotone,
    "weight made negative by hand, `project` mode": weight_made_negative_by_hand_in_project_mode,
    "`pcdeq_enclosure_upper` below the fixed point (guard on or off)": enclosure_upper_below_the_fixed_point,
    "solve not converged, `pcdeq_nonconvergence='raise'`": solve_not_converged,
    "adjoint diverged, `pcdeq_nonconvergence='raise'`": adjoint_diverged,
    "loss gradient holds NaN (but under float16 autocast, see below)": nan_loss_gradient,
    "second-order gradient (`create_graph=True`)": second_order_gradient,
    "tolerance below the dtype's resolution": tolerance_below_dtype_resolution,
    "`torch.func` transform over the core (`vmap`, `grad`, ...)": torch_func_transform,
    "`ift` or `hook_ift` that is not True or False": ift_that_is_not_a_bool,
    "`f` computes differently in `backward()` (a closure over a rebound variable)": f_changed_before_backward,
    "batched backward (`is_grads_batched=True`, `jacobian(..., vectorize=True)`)": batched_backward,
    "forward-mode AD through a training-mode core": forward_mode_ad_in_training,
}


def _build(case: str, request):
    builder = CASES[case]
    names = builder.__code__.co_varnames[: builder.__code__.co_argcount]
    torch.manual_seed(0)  # the layers' random initialisation shows in some messages
    return builder(*(request.getfixturevalue(name) for name in names))


def _registries() -> dict:
    return {
        "core": dict(torchdeq.core._core),
        "solver": dict(torchdeq.solver._solvers),
        "norm": dict(torchdeq.norm.base_norm._norm_class),
        "activation": torchdeq_pcdeq.available_activations(),
    }


def _parameters(modules) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def test_every_case_is_documented_and_every_documented_case_is_tested():
    assert set(documented_rows()) == set(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_the_error_is_exactly_the_documented_one_and_leaves_no_state_corrupted(case, request):
    raised, message = documented_rows()[case]
    action, modules = _build(case, request)
    registries, parameters = _registries(), _parameters(modules)

    if raised.endswith("Warning"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            action()
        relevant = [w for w in caught if type(w.message).__name__ == raised]
        assert [str(w.message) for w in relevant] == [message]
    else:
        with pytest.raises(Exception) as error:  # the type is checked by name below
            action()
        assert type(error.value).__name__ == raised
        assert str(error.value) == message

    assert _registries() == registries
    after = _parameters(modules)
    for before_state, after_state in zip(parameters, after):
        assert before_state.keys() == after_state.keys()
        for key in before_state:
            assert torch.equal(before_state[key], after_state[key]), key


def test_the_unknown_names_in_messages_list_every_valid_one():
    rows = documented_rows()
    for case, valid in [
        ("unknown activation", activation_registry.available_activations()),
        ("unknown nonnegativity mode", torchdeq_pcdeq.NONNEGATIVITY_MODES),
        ("unknown norm name (runner)", torchdeq_pcdeq.plugin.norm_names()),
        ("unknown core name (runner)", torchdeq_pcdeq.plugin.core_names()),
        ("unknown core option", torchdeq_pcdeq.config.PCDEQ_OPTIONS),
    ]:
        assert all(repr(name) in rows[case][1] for name in valid), case


def test_core_pcdeq_without_the_plugin_fails_with_the_message_readme_explains(tmp_path):
    """TorchDEQ's own message when the plugin is not imported; README says what to do."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT_HEAD + "print(type(torchdeq.get_deq(args)).__name__)\n")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    without_plugin = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if "_autoload" not in p)}
    plain = subprocess.run(
        [sys.executable, str(script), "--core", "pcdeq"],
        capture_output=True,
        text=True,
        timeout=120,
        env=without_plugin,
    )
    assert plain.returncode != 0
    assert plain.stderr.strip().splitlines()[-1] == "AssertionError: Not registered DEQ class!"
    readme = README.read_text().split(SECTION, 1)[1]
    assert "AssertionError: Not registered DEQ class!" in readme
    assert "python -m torchdeq_pcdeq train.py" in readme

    through_runner = subprocess.run(
        [sys.executable, "-m", "torchdeq_pcdeq", str(script), "--core", "pcdeq"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert through_runner.returncode == 0, through_runner.stderr
    assert through_runner.stdout.strip() == "PcDEQCore"


def test_readme_messages_are_not_reformatted_by_the_table():
    """A pipe inside a message would split the README's table row."""
    for case, (_, message) in documented_rows().items():
        assert not re.search(r"\s\|\s", message), case

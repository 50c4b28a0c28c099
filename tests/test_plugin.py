import argparse
import inspect
import os
import subprocess
import sys

import pytest
import torch
import torchdeq
import torchdeq.core
import torchdeq.norm.base_norm
import torchdeq.solver
from torch import nn
from torch.nn.utils import parametrize

import torchdeq_pcdeq
from torchdeq_pcdeq import (
    InvalidInputError,
    PcDEQCore,
    PcDEQNonnegNorm,
    PcDEQWarning,
    UnknownNameError,
    pcdeq_fixed_point,
    reference_init_,
)


def test_import_registers_core_solver_and_norm():
    assert torchdeq.core._core["pcdeq"] is PcDEQCore
    assert torchdeq.get_solver("pcdeq_fixed_point") is pcdeq_fixed_point
    assert torchdeq.norm.base_norm._norm_class["pcdeq_nonneg"] is PcDEQNonnegNorm
    assert isinstance(torchdeq.get_deq(core="pcdeq"), PcDEQCore)
    # the built-ins are untouched
    assert torchdeq.core._core["sliced"].__module__ == "torchdeq.core"
    assert torchdeq.get_solver("anderson").__module__.startswith("torchdeq.")


def test_register_is_idempotent():
    assert set(torchdeq_pcdeq.register().values()) == {"present"}
    assert set(torchdeq_pcdeq.register().values()) == {"present"}


def test_register_never_overwrites_a_foreign_object_and_warns(monkeypatch):
    def other_solver(*args, **kwargs):
        raise AssertionError("not ours")

    monkeypatch.setitem(torchdeq.solver._solvers, "pcdeq_fixed_point", other_solver)
    with pytest.warns(PcDEQWarning, match=r"solver registry already holds 'pcdeq_fixed_point'.*other_solver"):
        status = torchdeq_pcdeq.register()
    assert status["solver:pcdeq_fixed_point"] == "skipped"
    assert torchdeq.solver._solvers["pcdeq_fixed_point"] is other_solver


def test_register_fills_a_missing_key(monkeypatch):
    monkeypatch.delitem(torchdeq.core._core, "pcdeq")
    assert torchdeq_pcdeq.register()["core:pcdeq"] == "registered"
    assert torchdeq.core._core["pcdeq"] is PcDEQCore


def test_apply_norm_pcdeq_nonneg_on_linear_and_conv():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 3), nn.Conv1d(2, 2, 3), nn.ReLU())
    for m in model[:3]:
        reference_init_(m.weight)
    torchdeq.apply_norm(model, norm_type="pcdeq_nonneg")
    for m in model[:3]:
        assert parametrize.is_parametrized(m, "weight") and (m.weight >= 0).all()
        assert isinstance(m._deq_norm, PcDEQNonnegNorm)
    torchdeq.reset_norm(model)  # a no-op for this norm, but part of the contract


def test_apply_norm_pcdeq_nonneg_constrains_transposed_convolutions_as_torchdeqs_weight_norm_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.ConvTranspose1d(2, 5, 3, groups=1))
    before = [m.weight.detach().abs().clone() for m in model]
    with pytest.warns(PcDEQWarning, match="negative"):  # (a signed start: the magnitudes are kept)
        torchdeq.apply_norm(model, norm_type="pcdeq_nonneg")
    for m, magnitudes in zip(model, before):
        assert parametrize.is_parametrized(m, "weight") and isinstance(m._deq_norm, PcDEQNonnegNorm)
        torch.testing.assert_close(m.weight, magnitudes)
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
    model[0](torch.rand(2, 3, 5, 5)).sum().neg().backward()  # pushes every entry down, hard
    optimizer.step()
    assert all(bool((m.weight >= 0).all()) for m in model)


@pytest.mark.parametrize("norm_type", ["weight_norm", "spectral_norm", "pcdeq_nonneg"])
@pytest.mark.parametrize("nonnegativity", ["project", "weight_norm", "parametrize"])
def test_a_stock_scripts_apply_norm_leaves_the_pcdeq_layers_mechanism_alone(norm_type, nonnegativity):
    """TorchDEQ's apply_norm matches exact types: a project-mode layer's plain nn.Linear was
    given an unconstrained weight norm (and attach_projection then blamed the optimizer)."""
    torch.manual_seed(0)
    f = torchdeq_pcdeq.PcDEQLinear(6, nonnegativity=nonnegativity)
    conv = torchdeq_pcdeq.PcDEQConv2d(3, nonnegativity=nonnegativity)
    plain = nn.Linear(6, 6)
    reference_init_(plain.weight)  # (pcdeq_nonneg warns of a negative start)
    model = nn.ModuleDict({"f": f, "conv": conv, "plain": plain})
    before = sorted(name for name, _ in model.named_parameters())
    torchdeq.apply_norm(model, norm_type=norm_type)
    assert hasattr(model["plain"], "_deq_norm")  # the norm did run on the plain layer
    assert not hasattr(f.operator, "_deq_norm") and not hasattr(conv.operator, "_deq_norm")
    layers = [f, conv]
    pcdeq_names = [name for name in before if not name.startswith("plain")]
    assert [
        n for n in sorted(name for name, _ in model.named_parameters()) if n in pcdeq_names
    ] == pcdeq_names
    opt = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=10.0)
    if nonnegativity == "project":
        torchdeq_pcdeq.attach_projection(opt, nn.ModuleList(layers))
    for _ in range(3):  # steps large enough to push unconstrained entries below 0
        loss = sum(
            -layer(torch.rand(2, *shape), layer.inject(torch.randn(2, *shape))).sum()
            for layer, shape in ((f, (6,)), (conv, (3, 4, 4)))
        )
        opt.zero_grad()
        (-loss).backward()
        opt.step()
        assert all(bool((layer.weight >= 0).all()) for layer in layers)


def test_a_layer_pickled_with_a_plain_operator_gets_its_own_type_back_and_the_norm_refuses_it():
    import io

    f = torchdeq_pcdeq.PcDEQLinear(4, nonnegativity="project")
    f.linear.__class__ = nn.Linear  # as pickled before the operators had types of their own
    buffer = io.BytesIO()
    torch.save(f, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.linear) is torchdeq_pcdeq.layers.LinearOperator
    torchdeq.apply_norm(loaded, norm_type="weight_norm")
    assert [name for name, _ in loaded.named_parameters()] == ["linear.weight"]
    with pytest.raises(
        torchdeq_pcdeq.InvalidInputError, match=r"got LinearOperator\. A pcDEQ layer's operator"
    ):
        PcDEQNonnegNorm.apply(loaded.linear)


def test_args_norm_type_selects_pcdeq_nonneg():
    f = nn.Linear(3, 3)
    reference_init_(f.weight)
    torchdeq.apply_norm(f, args={"norm_type": "pcdeq_nonneg"})
    assert parametrize.is_parametrized(f, "weight")


def run_module(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "torchdeq_pcdeq", *args], capture_output=True, text=True, timeout=timeout
    )


def test_runner_usage_and_missing_script():
    result = run_module()
    assert result.returncode == 2 and "usage: python -m torchdeq_pcdeq SCRIPT" in result.stderr
    result = run_module("no_such_script.py")
    assert result.returncode == 2 and "no such script: 'no_such_script.py'" in result.stderr
    assert run_module("--help").returncode == 0


def test_runner_passes_arguments_and_registers_before_the_script_runs(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torchdeq.core\nprint(__name__, sys.argv[1:], 'pcdeq' in torchdeq.core._core)\n"
    )
    result = run_module(str(script), "--core", "pcdeq", "-x")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "__main__ ['--core', 'pcdeq', '-x'] True"
    result = run_module("-m", "json.tool", "--help")
    assert result.returncode == 0 and "json.tool" in result.stdout


def test_runner_takes_the_cores_options_and_hands_the_script_its_own_arguments(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import argparse, sys, torchdeq\n"
        "from torchdeq_pcdeq import add_pcdeq_args\n"
        "print(sys.argv[1:])\n"
        "core = torchdeq.get_deq(core='pcdeq')\n"
        "print(core.guard, core.enclosure, core.check_every)\n"
        "kept = torchdeq.get_deq(core='pcdeq', pcdeq_guard='raise')\n"  # the call's own value stays
        "print(kept.guard)\n"
        "parser = add_pcdeq_args(argparse.ArgumentParser())\n"  # its flags left at their defaults
        "torchdeq.utils.add_deq_args(parser)\n"
        "print(torchdeq.get_deq(parser.parse_args(['--core', 'pcdeq'])).guard)\n"
    )
    flags = ["--pcdeq_guard", "warn", "--lr", "3", "--pcdeq_enclosure", "--pcdeq_check_every=2"]
    result = run_module(str(script), *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["['--lr', '3']", "warn True 2", "raise", "warn"]


def test_runner_says_when_its_options_go_to_a_core_or_norm_that_the_script_does_not_build(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("print('ran')\n")
    args = ["--core", "sliced", "--pcdeq_enclosure", "--norm_type=weight_norm", "--pcdeq_nonneg_init"]
    result = run_module(str(script), *args, "reference", "--pcdeq_guard", "warn")
    assert result.returncode == 0 and result.stdout.strip() == "ran"
    assert (
        "PcDEQWarning: --pcdeq_enclosure, --pcdeq_guard configure the pcdeq core, and --core sliced "
        "asks for another: the option has no effect on it. Pass --core pcdeq"
    ) in result.stderr
    assert "--pcdeq_nonneg_init configures the pcdeq_nonneg norm type, and --norm_type weight_norm" in (
        result.stderr
    )
    result = run_module(str(script), "--co", "sliced", "--pcdeq_guard", "warn")  # argparse's prefix
    assert "--pcdeq_guard configures the pcdeq core, and --core sliced asks for another" in result.stderr
    result = run_module(str(script), "--core", "pcdeq", "--pcdeq_enclosure", "--norm_type", "pcdeq_nonneg")
    assert result.returncode == 0 and "PcDEQWarning" not in result.stderr


def test_runner_refuses_an_unknown_or_invalid_pcdeq_option_before_the_script_runs(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("print('ran')\n")
    result = run_module(str(script), "--pcdeq_gaurd", "warn")
    assert result.returncode == 2 and "ran" not in result.stdout
    assert "Unknown pcdeq option 'pcdeq_gaurd'" in result.stderr and "pcdeq_guard" in result.stderr
    assert "--pcdeq_conv_algorithm configure layers: the runner passes them on to the script" in result.stderr
    result = run_module(str(script), "--pcdeq_guard", "loud")
    assert result.returncode == 2 and "'loud'" in result.stderr and "'warn'" in result.stderr
    result = run_module(str(script), "--pcdeq_check_every")
    assert result.returncode == 2 and "expects a value" in result.stderr
    # a layer option is the script's (add_pcdeq_args): it stays among the script's arguments
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    result = run_module(str(script), "--pcdeq_nonnegativity", "project")
    assert result.returncode == 0 and result.stdout.strip() == "['--pcdeq_nonnegativity', 'project']"


def test_runner_registers_the_plugin_in_spawned_worker_processes(tmp_path):
    script = tmp_path / "spawner.py"
    script.write_text(
        "import multiprocessing as mp, sys\n"
        "def work(queue):\n"
        "    import torchdeq\n"
        "    queue.put(type(torchdeq.get_deq(core='pcdeq')).__name__)\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    queue = ctx.Queue()\n"
        "    worker = ctx.Process(target=work, args=(queue,))\n"
        "    worker.start()\n"
        "    print(queue.get(timeout=120))\n"
        "    worker.join()\n"
    )
    result = run_module(str(script), timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PcDEQCore"


@pytest.mark.parametrize("user_sitecustomize", [False, True])
def test_runner_children_start_cleanly_and_run_the_shadowed_sitecustomize(tmp_path, user_sitecustomize):
    env = dict(os.environ)
    if user_sitecustomize:  # the user's own sitecustomize must still run, after the runner's
        user = tmp_path / "user_site"
        user.mkdir()
        (user / "sitecustomize.py").write_text("print('user sitecustomize ran')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(user), env.get("PYTHONPATH")]))
    script = tmp_path / "child.py"
    script.write_text(
        "import subprocess, sys\n"
        "code = 'import torchdeq.core; print(\"pcdeq\" in torchdeq.core._core)'\n"
        "child = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)\n"
        "print(child.stdout.strip().replace(chr(10), ' '), '|', child.stderr.strip())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "torchdeq_pcdeq", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    expected = "user sitecustomize ran True |" if user_sitecustomize else "True |"
    assert result.stdout.strip().splitlines()[-1] == expected


def test_without_the_plugin_torchdeq_cannot_find_the_core():
    code = "import torchdeq; torchdeq.get_deq(core='pcdeq')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Not registered DEQ class!" in result.stderr


def test_package_exports_are_explicit():
    for name in torchdeq_pcdeq.__all__:
        assert hasattr(torchdeq_pcdeq, name), name
    assert torchdeq_pcdeq.__version__ == "0.1.0"


def test_every_public_function_and_class_shows_its_use_in_a_doctest():
    # (the error types are documented by the README's table of errors instead)
    shown = [
        name
        for name in torchdeq_pcdeq.__all__
        if callable(obj := getattr(torchdeq_pcdeq, name))
        and not (isinstance(obj, type) and issubclass(obj, (Exception, Warning)))
    ]
    missing = [name for name in shown if ">>>" not in (inspect.getdoc(getattr(torchdeq_pcdeq, name)) or "")]
    assert len(shown) >= 20 and missing == []


def test_registry_errors_name_the_flag_only_when_the_flag_is_the_bad_name():
    from torchdeq_pcdeq.plugin import explain_registry_error

    bare = AssertionError("Not registered DEQ class!")
    named = explain_registry_error(bare, ["--core", "pcdq"])
    assert str(named).startswith("Unknown core 'pcdq'. Valid:") and "Did you mean 'pcdeq'?" in str(named)
    # --core pcdeq is valid: the bad name came from code or a config file, which argv cannot tell
    unnamed = explain_registry_error(bare, ["--core", "pcdeq"])
    assert str(unnamed).startswith("Unknown core. Valid:") and "Did you mean" not in str(unnamed)
    norm = explain_registry_error(AssertionError("Not registered norm type!"), ["--norm_type=pcdeq"])
    assert str(norm).startswith("Unknown norm_type 'pcdeq'.") and "'pcdeq_nonneg'" in str(norm)
    assert explain_registry_error(AssertionError("something else"), []) is None


def test_a_warning_raised_by_an_import_points_at_the_import_line(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import warnings, torchdeq.solver\n"
        "torchdeq.solver._solvers['pcdeq_fixed_point'] = lambda *a, **k: None  # another one first\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torchdeq_pcdeq  # line 5\n"
        "print(sorted({(w.filename.split('/')[-1], w.lineno) for w in caught}))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('probe.py', 5)]"


def test_a_warning_in_a_script_run_as_a_module_is_shown_not_an_import_error(tmp_path):
    """``python -m pkg.module`` names its module __main__, which its loader cannot serve the source of."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "run.py").write_text(
        "import torch\n"
        "from torchdeq_pcdeq import pcdeq_fixed_point\n"
        "pcdeq_fixed_point(lambda z: z / 2 + 1, torch.zeros(2, 3), tol=1e-12)  # below the floor\n"
        "print('ran')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "pkg.run"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran"
    assert f"{package / 'run.py'}:3: PcDEQWarning: tol=1e-12" in result.stderr


def test_the_runner_leaves_what_follows_the_separator_and_refuses_a_switch_word_apart():
    """Found by review: `--pcdeq_enclosure false` turned the option on and handed 'false' to the
    script; flags after `--` (the script's, as argparse reads them) were taken by the runner."""
    from torchdeq_pcdeq.config import parse_runner_options

    assert parse_runner_options(["--pcdeq_enclosure", "--", "--pcdeq_guard", "warn"]) == (
        {"pcdeq_enclosure": True},
        ["--", "--pcdeq_guard", "warn"],
    )
    assert parse_runner_options(["--pcdeq_enclosure=false", "false"]) == (
        {"pcdeq_enclosure": False},
        ["false"],
    )
    for word in ("false", "True"):
        with pytest.raises(InvalidInputError, match=rf"is a switch.*--pcdeq_enclosure={word}, not"):
            parse_runner_options(["--lr", "1", "--pcdeq_enclosure", word])


def test_runner_options_fill_only_what_the_config_leaves_unset(monkeypatch):
    from torchdeq_pcdeq.config import RUNNER_OPTIONS_ENV, resolve_core_config

    monkeypatch.setenv(RUNNER_OPTIONS_ENV, '{"pcdeq_guard": "off", "pcdeq_rate_bound": true}')
    assert resolve_core_config({}, {})["pcdeq_guard"] == "off"
    assert resolve_core_config({}, {})["pcdeq_rate_bound"] is True
    assert resolve_core_config({"pcdeq_guard": "raise"}, {})["pcdeq_guard"] == "raise"  # set in the dict
    assert resolve_core_config({}, {"pcdeq_guard": "warn"})["pcdeq_guard"] == "warn"  # set in the call
    monkeypatch.setenv(RUNNER_OPTIONS_ENV, '{"pcdeq_guard": "loud"}')  # validated like any value
    with pytest.raises(UnknownNameError, match="'loud'"):
        resolve_core_config({}, {})


def test_pcdeq_nonneg_can_start_each_weight_from_the_reference_init(monkeypatch, recwarn):
    from torchdeq_pcdeq.config import RUNNER_OPTIONS_ENV

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Conv2d(3, 8, 3, bias=False))
    torchdeq.apply_norm(f, args={"norm_type": "pcdeq_nonneg", "pcdeq_nonneg_init": "reference"})
    for module, fan in ((f[0], 64 + 64), (f[1], 8 + 3)):  # the reference scale: 1e-2 / sqrt(fans)
        assert bool((module.weight >= 0).all()) and module.weight.max() <= 1e-2 / fan**0.5
        assert module.weight.min() < module.weight.max()  # drawn, not constant
    assert not [w for w in recwarn if issubclass(w.category, PcDEQWarning)]  # nothing negative to say
    # from the runner (an argparse config leaves it at "keep"): the same start
    monkeypatch.setenv(RUNNER_OPTIONS_ENV, '{"pcdeq_nonneg_init": "reference"}')
    g = nn.Linear(64, 64, bias=False)
    parser = torchdeq_pcdeq.add_pcdeq_args(argparse.ArgumentParser())
    torchdeq.utils.add_deq_args(parser)
    torchdeq.apply_norm(g, args=parser.parse_args(["--norm_type", "pcdeq_nonneg"]))
    assert g.weight.sum(1).max() < 0.1  # not the default init's rows of about 4
    # "keep", the default: the magnitudes stay, and the warning says what that does
    monkeypatch.delenv(RUNNER_OPTIONS_ENV)
    h = nn.Linear(64, 64, bias=False)
    before = h.weight.detach().abs().clone()
    with pytest.warns(PcDEQWarning, match="--pcdeq_nonneg_init reference"):
        torchdeq.apply_norm(h, args={"norm_type": "pcdeq_nonneg"})
    torch.testing.assert_close(h.weight, before)
    with pytest.raises(UnknownNameError, match="'reference'"):
        torchdeq.apply_norm(nn.Linear(2, 2), args={"norm_type": "pcdeq_nonneg", "pcdeq_nonneg_init": "small"})


def test_the_runner_with_options_and_no_script_prints_its_usage(capsys):
    """Found by review: options and no script gave a raw IndexError; `--help` after options read
    as a script named '--help'."""
    import torchdeq_pcdeq.__main__ as runner

    assert runner.main(["--pcdeq_guard", "warn"]) == 2
    assert capsys.readouterr().err.startswith("usage: python -m torchdeq_pcdeq SCRIPT")
    assert runner.main(["--pcdeq_guard", "warn", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m torchdeq_pcdeq SCRIPT")

"""The benchmarks run (a smoke run of each, seconds) and their data loading is offline-safe."""

import json
import pathlib
import platform
import subprocess
import sys
import time
import warnings

import pytest
import torch

from benchmarks.baselines import KINDS
from benchmarks.data import augment, load
from conftest import forget_warnings
from torchdeq_pcdeq import InvalidInputError, PcDEQWarning, UnknownNameError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mnist_subset_is_the_real_offline_mnist_with_a_fixed_stratified_split():
    data = load("mnist_subset")
    assert data.train_x.shape == (4000, 1, 28, 28) and data.test_x.shape == (1000, 1, 28, 28)
    assert data.train_x.min() >= 0.0 and data.train_x.max() <= 1.0
    assert torch.bincount(data.test_y).tolist() == [100] * 10
    again = load("mnist_subset")
    assert torch.equal(again.train_y, data.train_y) and not data.synthetic


def test_a_missing_torchvision_dataset_names_the_directory(tmp_path):
    with pytest.raises(InvalidInputError, match=f"not found in {tmp_path}.*--download"):
        load("cifar10", tmp_path)
    with pytest.raises(UnknownNameError, match="'mnist_subset'"):
        load("imagenet")


def test_a_configuration_error_ends_the_command_like_a_bad_flag(tmp_path):
    # python -m benchmarks.train: message and status 2, as argparse does, and no traceback
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--dataset", "cifar10", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.startswith(f"train.py: error: Dataset 'cifar10' was not found in {tmp_path}")
    assert "Traceback" not in run.stderr
    assert "--download" in run.stderr and "download=True" not in run.stderr  # the CLI's advice only


def test_only_a_configuration_error_loses_its_traceback(capsys, monkeypatch):
    from benchmarks.cli import configuring, run_as_command

    monkeypatch.setattr(sys, "argv", ["train.py"])

    def configure():
        with configuring():
            load("imagenet")

    with pytest.raises(SystemExit) as ended:
        run_as_command(configure)
    assert ended.value.code == 2
    assert capsys.readouterr().err.startswith("train.py: error: Unknown dataset 'imagenet'")

    def compute():  # the same error type, raised while the run computes, is a bug to debug
        raise InvalidInputError("the injection has NaN in sample 3")

    with pytest.raises(InvalidInputError, match="NaN in sample 3"):
        run_as_command(compute)
    assert capsys.readouterr().err == ""


def test_synthetic_data_says_so_and_augmentation_keeps_shapes():
    data = load("synthetic-cifar10")
    assert data.synthetic and data.train_x.shape[1:] == (3, 32, 32) and data.model_dataset == "cifar10"
    images = torch.rand(5, 3, 32, 32)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and not torch.equal(out, images)


def test_the_smoke_suite_runs_every_benchmark(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    smoke = ROOT / "benchmarks" / "results" / "smoke"
    train = json.loads((smoke / "train.json").read_text())
    assert set(train["runs"]) == {"pcdeq", "torchdeq_anderson", "torchdeq_fixed_point", "reference"}
    assert train["runs"]["pcdeq"][-1]["train_converged"] == 1.0
    micro = json.loads((smoke / "micro.json").read_text())
    # a smoke-sized step is a few MB, within the resident set's noise: the tight claim is the
    # full run's (benchmarks/results/micro_cpu.md) and test_core's saved-tensor count
    assert 0.5 < micro["memory_ratio"] < 2.0
    assert [len(row["peaks_mb"]) for row in micro["memory"]] == [1, 1]  # --memory-processes 1
    assert all(row["peak_mb"] <= row["peak_mb_max"] for row in micro["memory"])
    linear = micro["steps"]["linear"]
    assert {"pcdeq", "reference", "floor"} <= set(linear)
    # the floor is the step without the equilibrium layer: no solve, fewer passes and operations
    assert linear["floor"]["iterations"] == 0
    assert linear["floor"]["passes"] < linear["pcdeq"]["passes"]
    assert linear["floor"]["ops"] < min(linear["reference"]["ops"], linear["pcdeq"]["ops"])
    for name in ("train_curves.png", "train_residuals.png", "train_enclosure.png", "certificates_cpu.md"):
        assert (smoke / name).stat().st_size > 0, name
    said = json.loads((smoke / "certificates_cpu.json").read_text())["certificates"]
    assert [row["case"] for row in said] == ["linear 8, batch 4", "conv 4ch 16x16, batch 16"]
    for row in said:  # the power step never loosens the bound; the certified backward meets 1e-4
        assert 0 < row["rate_bound"] <= row["rate_bound_v_z"] < 1, row
        assert 0 < row["certified_backward_bound"] <= 1e-4 and row["certified_backward_iterations"] >= 1, row
    long_runs = json.loads((smoke / "long_run_cpu.json").read_text())
    assert "benchmarks.long_run" in long_runs["command"] and "threads" in long_runs["hardware"]
    (long_run,) = long_runs["runs"]
    assert long_run["steps"] == 5 and long_run["negative_weight_steps"] == 0
    assert "suite done" in result.stdout


def test_the_micro_benchmark_times_pcdeq_with_both_convolution_kernels():
    from benchmarks import micro

    steps = micro.step_times("single_conv", torch.device("cpu"), 1, 2, False, kinds=("pcdeq", "reference"))
    assert list(steps) == ["pcdeq", micro.PYTORCH_CONV, "reference", "floor"]
    ours, pytorch = steps["pcdeq"], steps[micro.PYTORCH_CONV]
    # The kernel changes how a convolution is computed, not how many the step computes.
    assert ours["iterations"] == pytorch["iterations"] > 0
    assert ours["passes"] == pytorch["passes"] > steps["floor"]["passes"]
    lines = micro.kernel_lines()
    assert any("product W z on a 2x82x28x28" in line for line in lines), lines


@pytest.mark.cuda
def test_a_steps_gpu_kernels_and_busy_time_are_counted_on_cuda():
    from benchmarks import micro

    device = torch.device("cuda")
    a = torch.rand(2048, 2048, device=device)
    a @ a  # cuBLAS's first product sets up its workspace
    result, once = micro.device_work(lambda: a @ a, device)
    _, thrice = micro.device_work(lambda: (a @ a, a @ a, a @ a), device)
    assert torch.equal(result, a @ a)
    assert once["gpu_ops"] >= 1 and thrice["gpu_ops"] == 3 * once["gpu_ops"]
    assert 0 < once["gpu_busy_ms"] < 1000 and thrice["gpu_busy_ms"] > 1.5 * once["gpu_busy_ms"]

    def annotated():  # as the optimizer's step is: the range, 50 ms wide, is no work of its own
        with torch.profiler.record_function("a range"):
            a @ a
            torch.cuda.synchronize(device)
            time.sleep(0.05)
            return a @ a

    _, ranged = micro.device_work(annotated, device)
    assert ranged["gpu_ops"] == 2 * once["gpu_ops"] and ranged["gpu_busy_ms"] < 25


@pytest.mark.cuda
def test_the_gpu_suite_smoke_runs_on_cuda():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--smoke", "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_suite_runs_on_after_a_failed_benchmark_and_exits_nonzero(monkeypatch, tmp_path):
    from benchmarks import suite

    ran = []

    class Broken:
        __name__ = "benchmarks.broken"

        @staticmethod
        def main(argv):
            raise RuntimeError("out of memory")

    class Fine:
        __name__ = "benchmarks.fine"

        @staticmethod
        def main(argv):
            ran.append(argv)

    monkeypatch.setattr(suite, "RESULTS", tmp_path)
    monkeypatch.setattr(suite, "plan", lambda *a: [("broken", Broken, ["-a"]), ("fine", Fine, ["-b"])])
    with pytest.raises(SystemExit, match=r"1 failed run\(s\): broken"):
        suite.main(["--device", "cpu"])
    assert ran == [["-b"]]
    summary = json.loads((tmp_path / "suite_cpu.json").read_text())
    assert summary["commit"] is None or summary["commit"].startswith(_head()[:7])
    runs = summary["runs"]
    assert runs["broken"]["error"] == "RuntimeError: out of memory" and "error" not in runs["fine"]


def test_bench_commit_names_the_code_of_a_tree_copied_without_its_git_metadata(monkeypatch):
    from benchmarks import suite

    monkeypatch.setenv("BENCH_COMMIT", "f0da435")
    assert suite._commit() == "f0da435"
    monkeypatch.setenv("BENCH_COMMIT", "")  # empty: the checkout's own commit
    assert suite._commit() is None or suite._commit().startswith(_head()[:7])


def _head() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def test_a_kind_trains_the_same_alone_and_with_its_epochs_alternating_with_others(
    tmp_path, capsys, monkeypatch
):
    """Each kind keeps its own data order and RNG: the others' epochs in between change nothing."""
    from benchmarks import train

    draws: dict[str, list[float]] = {}
    build = train.build

    def drawing_build(kind, *args, **kwargs):  # each optimizer step also draws from the global RNG
        model = build(kind, *args, **kwargs)
        after_step = model.after_step
        model.after_step = lambda: (draws.setdefault(kind, []).append(torch.rand(1).item()), after_step())
        return model

    monkeypatch.setattr(train, "build", drawing_build)
    common = ["--model", "single_conv", "--dataset", "synthetic-cifar10", "--channels", "4", "--epochs", "2"]
    common += ["--train-subset", "128", "--test-subset", "64", "--quiet"]
    common += ["--augment"]  # augmentation draws from the order's generator
    alone = train.main([*common, "--kinds", "pcdeq", "--out", str(tmp_path / "alone")])
    draws_alone = draws.pop("pcdeq")
    capsys.readouterr()  # only the second run's output is read below
    # reference is built last: without its own RNG state, pcdeq would draw from reference's
    mixed = train.main([*common, "--kinds", "pcdeq", "reference", "--out", str(tmp_path / "mixed")])
    assert len(draws_alone) == 4 and draws_alone[:2] != draws_alone[2:]  # 2 epochs of 2 batches, one stream
    assert draws["pcdeq"] == draws_alone
    timing = {"seconds", "peak_memory_mb"}
    timing |= {"test_backward_iterations", "test_backward_converged"}  # NaN: no backward in test
    strip = lambda history: [{k: v for k, v in row.items() if k not in timing} for row in history]  # noqa: E731
    assert strip(alone["runs"]["pcdeq"]) == strip(mixed["runs"]["pcdeq"])
    assert len(mixed["runs"]["reference"]) == 2
    out = capsys.readouterr().out
    assert out.index("reference epoch   1") < out.index("pcdeq epoch   2")  # alternating


def _refusal(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2  # argparse's usage error, before any work
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (["--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
        (["--batch-size", "-4"], "--batch-size: expected an integer >= 1, got -4"),
        (["--batch-size", "1"], "--batch-size: expected an integer >= 2, got 1: the models' batch"),
        (["--train-subset", "1"], "--train-subset: expected an integer >= 2, got 1"),
        (["--train-subset", "-30"], "--train-subset: expected an integer >= 1, got -30"),
        (["--milestone", "0"], "--milestone: expected an integer >= 1, got 0"),
        (["--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
        (["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
        (["--lr", "-1"], "--lr: expected a positive finite number, got -1.0"),
        (["--device", "tpu"], "expected a device such as cpu, cuda or cuda:0, got 'tpu'"),
        (["--augment"], "--augment is the CIFAR-10 recipe"),
        (["--activation", "relu6"], "the reference kind has pcDEQ-1 (tanh) and pcDEQ-2 (sigmoid) layers"),
    ],
)
def test_train_refuses_bad_arguments_before_any_work(capsys, tmp_path, argument, message):
    from benchmarks import train

    out = tmp_path / "run"
    err = _refusal(capsys, train.main, ["--dataset", "digits", "--out", str(out), *argument])
    assert message in err
    assert not list(tmp_path.iterdir())  # nothing written, nothing overwritten


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize(
    "module", ["train", "micro", "solver_overhead", "certificates", "long_run", "suite", "demo"]
)
def test_every_entry_point_refuses_cuda_without_a_gpu(capsys, module):
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    for name in ("cuda", "cuda:0"):
        assert f"{name}: no CUDA GPU is visible to torch" in _refusal(capsys, main, ["--device", name])


def test_the_suite_plans_the_gpu_runs_for_any_cuda_device():
    from benchmarks import suite

    names = lambda device: [name for name, _, _ in suite.plan(device, False, False)]  # noqa: E731
    assert names("cuda:0") == names("cuda") != names("cpu")
    assert "train multi conv, CIFAR-10 shapes" in names("cuda:1")
    # float32 suites add a bfloat16 run, to its own files; a --bf16 suite is bfloat16 throughout
    bf16 = {name: argv for name, _, argv in suite.plan("cuda:1", False, False)}[
        "train single conv, bf16 autocast"
    ]
    assert "--bf16" in bf16 and "--out" not in bf16  # its default stem ends in _bf16 (below)
    assert "train single conv, bf16 autocast" not in [name for name, _, _ in suite.plan("cuda", False, True)]


def test_a_bf16_run_keeps_the_float32_results_beside_its_own(tmp_path, monkeypatch, capsys):
    from benchmarks import train

    monkeypatch.setattr(train, "RESULTS", tmp_path)
    argv = ["--dataset", "digits", "--kinds", "pcdeq", "--epochs", "1", "--train-subset", "32"]
    train.main([*argv, "--test-subset", "16", "--quiet"])
    train.main([*argv, "--test-subset", "16", "--quiet", "--bf16"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"train_linear_digits_cpu{tail}" for tail in (".json", ".md", "_bf16.json", "_bf16.md")]
    assert json.loads((tmp_path / "train_linear_digits_cpu_bf16.json").read_text())["bf16"] is True
    assert json.loads((tmp_path / "train_linear_digits_cpu.json").read_text())["bf16"] is False


def test_recorded_commands_write_paths_inside_the_working_directory_as_typed_there(monkeypatch, tmp_path):
    from benchmarks.cli import as_typed, command

    monkeypatch.chdir(tmp_path)
    inside, outside = str(tmp_path / "runs" / "a"), str(tmp_path.parent / "elsewhere")
    assert as_typed(["--out", inside, f"--out={inside}", outside, str(tmp_path)]) == [
        "--out",
        "runs/a",
        "--out=runs/a",
        outside,
        str(tmp_path),
    ]
    assert command("benchmarks.micro", ["--out", inside]) == "python -m benchmarks.micro --out runs/a"
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # a removed working directory: arguments as given
    assert as_typed(["--out", inside]) == ["--out", inside]


def test_results_are_strict_json_written_under_the_stem_as_given(tmp_path, capsys):
    from benchmarks import train

    stem = tmp_path / "run.v2"
    argv = ["--dataset", "digits", "--kinds", "pcdeq", "--epochs", "1", "--train-subset", "32"]
    train.main([*argv, "--test-subset", "16", "--quiet", "--plots", "--out", str(stem)])
    written = [
        "run.v2.json",
        "run.v2.md",
        "run.v2_curves.png",
        "run.v2_enclosure.png",
        "run.v2_residuals.png",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wrote ")]
    assert sorted(said) == [f"wrote {tmp_path / name}" for name in written]  # each file, once

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    report = json.loads((tmp_path / "run.v2.json").read_text(), parse_constant=refuse)
    assert report["runs"]["pcdeq"][0]["test_backward_iterations"] is None  # no backward at test time
    assert report["command"].startswith("python -m benchmarks.train --dataset digits")
    assert report["seed"] == 0 and report["augment"] is False


def test_the_split_is_the_same_whatever_the_run_seed(monkeypatch, tmp_path):
    from benchmarks import train

    loaded = []
    monkeypatch.setattr(train, "load", lambda *args: loaded.append(load(*args)) or loaded[-1])
    for seed in ("0", "1"):
        argv = ["--dataset", "digits", "--kinds", "pcdeq", "--epochs", "1", "--train-subset", "16"]
        train.main([*argv, "--test-subset", "8", "--quiet", "--seed", seed, "--out", str(tmp_path / seed)])
    first, second = loaded
    assert torch.equal(first.test_x, second.test_x) and torch.equal(first.train_y, second.train_y)


def test_corrupt_torchvision_files_are_an_error_naming_the_directory(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).write_bytes(bytes(range(256)) * 4)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InvalidInputError, match=f"in {tmp_path} could not be read.*truncated or corrupt"):
        load("mnist", tmp_path)


@pytest.mark.parametrize("kind", ["torchdeq_anderson", "torchdeq_fixed_point"])
def test_torchdeq_baselines_train_under_bfloat16_autocast(kind):
    """Their implicit backward calls f after the autocast region; Anderson needs a float32 state."""
    import torch.nn.functional as F

    from benchmarks.baselines import build

    torch.manual_seed(0)
    model = build(kind, "linear", "digits")
    images, labels = torch.rand(8, 1, 8, 8), torch.arange(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, infos = model(images)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert all(bool(info["nstep"].min() > 0) for info in infos) and bool(loss.isfinite())


def test_tables_record_the_command_and_settings_that_made_them(tmp_path, monkeypatch):
    from benchmarks import certificates, long_run

    # bfloat16 cannot resolve the tolerance nor certify: warnings said once per process, which
    # this test must neither see nor use up for the tests that check them
    forget_warnings(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PcDEQWarning)
        certificates.main(["--smoke", "--repeats", "1", "--bf16", "--out", str(tmp_path / "cert")])
    first = (tmp_path / "cert.md").read_text().splitlines()[0]
    assert "bf16 autocast" in first and "--smoke --repeats 1 --bf16 --out" in first
    said = json.loads((tmp_path / "cert.json").read_text())
    assert said["bf16"] is True
    # the backward is not certified in bfloat16 arithmetic, and the table says so
    assert [row["certified_backward_bound"] for row in said["certificates"]] == [None, None], said
    assert "| not certified (half precision) |" in (tmp_path / "cert.md").read_text()
    long_run.main(["--steps", "4", "--lr-factor", "2", "--nonnegativity", "project", "--out", str(tmp_path)])
    table = (tmp_path / "long_run_cpu.md").read_text()
    assert "lr 0.001 (2x the reference's)" in table and "loss (first / last 2 steps)" in table
    assert "`python -m benchmarks.long_run --steps 4 --lr-factor 2" in table


def test_the_cpu_hardware_line_names_the_model_and_the_vector_extensions(monkeypatch, tmp_path):
    from benchmarks import solver_overhead

    line = solver_overhead.hardware_line(torch.device("cpu"))
    capability = torch.backends.cpu.get_cpu_capability()
    assert line.startswith(f"{solver_overhead.cpu_name()} CPU ({capability}), ")
    assert f"{torch.get_num_threads()} threads" in line and f"torch {torch.__version__}" in line
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000 @ 3.0GHz\nflags\t: avx2\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k),
    )
    assert solver_overhead.cpu_name() == "Example CPU 9000 @ 3.0GHz"
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert solver_overhead.cpu_name() in (platform.processor(), platform.machine())


def test_every_kind_stops_at_one_tolerance_which_bf16_raises_to_what_pcdeq_can_resolve():
    from benchmarks.baselines import TOL, build, tolerance

    assert tolerance(False) == TOL and tolerance(True) == 2 * 2.0**-7  # bfloat16: 2 ulps
    for tol in (TOL, tolerance(True)):
        cores = {kind: build(kind, "linear", "digits", tol=tol).cores[0] for kind in KINDS}
        assert cores["pcdeq"].f_tol == cores["pcdeq"].b_tol == tol
        for kind in ("torchdeq_anderson", "torchdeq_fixed_point"):
            assert cores[kind].f_tol == cores[kind].b_tol == tol
        assert cores["reference"].tol == tol
    # the budgets of deq apply to every kind (TorchDEQ's got them twice and failed)
    deq = {"f_max_iter": 7, "b_max_iter": 9}
    assert build("torchdeq_fixed_point", "linear", "digits", deq=deq).cores[0].f_max_iter == 7
    reference = build("reference", "linear", "digits", deq=deq).cores[0]
    assert (reference.f_max_iter, reference.b_max_iter) == (7, 9)


def test_the_reference_is_pcdeq_2_for_the_sigmoid_and_refuses_what_it_does_not_have():
    from benchmarks.baselines import build

    layer = build("reference", "linear", "digits", activation="sigmoid").layers[0]
    u = torch.tensor([[-1.0, 0.0, 2.0]])
    assert torch.equal(layer.inject(u), torch.tensor([[0.0, 0.0, 2.0]]))  # relu: pcDEQ-2's injection
    z = torch.zeros(1, layer.operator.weight.shape[1])
    x = torch.zeros_like(z)
    assert torch.allclose(layer(z, x), torch.full_like(z, 0.5))  # sigmoid(0)
    with pytest.raises(InvalidInputError, match=r"pcDEQ-1 \(tanh\) and pcDEQ-2 \(sigmoid\).*'relu6'"):
        build("reference", "linear", "digits", activation="relu6")


def test_a_last_training_batch_of_one_image_joins_the_one_before():
    from benchmarks.train import training_batches

    spans = lambda n, size: [(b.start, b.stop) for b in training_batches(n, size)]  # noqa: E731
    assert spans(65, 64) == [(0, 65)]
    assert spans(129, 64) == [(0, 64), (64, 129)]
    assert spans(128, 64) == [(0, 64), (64, 128)]
    assert spans(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert spans(1, 64) == [(0, 1)]


def test_residual_traces_are_placed_at_the_calls_of_f_they_were_measured_at():
    from benchmarks.baselines import build
    from benchmarks.train import residual_trace

    torch.manual_seed(0)
    images = torch.rand(4, 1, 8, 8)
    for kind, first in (("pcdeq", 1), ("torchdeq_fixed_point", 1), ("torchdeq_anderson", 3)):
        model = build(kind, "linear", "digits")
        steps, values = residual_trace(model, kind, images)
        last = int(
            model(images)[1][0]["trace_steps"][-1] if kind == "pcdeq" else model(images)[1][0]["nstep"].max()
        )
        assert steps == list(range(first, last + 1)) and len(values) == len(steps), kind
        assert values[-1] <= 1e-4 < values[0], kind  # ends at the tolerance, not on padding


@pytest.mark.parametrize(
    ("kind", "b_max_iter"),
    # (the reference's small initial weights meet the tolerance in 2 adjoint steps; Anderson
    # makes 2 calls before its first test)
    [("torchdeq_anderson", 2), ("torchdeq_fixed_point", 2), ("reference", 1)],
)
def test_a_baselines_solves_that_run_out_of_budget_count_as_unconverged_at_their_budget(kind, b_max_iter):
    """TorchDEQ's nstep is each sample's step of lowest residual, which undercounts a solve that
    ran to its budget; and a backward solve that did not converge was not counted at all."""
    from benchmarks.baselines import build
    from benchmarks.train import _Stats

    torch.manual_seed(0)
    model = build(kind, "linear", "digits", deq={"f_max_iter": 3, "b_max_iter": b_max_iter}).train()
    images, labels = torch.rand(8, 1, 8, 8), torch.arange(8)
    stats = _Stats(1e-4)
    logits, infos = model(images, backward_writer=stats.backward)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    stats.batch(loss, logits, labels, infos)
    summary = stats.summary("train")
    assert summary["train_forward_iterations"] == 3 and summary["train_backward_iterations"] == b_max_iter
    assert summary["train_converged"] < 0.5 and summary["train_backward_converged"] < 0.5


def test_the_epochs_peak_memory_is_the_trainings_not_the_evaluations(monkeypatch, tmp_path):
    from benchmarks import train

    evaluated = []
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *args: (evaluated.append(1), evaluate(*args))[1])
    monkeypatch.setattr(train.PeakMemory, "peak_mb", lambda self: 100.0 * len(evaluated))
    argv = ["--dataset", "digits", "--kinds", "pcdeq", "--epochs", "2", "--train-subset", "32"]
    report = train.main([*argv, "--test-subset", "16", "--quiet", "--out", str(tmp_path / "run")])
    assert [row["peak_memory_mb"] for row in report["runs"]["pcdeq"]] == [0.0, 100.0]


def test_the_warm_up_before_the_first_epoch_leaves_the_training_as_it_was(tmp_path):
    from benchmarks import train
    from benchmarks.baselines import build
    from benchmarks.data import load

    args = train.parse(["--dataset", "digits", "--batch-size", "24", "--train-subset", "40", "--quiet"])
    data = load("digits").subset(40, 8)
    for kind in ("pcdeq", "reference"):
        torch.manual_seed(0)
        model = build(kind, "single_conv", "digits", channels=4)
        run = train.Run(kind, model, data, args, torch.device("cpu"))
        before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
        run.warm_up()  # batches of 24 and 16 images
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), kind  # BatchNorm statistics too
        assert torch.equal(torch.get_rng_state(), rng) and torch.equal(run.rng[0], rng)
        assert all(p.grad is None for p in model.parameters()), kind


def test_augmentation_pads_with_black_as_the_reference_does_before_it_standardizes():
    from benchmarks.data import _STATS, Data

    images = torch.full((6, 3, 32, 32), 5.0)
    data = Data("cifar10", images, torch.zeros(6), images, torch.zeros(6), "cifar10")
    mean, std = (torch.tensor(v) for v in _STATS["cifar10"])
    assert torch.allclose(data.black, (0 - mean) / std)
    out = augment(images, torch.Generator().manual_seed(0), fill=data.black)
    for channel in range(3):
        values = set(out[:, channel].unique().tolist())
        assert values == {5.0, data.black[channel].item()}, channel  # every crop here shows padding
    assert set(augment(images, torch.Generator().manual_seed(0)).unique().tolist()) == {0.0, 5.0}


def test_the_suite_has_no_float32_long_run_in_a_bf16_suite_and_a_bf16_smoke_is_bf16_throughout():
    from benchmarks import suite

    for smoke in (False, True):
        plan = suite.plan("cpu", smoke, True)
        assert "long run" not in [name for name, _, _ in plan]
        assert "long run" in [name for name, _, _ in suite.plan("cpu", smoke, False)]
    assert all("--bf16" in argv for _, _, argv in suite.plan("cpu", True, True))


def test_micro_refuses_two_equal_budgets_before_any_work(capsys):
    from benchmarks import micro

    assert "--budgets compares two different f_max_iter, got 10 twice" in _refusal(
        capsys, micro.main, ["--budgets", "10", "10"]
    )

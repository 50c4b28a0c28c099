"""The benchmarks run (a smoke run of each, seconds) and their data loading is offline-safe."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks.data import augment, load
from torchdeq_pcdeq import InvalidInputError, UnknownNameError

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
    (long_run,) = json.loads((smoke / "long_run_cpu.json").read_text())
    assert long_run["steps"] == 5 and long_run["negative_weight_steps"] == 0
    assert "suite done" in result.stdout


def test_the_micro_benchmark_times_pcdeq_with_both_convolution_kernels():
    from benchmarks import micro

    steps = micro.step_times("single_conv", torch.device("cpu"), 1, 2, False, kinds=("pcdeq", "reference"))
    assert list(steps) == ["pcdeq", micro.NNPACK_CONV, "reference", "floor"]
    ours, nnpack = steps["pcdeq"], steps[micro.NNPACK_CONV]
    # The kernel changes how a convolution is computed, not how many the step computes.
    assert ours["iterations"] == nnpack["iterations"] > 0
    assert ours["passes"] == nnpack["passes"] > steps["floor"]["passes"]


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
    common = ["--model", "linear", "--dataset", "digits", "--epochs", "2", "--train-subset", "128"]
    common += ["--test-subset", "64", "--quiet", "--augment"]  # augmentation draws from the order's generator
    alone = train.main([*common, "--kinds", "pcdeq", "--out", str(tmp_path / "alone")])
    draws_alone = draws.pop("pcdeq")
    capsys.readouterr()  # only the second run's output is read below
    # reference is built last: without its own RNG state, pcdeq would draw from reference's
    mixed = train.main([*common, "--kinds", "pcdeq", "reference", "--out", str(tmp_path / "mixed")])
    assert len(draws_alone) == 4 and draws_alone[:2] != draws_alone[2:]  # 2 epochs of 2 batches, one stream
    assert draws["pcdeq"] == draws_alone
    timing = {"seconds", "peak_memory_mb", "test_backward_iterations"}  # the last is NaN: no backward in test
    strip = lambda history: [{k: v for k, v in row.items() if k not in timing} for row in history]  # noqa: E731
    assert strip(alone["runs"]["pcdeq"]) == strip(mixed["runs"]["pcdeq"])
    assert len(mixed["runs"]["reference"]) == 2
    out = capsys.readouterr().out
    assert out.index("reference epoch   1") < out.index("pcdeq epoch   2")  # alternating

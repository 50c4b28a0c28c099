"""An unmodified TorchDEQ training script, switched to pcDEQ by flags only."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from torchdeq_pcdeq import PcDEQWarning

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "torchdeq_style_train.py"
PCDEQ_FLAGS = ["--core", "pcdeq", "--norm_type", "pcdeq_nonneg"]


def load_script():
    spec = importlib.util.spec_from_file_location("torchdeq_style_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_imports_only_torchdeq():
    source = SCRIPT.read_text()
    assert "torchdeq_pcdeq" not in source.split('"""')[2], "the script body must not know about the plugin"


def test_flags_switch_the_script_to_pcdeq_in_process(monkeypatch):
    script = load_script()
    argv = [*PCDEQ_FLAGS, "--epochs", "2"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])  # as when run from a shell
    with pytest.warns(PcDEQWarning, match="negative entries"):  # the script's own N(0, 0.01) init
        summary = script.main(argv)
    assert summary["core"] == "PcDEQCore"
    assert summary["weight_min"] >= 0.0
    assert summary["loss_last"] < 0.6 * summary["loss_first"]
    assert summary["train_accuracy"] > 0.75
    assert summary["converged_fraction"] == 1.0
    assert summary["nstep_max"] < summary["f_max_iter"] == 200


def test_the_same_script_without_the_flags_keeps_negative_weights():
    summary = load_script().main(["--epochs", "1"])
    assert summary["core"] == "DEQSliced"
    assert summary["weight_min"] < 0.0


def run(*args):
    result = subprocess.run(
        [sys.executable, "-m", "torchdeq_pcdeq", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result


def test_flags_switch_the_script_through_the_zero_edit_runner():
    result = run(*PCDEQ_FLAGS, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["core"] == "PcDEQCore"
    assert summary["weight_min"] >= 0.0
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    assert summary["converged_fraction"] == 1.0
    assert summary["nstep_max"] < summary["f_max_iter"]


def test_a_non_admissible_injection_in_the_script_is_caught_by_the_guard():
    result = run(*PCDEQ_FLAGS, "--epochs", "1", "--injection", "linear")
    assert result.returncode != 0
    assert "NotPositiveMonotoneError" in result.stderr
    assert "layer.inject(u)" in result.stderr

"""DistributedDataParallel: 2 CPU processes (gloo, loopback) train with every nonnegativity mechanism.

The ranks start from different random initialisations and see disjoint data, so identical
parameters at the end mean that DDP broadcast rank 0's weights and averaged every gradient,
through the pcdeq core's implicit backward and each nonnegativity mechanism.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
MECHANISMS = ("weight_norm", "parametrize", "project", "pcdeq_nonneg")
STEPS = 30


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on localhost, a free port
        "--nproc_per_node",
        "2",
        str(EXAMPLE),
        "--steps",
        str(STEPS),
        "--timeout",
        "60",
        "--out",
        str(out),
    ]
    # Output to files, not pipes: torchrun's workers (each in a session of their own) inherit
    # them, and a pipe held open by a stray worker would block the read.
    stdout, stderr = out / "stdout.txt", out / "stderr.txt"
    with stdout.open("w") as out_file, stderr.open("w") as err_file:
        process = subprocess.Popen(command, stdout=out_file, stderr=err_file, text=True, env=env)
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun passes SIGTERM on to its workers and waits for them
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            pytest.fail(f"2-process DDP training did not finish in 300 s:\n{stderr.read_text()[-3000:]}")
    assert process.returncode == 0, stdout.read_text()[-3000:] + stderr.read_text()[-3000:]
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    states = [{m: torch.load(out / f"rank{r}_{m}.pt", weights_only=True) for m in MECHANISMS} for r in (0, 1)]
    return logs, states


pytestmark = pytest.mark.slow


def test_two_gloo_processes_ran(ranks):
    logs, _ = ranks
    assert [log["world_size"] for log in logs] == [2, 2]
    assert [log["backend"] for log in logs] == ["gloo", "gloo"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_both_ranks_end_with_identical_parameters(ranks, mechanism):
    _, states = ranks
    first, second = states[0][mechanism], states[1][mechanism]
    assert first.keys() == second.keys()
    assert any("cell" in key for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_weights_stay_nonnegative_every_solve_converges_and_the_loss_decreases(ranks, mechanism):
    logs, _ = ranks
    for log in logs:
        steps = log["logs"][mechanism]
        assert len(steps["loss"]) == STEPS
        assert min(steps["min_weight"]) >= 0.0
        assert all(steps["converged"])
        losses = steps["loss"]
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    # The logged loss is the all-reduced mean: the same number on both ranks.
    assert logs[0]["logs"][mechanism]["loss"] == logs[1]["logs"][mechanism]["loss"]

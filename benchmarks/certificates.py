"""Cost of each certificate relative to a plain solve, and what each says: same model, same
tolerance, one run.

For a dense and a convolutional pcDEQ layer with weights grown as in training (row sums about
2, tanh), times in eval mode the plain solve, the certified enclosure, the rate bound, and
``sradius_mode`` with TorchDEQ's power method against the rate bound; in training mode a
forward plus backward step with the plain and the certified backward solve. Medians of
``--repeats`` interleaved runs. A second table gives the certificates' values: the rate bound
(with its power step) beside the one-product bound ``v = z`` and TorchDEQ's power-method
estimate of the spectral radius, and the backward solve's iterations and certified bound.

    python -m benchmarks.certificates [--device cpu|cuda] [--repeats 9]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics

import torch
import torchdeq

import torchdeq_pcdeq  # noqa: F401  (registers the pcdeq core)
from benchmarks.cli import (
    available_device,
    command,
    positive_int,
    results_stem,
    run_as_command,
    write_results,
)
from benchmarks.solver_overhead import hardware_line, timed
from torchdeq_pcdeq import PcDEQConv2d, PcDEQLinear, rate_certificate

RESULTS = pathlib.Path(__file__).parent / "results"


def layers(device, smoke: bool = False):
    torch.manual_seed(0)
    width, channels, batch = (8, 4, 4) if smoke else (80, 32, 64)
    dense = PcDEQLinear(width, nonnegativity="project", device=device)
    conv = PcDEQConv2d(channels, nonnegativity="project", device=device)
    with torch.no_grad():
        dense.linear.weight.copy_(torch.rand(width, width, device=device) * (4.0 / width))
        conv.conv.weight.copy_(torch.rand(channels, channels, 3, 3, device=device) * (4.0 / (channels * 9)))
    yield f"linear {width}, batch {batch}", dense, torch.randn(batch, width, device=device)
    yield f"conv {channels}ch 16x16, batch 16", conv, torch.randn(16, channels, 16, 16, device=device)


def variants():
    """name -> (core config, training?, sradius_mode?)"""
    return {
        "plain solve (eval)": ({}, False, False),
        "enclosure (eval)": ({"pcdeq_enclosure": True}, False, False),
        "rate bound (eval)": ({"pcdeq_rate_bound": True}, False, False),
        "sradius, power method (eval)": ({}, False, True),
        "sradius, rate bound (eval)": ({"pcdeq_sradius": "rate_bound"}, False, True),
        "train step, plain backward": ({}, True, False),
        "train step, certified backward": ({"pcdeq_rate_bound": True}, True, False),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=available_device, default="cpu")
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--smoke", action="store_true", help="tiny layers, written under results/smoke/")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument(
        "--out",
        default=None,
        help="results path stem (default benchmarks/results/[smoke/]certificates_<device>)",
    )
    args = parser.parse_args(argv)
    device = args.device
    rows, said = [], []
    for case, layer, u in layers(device, args.smoke):
        x = layer.inject(u)
        said.append({"case": case, **certificate_values(layer, x, args.bf16)})
        cores = {
            name: (torchdeq.get_deq(core="pcdeq", f_tol=1e-4, **config).train(training), training, sradius)
            for name, (config, training, sradius) in variants().items()
        }
        iterations = {
            name: run(deq, layer, x, training, sradius, args.bf16)
            for name, (deq, training, sradius) in cores.items()
        }
        runs = {name: [] for name in cores}
        for _ in range(args.repeats):
            for name, (deq, training, sradius) in cores.items():
                runs[name].append(
                    timed(functools.partial(run, deq, layer, x, training, sradius, args.bf16), device)
                )
        base_eval = statistics.median(runs["plain solve (eval)"])
        base_train = statistics.median(runs["train step, plain backward"])
        for name, times in runs.items():
            median = statistics.median(times)
            base = base_train if name.startswith("train") else base_eval
            rows.append(
                {
                    "case": case,
                    "variant": name,
                    "ms": 1e3 * median,
                    "ratio": median / base,
                    "iterations": iterations[name],
                }
            )
    hardware = hardware_line(device)
    run_command = command("benchmarks.certificates", argv)
    lines = [
        f"Certificate cost, median of {args.repeats}{', bf16 autocast' if args.bf16 else ''} "
        f"(`{run_command}`)",
        f"Hardware: {hardware}",
        "",
        "| case | variant | forward iterations | ms | relative to plain |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['iterations']:.0f} | {r['ms']:.2f} | {r['ratio']:.2f}x |"
        )
    lines += [
        "",
        "What they say, worst sample of the batch: the rate bound q of an eval solve (in closed form, "
        "at the iterate before its returned state z, v = J z + 1e-3 z), the bound with v = z at z, "
        "TorchDEQ's power-method estimate of the spectral radius (not a bound); the backward solve's "
        "mean iterations and, certified, its bound relative to ||y||_v",
        "",
        "| case | rate bound q | q with v = z | power method (estimate) | backward iterations, plain "
        "| certified | certified bound, relative |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in said:
        lines.append(
            f"| {r['case']} | {r['rate_bound']:.4f} | {r['rate_bound_v_z']:.4f} | {r['power_method']:.4f} "
            f"| {r['backward_iterations']:.1f} | {r['certified_backward_iterations']:.1f} "
            f"| {_bound(r['certified_backward_bound'])} |"
        )
    print("\n".join(lines))
    out = results_stem(
        args.out, (RESULTS / "smoke" if args.smoke else RESULTS) / f"certificates_{device.type}", args.bf16
    )
    payload = {
        "command": run_command,
        "hardware": hardware,
        "repeats": args.repeats,
        "bf16": args.bf16,
        "rows": rows,
        "certificates": said,
    }
    write_results(out, payload, "\n".join(lines))


def _bound(value: float | None) -> str:
    return "not certified (half precision)" if value is None else f"{value:.1e}"


def certificate_values(layer, x, bf16: bool) -> dict:
    """The certificates of ``layer`` at injection ``x``, each the worst over the batch."""
    config = dict(core="pcdeq", f_tol=1e-4)

    def func(z):
        return layer(z, x)

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            z_out, rated = torchdeq.get_deq(config, pcdeq_rate_bound=True).eval()(func, torch.zeros_like(x))
            _, power = torchdeq.get_deq(config).eval()(func, torch.zeros_like(x), sradius_mode=True)
        one_product = rate_certificate(func, z_out[-1], power_step=False).rate
        backward = {}
        for name, certify in (("plain", False), ("certified", True)):
            seen = []
            deq = torchdeq.get_deq(config, pcdeq_rate_bound=certify).train()
            z_out, _ = deq(func, torch.zeros_like(x), backward_writer=seen.append)
            z_out[-1].float().sum().backward()
            backward[name] = seen[-1]
    certified = backward["certified"]
    size = certified["abs_trace"][:, -1] / certified["rel_trace"][:, -1]  # ||f(y)||_v per sample
    return {
        "rate_bound": rated["rate_bound"].max().item(),
        "rate_bound_v_z": one_product.max().item(),
        "power_method": power["sradius"].max().item(),
        "backward_iterations": backward["plain"]["nstep"].float().mean().item(),
        "certified_backward_iterations": certified["nstep"].float().mean().item(),
        # (None where the arithmetic is half precision: the backward is then not certified)
        "certified_backward_bound": (certified["error_bound"] / size).max().item()
        if "error_bound" in certified
        else None,
    }


def run(deq, layer, x, training, sradius, bf16=False) -> float:
    """One forward (and backward in training) step; returns the forward iterations."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return _run(deq, layer, x, training, sradius)


def _run(deq, layer, x, training, sradius) -> float:
    if training:
        z_out, info = deq(lambda z: layer(z, x), torch.zeros_like(x))
        z_out[-1].sum().backward()
    else:
        with torch.no_grad():
            _, info = deq(lambda z: layer(z, x), torch.zeros_like(x), sradius_mode=sradius)
    return info["nstep"].max().item()


if __name__ == "__main__":
    run_as_command(main)

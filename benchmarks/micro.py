"""Micro-benchmarks: training-step time of each kind, and memory against the iteration budget.

* ``steps``: median time of a training step (forward, backward, optimizer step) of pcDEQ
  (``pcdeq``), TorchDEQ's standard DEQ (``torchdeq_anderson``, ``torchdeq_fixed_point``) and the
  reference's way (``reference``), on the same architecture, batch and data, interleaved.
* ``floor``: the pcDEQ step with each equilibrium layer replaced by its injection (``z* := x``):
  the stem, the injection, the head, the loss, their backward and the optimizer. What ``pcdeq``
  adds to it is the cost of its equilibrium layer, so the floor bounds the speed-up any
  implementation of the layer can reach: with a free equilibrium layer, a step would still take
  ``floor / reference`` of the reference's. The reference pays the same, but for the ``1e-6``
  added to its injection (one elementwise add): its layer's cost is the step minus the floor to
  within that add. TorchDEQ's kinds inject the stem's output as is, so their step minus the
  floor would leave out the injection's softplus: the table gives no such figure for them.
* ``work``: what one training step of each kind computes, counted at PyTorch's dispatcher: all
  tensor operations, and the passes of the models' heavy operators (a convolution or a matrix
  product, forward or one gradient output of its backward; see :class:`WorkCounter`). Time
  follows the passes for the convolutional models and the operation count for the small linear
  one.
* ``GPU busy`` (CUDA): the kernels, copies and memsets of the counted step and their summed
  device time (:func:`device_work`); a step far longer than its busy time is launch-bound.
* ``memory``: peak memory of one pcDEQ training step with ``f_max_iter`` 10 and 100 on a layer
  that needs more than 10 iterations. Implicit differentiation keeps no graph of the solve, so the
  two must match. CUDA: peak bytes allocated by tensors. CPU: the peak resident set of a fresh
  process for each setting (reset just before the step), above what it held before the step.

    python -m benchmarks.micro [--device cpu|cuda] [--repeats 7] [--bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.baselines import KINDS, build, tolerance
from benchmarks.cli import (
    available_device,
    command,
    positive_int,
    results_stem,
    run_as_command,
    training_batch_size,
    write_results,
)
from benchmarks.data import load
from benchmarks.memory import PeakMemory
from benchmarks.solver_overhead import hardware_line, timed
from torchdeq_pcdeq import conv_kernels
from torchdeq_pcdeq.models import ARCHITECTURES, build_model

RESULTS = pathlib.Path(__file__).parent / "results"
FLOOR = "floor"  # the step without equilibrium layers (see the module docstring)
PYTORCH_CONV = "pcdeq, conv_algorithm=pytorch"  # PyTorch's kernels only: NNPACK's share (conv_kernels)


def step_times(model_name: str, device, repeats: int, batch: int, bf16: bool, kinds=KINDS) -> dict:
    data = load("mnist_subset")
    images, labels = data.train_x[:batch].to(device), data.train_y[:batch].to(device)
    setups = {}
    variants = [*kinds, FLOOR]
    if "pcdeq" in kinds and model_name != "linear":
        variants.insert(kinds.index("pcdeq") + 1, PYTORCH_CONV)
    tol = tolerance(bf16)
    for kind in variants:
        torch.manual_seed(0)
        if kind == FLOOR:
            model = floor_model(model_name, "mnist")
        elif kind == PYTORCH_CONV:
            model = build("pcdeq", model_name, "mnist", tol=tol)
            for layer in model.layers:
                layer.conv_algorithm = "pytorch"
        else:
            model = build(kind, model_name, "mnist", tol=tol)
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1.5e-2)
        setups[kind] = (model, opt)

    def step(model, opt):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, infos = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step()
        return infos

    counts, work = {}, {}
    for kind, setup in setups.items():
        step(*setup)  # the first step also creates the optimizer's state: not counted

        def counted(setup=setup) -> tuple[float, dict]:
            with WorkCounter() as counter:
                infos = step(*setup)
            return iterations(infos[0]), counter.totals()  # the iterations of the counted step

        if device.type == "cuda":  # the GPU's share of the same step
            (counts[kind], work[kind]), gpu = device_work(counted, device)
            work[kind].update(gpu)
        else:
            counts[kind], work[kind] = counted()
    times = {kind: [] for kind in setups}
    for _ in range(repeats):
        for kind, setup in setups.items():
            times[kind].append(timed(lambda setup=setup: step(*setup), device))
    return {
        kind: {"ms": 1e3 * statistics.median(t), "iterations": counts[kind], **work[kind]}
        for kind, t in times.items()
    }


def floor_model(architecture: str, dataset: str) -> nn.Module:
    """The pcDEQ model of ``architecture`` with each equilibrium layer replaced by its injection."""
    model = build("pcdeq", architecture, dataset)
    for i, layer in enumerate(model.layers):
        model.layers[i] = _InjectionOnly(layer)
        model.cores[i] = _OneCall()
    return model


class _InjectionOnly(nn.Module):
    """Keeps a pcDEQ layer's injection; its "fixed point" is the injection itself."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer  # its weight gets no gradient, so the optimizer skips it

    def inject(self, u):
        return self.layer.inject(u)

    def forward(self, z, x):
        return x


class _OneCall(nn.Module):
    """A core that calls ``f`` once, tracked: no solve, no implicit backward."""

    def forward(self, func, z_init, backward_writer=None, **kwargs):
        z = func(z_init)
        return [z], {"nstep": torch.zeros(z.shape[0]), "converged": torch.ones(z.shape[0], dtype=torch.bool)}


class WorkCounter(TorchDispatchMode):
    """Counts the tensor operations of a block, and the passes of its heavy operators.

    A pass is one convolution (PyTorch's or NNPACK's) or matrix-matrix product (``mm``,
    ``addmm``: the models' layers): a forward call, or one gradient output (input or weight) of
    a convolution's backward. The batched products of Anderson acceleration (``bmm``, on its
    small history) are operations, not passes.

    Example:
        >>> a = torch.ones(2, 2)
        >>> with WorkCounter() as counter:
        ...     _ = a @ a + 1
        >>> counter.totals()
        {'ops': 2, 'passes': 1}
    """

    _PRODUCTS = frozenset(
        (
            torch.ops.aten.mm.default,
            torch.ops.aten.addmm.default,
            torch.ops.aten._nnpack_spatial_convolution.default,  # pcDEQ's untracked products
        )
    )

    def __init__(self):
        super().__init__()
        self.ops = self.passes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten.convolution.default or func in self._PRODUCTS:
            self.passes += 1
        elif func is torch.ops.aten.convolution_backward.default:
            self.passes += sum(args[-1][:2])  # output_mask: (input, weight, bias)
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict:
        return {"ops": self.ops, "passes": self.passes}


def device_work(run, device: torch.device) -> tuple[object, dict]:
    """``run()``'s result, and what the GPU ``device`` did in it: its kernels, copies and memsets
    (``gpu_ops``) and the sum of their device times in ms (``gpu_busy_ms``), from PyTorch's
    profiler; both ``None`` where the profiler saw no GPU activity (no CUPTI).

    A step whose time is far above its busy time leaves the GPU waiting on the host: the
    dispatch of its operations, not their arithmetic, sets its pace (launch-bound).
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        result = run()
        torch.cuda.synchronize(device)
    # A record_function range (the optimizer's step has one) also appears as a GPU event that
    # spans its kernels and the gaps between them: not work of its own.
    on_gpu = [
        event
        for event in profile.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(event, "is_user_annotation", False)
    ]
    if not on_gpu:
        return result, {"gpu_ops": None, "gpu_busy_ms": None}
    return result, {"gpu_ops": len(on_gpu), "gpu_busy_ms": sum(e.device_time_total for e in on_gpu) / 1e3}


def iterations(info: dict) -> float:
    """Iterations the solve ran (calls of f, or of the adjoint's product): ``trace_steps`` for
    pcdeq, the calls counted for TorchDEQ's solvers (``benchmarks.baselines``), the reference's
    ``nstep``."""
    if "trace_steps" in info:
        return float(info["trace_steps"][-1])
    return info["calls" if "calls" in info else "nstep"].float().max().item()


def slow_layer_model(device, f_max_iter: int):
    """A single-conv pcDEQ (relu6) whose equilibrium layer needs well over 100 iterations.

    The kernel's row sums are 0.97 (relu6 is linear below 6, so the rate is about 0.97) and the
    stem's normalization is shifted so that the injections are small.
    """
    torch.manual_seed(0)
    deq = {"f_max_iter": f_max_iter, "pcdeq_nonconvergence": "ignore", "hook_ift": True}
    model = build_model("single_conv", "mnist", activation="relu6", deq=deq)
    layer = model.layers[0]
    with torch.no_grad():
        kernel = torch.rand_like(layer.weight)
        layer.operator.weight = kernel * (0.97 / kernel.sum(dim=(1, 2, 3), keepdim=True))
        model.stems[0][1].bias.fill_(-1.0)
    model.after_step = lambda: None
    return model.to(device)


def memory_step(device, f_max_iter: int, batch: int) -> dict:
    model = slow_layer_model(device, f_max_iter)
    data = load("mnist_subset")
    images, labels = data.train_x[:batch].to(device), data.train_y[:batch].to(device)

    def step():
        logits, infos = model(images)
        F.cross_entropy(logits, labels).backward()
        return infos

    step()  # a first step pays one-time costs (kernel caches, thread pools): not measured
    model.zero_grad(set_to_none=True)
    memory = PeakMemory(device)
    memory.start()
    infos = step()
    return {"f_max_iter": f_max_iter, "forward_iterations": iterations(infos[0]), "peak_mb": memory.peak_mb()}


def memory_flatness(device, batch: int, budgets=(10, 100), processes: int = 5) -> list[dict]:
    """Peak memory of a training step per iteration budget: ``peak_mb`` the least and
    ``peak_mb_max`` the most over the measurements (``peaks_mb``).

    CUDA counts tensor bytes exactly: one measurement. A CPU peak is the resident set of a fresh
    process, ``processes`` of them per budget, interleaved: between otherwise identical processes
    it moves by one state tensor or so (8 MB at batch 32; allocator and thread-pool effects),
    so one process per budget can fake or hide a difference.
    """
    peaks: dict[int, list[dict]] = {budget: [] for budget in budgets}
    for _ in range(1 if device.type == "cuda" else processes):
        for budget in budgets:
            peaks[budget].append(_memory_measurement(device, budget, batch))
    return [
        {
            "f_max_iter": budget,
            "forward_iterations": runs[0]["forward_iterations"],
            "peak_mb": min(run["peak_mb"] for run in runs),
            "peak_mb_max": max(run["peak_mb"] for run in runs),
            "peaks_mb": [run["peak_mb"] for run in runs],
        }
        for budget, runs in peaks.items()
    ]


def _memory_measurement(device, budget: int, batch: int) -> dict:
    if device.type == "cuda":
        return memory_step(device, budget, batch)
    # A fixed mmap threshold makes glibc return freed tensor memory at once, so the resident
    # set follows the memory the tensors hold rather than the allocator's history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.micro", "--memory-child", str(budget), "--batch", str(batch)],
        stdout=subprocess.PIPE,  # (its stderr passes through: a failing child shows its traceback)
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def floor_lines(steps: dict, target: float = 0.75) -> list[str]:
    """What the floor says of a step ``target`` times the reference's, per model."""
    lines = []
    for name, rows in steps.items():
        if "reference" not in rows or "pcdeq" not in rows:
            continue
        base, floor, ours = rows["reference"]["ms"], rows[FLOOR]["ms"], rows["pcdeq"]["ms"]
        needed = target * base - floor  # what the equilibrium layer may cost in such a step
        said = f"{name}: the floor (no equilibrium layer) takes {floor:.1f} ms, {floor / base:.2f}x"
        said += " the reference's step"
        if base <= floor or needed <= 0:
            lines.append(f"{said}: no step can be {target}x the reference's.")
            continue
        lines.append(
            f"{said}, so no implementation of the layer gets below that. A step at "
            f"{target}x the reference's leaves the layer {needed:.1f} ms, "
            f"{needed / (base - floor):.2f}x of the reference's {base - floor:.1f} ms; pcdeq's takes "
            f"{ours - floor:.1f} ms ({(ours - floor) / (base - floor):.2f}x)."
        )
    return lines


def kernel_lines() -> list[str]:
    """What ``conv_algorithm="auto"`` chose for the pcDEQ products timed in this process."""
    return [
        f"pcdeq's product {product} on a {'x'.join(map(str, shape))} "
        f"{'NCHW' if nchw else 'channels-last'} state ({threads} threads): "
        f"{choice.algorithm} chosen; NNPACK {choice.nnpack_ms:.1f} ms, PyTorch's dispatch "
        f"{choice.pytorch_ms:.1f} ms ({choice.nnpack_ms / choice.pytorch_ms:.2f}x) per product."
        for (product, shape, _, nchw, threads), choice in conv_kernels.choices().items()
    ]


_GPU_HEADER = " GPU operations / step | GPU busy ms / step |"
_GPU_NOTE = (
    "GPU operations and busy time: the kernels, copies and memsets of the counted step, and "
    "their summed device time (`torch.profiler`). Where it is a small part of the step's time, "
    "the GPU waits on the host's dispatch of small operations (launch-bound), and the step's "
    "pace is the count of operations."
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=available_device, default="cpu")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--batch", type=training_batch_size, default=64)
    parser.add_argument("--models", nargs="+", default=["linear", "single_conv"], choices=ARCHITECTURES)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument(
        "--budgets", type=positive_int, nargs=2, default=[10, 100], help="the two f_max_iter compared"
    )
    parser.add_argument(
        "--memory-processes", type=positive_int, default=5, help="fresh processes per budget (CPU)"
    )
    parser.add_argument(
        "--out", default=None, help="results path stem (default benchmarks/results/micro_<device>)"
    )
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budgets[0] == args.budgets[1]:
        parser.error(f"--budgets compares two different f_max_iter, got {args.budgets[0]} twice")
    device = args.device
    if args.memory_child is not None:
        print(json.dumps(memory_step(device, args.memory_child, args.batch)))
        return None

    start = time.perf_counter()
    steps = {
        name: step_times(name, device, args.repeats, args.batch, args.bf16, args.kinds)
        for name in args.models
    }
    memory_batch = min(args.batch, 32)  # the slow layer's 100 iterations: keep the run short
    memory = memory_flatness(device, memory_batch, args.budgets, args.memory_processes)
    hardware = hardware_line(device)
    run_command = command("benchmarks.micro", argv)
    cuda = device.type == "cuda"
    lines = [
        f"Micro-benchmarks, median of {args.repeats} interleaved steps, batch {args.batch}"
        f"{', bf16 autocast' if args.bf16 else ''}, every kind at relative tolerance "
        f"{tolerance(args.bf16):g} (`{run_command}`)",
        f"Hardware: {hardware}",
        "",
        "| model | kind | forward iterations | operations / step | heavy passes / step | training step ms "
        "| relative to reference | above the floor, relative to reference's |" + _GPU_HEADER * cuda,
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * cuda,
    ]
    for name, rows in steps.items():
        base, floor = rows.get("reference", {}).get("ms"), rows[FLOOR]["ms"]
        for kind, row in rows.items():
            ratio = f"{row['ms'] / base:.2f}x" if base else "-"
            above = "-"
            if base and base > floor and kind in ("pcdeq", PYTORCH_CONV, "reference"):
                above = f"{(row['ms'] - floor) / (base - floor):.2f}x"
            gpu = ""
            if cuda and row["gpu_ops"] is None:
                gpu = " - | - |"
            elif cuda:
                gpu = f" {row['gpu_ops']} | {row['gpu_busy_ms']:.2f} |"
            lines.append(
                f"| {name} | {kind} | {row['iterations']:.1f} | {row['ops']} | {row['passes']} "
                f"| {row['ms']:.1f} | {ratio} | {above} |{gpu}"
            )
    lines += ["", *floor_lines(steps), *kernel_lines()]
    if cuda:
        lines.append(_GPU_NOTE)
    measured = (
        "exact tensor bytes" if device.type == "cuda" else f"{len(memory[0]['peaks_mb'])} fresh processes"
    )
    lines += [
        "",
        f"| pcDEQ training step (single conv, slow layer, batch {memory_batch}, float32), {measured} "
        "| forward iterations "
        "| peak memory MB, least | most | every measurement |",
        "|---|---:|---:|---:|---|",
    ]
    for row in memory:
        every = ", ".join(f"{peak:.1f}" for peak in row["peaks_mb"])
        lines.append(
            f"| f_max_iter {row['f_max_iter']} | {row['forward_iterations']:.0f} | {row['peak_mb']:.1f} "
            f"| {row['peak_mb_max']:.1f} | {every} |"
        )
    ratio = memory[1]["peak_mb"] / max(memory[0]["peak_mb"], 1e-9)
    ratio_max = memory[1]["peak_mb_max"] / max(memory[0]["peak_mb_max"], 1e-9)
    lines.append(
        f"\nPeak memory, f_max_iter {memory[1]['f_max_iter']} over {memory[0]['f_max_iter']}: {ratio:.3f}x "
        f"(least peaks), {ratio_max:.3f}x (most) (run took {time.perf_counter() - start:.0f} s)"
    )
    print("\n".join(lines))
    out = results_stem(args.out, RESULTS / f"micro_{device.type}", args.bf16)
    result = {
        "command": run_command,
        "hardware": hardware,
        "steps": steps,
        "tolerance": tolerance(args.bf16),
        "memory": memory,
        "memory_batch": memory_batch,
        "memory_ratio": ratio,
        "memory_ratio_most": ratio_max,
        "bf16": args.bf16,
        "conv_choices": [
            dict(product=product, state=list(shape), nchw=nchw, threads=threads, **dataclasses.asdict(choice))
            for (product, shape, _, nchw, threads), choice in conv_kernels.choices().items()
        ],
    }
    write_results(out, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    run_as_command(main)

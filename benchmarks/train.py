"""Train and evaluate pcDEQ and its baselines side by side: same data, architecture, batch, seed.

    python -m benchmarks.train --model linear --dataset mnist_subset --epochs 10
    python -m benchmarks.train --model single_conv --dataset mnist_subset --kinds pcdeq reference
    python -m benchmarks.train --model multi_conv --dataset cifar10 --data-dir ~/data --device cuda --bf16

Kinds (``benchmarks.baselines``): ``pcdeq`` (this plugin), ``torchdeq_anderson`` and
``torchdeq_fixed_point`` (TorchDEQ's standard DEQ, unconstrained), ``reference`` (the reference
implementation's way). The kinds' epochs alternate (epoch 1 of every kind, then epoch 2, ...),
each kind with its own data order and RNG, so timing drift hits them alike. Per epoch: train and
test loss and accuracy, mean forward and backward iterations (calls of f per solve, whatever
each solver's own ``nstep`` means), the fraction of solves (samples x equilibrium layers) that
reached the tolerance, forward and backward in training and forward at test (the table gives
each one's worst epoch), seconds per epoch and peak memory during the epoch's training (CUDA:
allocated by tensors; CPU: resident set above the epoch's start, see ``benchmarks.memory``).
Every kind stops at one relative tolerance, 1e-4, or under ``--bf16`` the coarser one a bfloat16
pcDEQ solve can resolve (``benchmarks.baselines.tolerance``). A last training batch of one image
joins the one before (batch normalization cannot train on one sample). Before its first epoch,
each kind makes an untimed forward and backward pass at each batch size, then undone
(``Run.warm_up``).
Results go to ``benchmarks/results/train_<model>_<dataset>_<device>.json`` and ``.md``;
``--plots`` adds PNG plots next to them.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
import torchdeq
from tqdm import tqdm

from benchmarks.baselines import KINDS, REFERENCE_VARIANTS, build, tolerance
from benchmarks.cli import (
    available_device,
    command,
    configuring,
    nonnegative_int,
    path_with,
    positive_float,
    positive_int,
    results_stem,
    run_as_command,
    training_batch_size,
    write_results,
)
from benchmarks.data import DATASETS, augment, load
from benchmarks.memory import PeakMemory
from benchmarks.micro import iterations
from benchmarks.solver_overhead import hardware_line

RESULTS = pathlib.Path(__file__).parent / "results"
WEIGHT_DECAY = {"mnist": 1.5e-2, "digits": 1.5e-2}  # 2e-2 for SVHN and CIFAR-10 (docs/method.md)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="linear", choices=["linear", "single_conv", "multi_conv"])
    parser.add_argument("--dataset", default="mnist_subset", choices=DATASETS)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument(
        "--milestone", type=positive_int, default=None, help="epoch of the x0.1 drop (default 3/4)"
    )
    parser.add_argument("--batch-size", type=training_batch_size, default=64)
    parser.add_argument("--lr", type=positive_float, default=5e-4)
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="initialisation and data order (the split is fixed)"
    )
    parser.add_argument(
        "--train-subset", type=training_batch_size, default=None, help="use only this many training images"
    )
    parser.add_argument(
        "--test-subset", type=positive_int, default=None, help="use only this many test images"
    )
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="width override")
    parser.add_argument(
        "--activation", default="tanh", help="pcDEQ activation: tanh (pcDEQ-1), sigmoid (pcDEQ-2)"
    )
    parser.add_argument("--augment", action="store_true", help="RandomCrop(32, 4) + flip (CIFAR-10 only)")
    parser.add_argument("--device", type=available_device, default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing data")
    parser.add_argument(
        "--out",
        default=None,
        help="results path stem (default benchmarks/results/train_<model>_<dataset>_<device>)",
    )
    parser.add_argument("--plots", action="store_true", help="write PNG plots next to the results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.augment and not args.dataset.endswith("cifar10"):
        parser.error(f"--augment is the CIFAR-10 recipe (32x32 crops, flips); got --dataset {args.dataset}")
    if "reference" in args.kinds and args.activation not in REFERENCE_VARIANTS:
        parser.error(
            f"the reference kind has pcDEQ-1 (tanh) and pcDEQ-2 (sigmoid) layers, not --activation "
            f"{args.activation}; leave it out of --kinds"
        )
    args.milestone = args.milestone or max(1, (3 * args.epochs) // 4)
    args.tol = tolerance(args.bf16)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    with configuring():
        data = load(args.dataset, args.data_dir, args.download).subset(args.train_subset, args.test_subset)
        channels = (
            None
            if args.channels is None
            else (args.channels[0] if len(args.channels) == 1 else tuple(args.channels))
        )
        trainings = {}
        for kind in args.kinds:
            torch.manual_seed(args.seed)
            shapes = "cifar10_aug" if args.augment else data.model_dataset
            model = build(
                kind, args.model, shapes, channels=channels, activation=args.activation, tol=args.tol
            ).to(device)
            print(
                f"{kind}: {args.model} on {data.name}{' (synthetic)' if data.synthetic else ''}, "
                f"{sum(p.numel() for p in model.parameters()):,} parameters"
            )
            trainings[kind] = Run(kind, model, data, args, device)
    for run in trainings.values():
        run.warm_up()
    # The kinds' epochs alternate: a machine whose speed drifts during the run (shared CPUs,
    # clocks) then slows every kind alike, and the per-epoch times compare like with like.
    for epoch in range(1, args.epochs + 1):
        for run in trainings.values():
            run.epoch(epoch)
    runs = {kind: run.history for kind, run in trainings.items()}
    traces, certified = {}, None
    probe = data.test_x[:16].to(device)  # one small test batch for the per-iteration traces
    if args.plots:
        for kind, run in trainings.items():
            traces[kind] = residual_trace(run.model, kind, probe)
            if kind == "pcdeq":
                certified = enclosure_trace(run.model, probe)
    report = {
        "command": command("benchmarks.train", argv),
        "hardware": hardware_line(device),
        "model": args.model,
        "dataset": data.name,
        "synthetic": data.synthetic,
        "train_size": len(data.train_x),
        "test_size": len(data.test_x),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "lr": args.lr,
        "milestone": args.milestone,
        "activation": args.activation,
        "tolerance": args.tol,
        "bf16": args.bf16,
        "augment": args.augment,
        "seed": args.seed,
        "runs": runs,
    }
    if certified is not None:
        report["pcdeq_certificate"] = {k: v for k, v in certified.items() if k not in ("bounds", "residuals")}
    stem = results_stem(args.out, RESULTS / f"train_{args.model}_{data.name}_{device.type}", args.bf16)
    write_results(stem, report, markdown(report))
    print(markdown(report))
    if args.plots:
        from benchmarks import plots

        plots.training_curves(report, path_with(stem, "_curves.png"))
        title = f"first equilibrium layer, trained {args.model}, 16 test images"
        plots.residual_traces(
            {k: v for k, v in traces.items() if v[0]}, path_with(stem, "_residuals.png"), title, args.tol
        )
        if certified is not None:
            plots.enclosure_gap(
                certified["bounds"],
                certified["residuals"],
                path_with(stem, "_enclosure.png"),
                title,
            )
    return report


@torch.no_grad()
def residual_trace(model, kind: str, images) -> tuple[list[int], list[float]]:
    """Mean relative residual of the first equilibrium layer's solve, and the iterations (calls
    of ``f``) they were measured at."""
    model.eval()
    core = model.cores[0]
    if kind == "pcdeq":
        every, core.check_every = core.check_every, 1
        try:
            info = model(images)[1][0]
        finally:
            core.check_every = every
        return info["trace_steps"].tolist(), info["rel_trace"].mean(dim=0).tolist()
    if kind.startswith("torchdeq"):
        info = model(images)[1][0]
        # TorchDEQ's traces start with a placeholder column and, once the solve stops, repeat
        # the lowest values up to the budget. fixed_point_iter's column j is call j; Anderson
        # calls f twice before its first residual, so its column j is call j + 2.
        offset = 2 if kind == "torchdeq_anderson" else 0
        last = int(iterations(info))
        steps = list(range(1 + offset, last + 1))
        return steps, info["rel_trace"][:, 1 : 1 + len(steps)].mean(dim=0).tolist()
    return [], []  # the reference records no trace


@torch.no_grad()
def enclosure_trace(model, images) -> dict:
    """The certificates of the trained first equilibrium layer on a batch.

    Per iteration: the enclosure's certified bound (relative to max|z|) and the plain solve's
    relative residual; at the end: the worst bound and the worst rate bound.
    """
    model.eval()
    layer, stem = model.layers[0], model.stems[0]
    x = layer.inject(stem(images))
    config = {"core": "pcdeq", "pcdeq_check_every": 1, "f_tol": 1e-5}
    core = torchdeq.get_deq(config, pcdeq_enclosure=True, pcdeq_rate_bound=True).eval()
    _, info = core(lambda z: layer(z, x), torch.zeros_like(x))
    _, plain = torchdeq.get_deq(config).eval()(lambda z: layer(z, x), torch.zeros_like(x))
    return {
        "bounds": info["rel_trace"].mean(dim=0).tolist(),
        "residuals": plain["rel_trace"].mean(dim=0).tolist(),
        "relative_error_bound": info["rel_trace"][:, -1].max().item(),
        "enclosure_iterations": int(info["trace_steps"][-1]),
        "rate_bound": info["rate_bound"].max().item(),
    }


class Run:
    """The training of one kind, an epoch at a time: its model, optimizer, data order and RNG.

    Each run keeps its own data order (a generator seeded with ``--seed``) and its own state of
    the global RNGs (the CPU's and, on CUDA, the device's), so its results do not depend on the
    other runs whose epochs alternate with its own.
    """

    def __init__(self, kind: str, model, data, args, device):
        self.kind, self.model, self.data, self.args, self.device = kind, model, data, args, device
        weight_decay = WEIGHT_DECAY.get(data.model_dataset, 2e-2)
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=[args.milestone], gamma=0.1)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.rng = self._rng_state()
        self.history: list[dict] = []

    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def epoch(self, epoch: int) -> dict:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            cpu, cuda = self.rng
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            row = self._epoch(epoch)
            self.rng = self._rng_state()
        self.history.append(row)
        print(
            f"  {self.kind} epoch {epoch:3d}: train {100 * row['train_accuracy']:5.2f}% "
            f"(loss {row['train_loss']:.3f})  test {100 * row['test_accuracy']:5.2f}%  "
            f"fwd {row['train_forward_iterations']:.1f} bwd {row['train_backward_iterations']:.1f} it  "
            f"converged {100 * row['train_converged']:.1f}% fwd "
            f"{100 * row['train_backward_converged']:.1f}% bwd  {row['seconds']:.1f} s  "
            f"{row['peak_memory_mb']:.1f} MB"
        )
        return row

    def warm_up(self) -> None:
        """One untimed forward and backward at each batch size of an epoch, then undone (weights,
        normalization statistics, gradients, RNG): the first call at a shape pays one-time costs
        (pcdeq's "auto" convolution kernels are timed then, oneDNN builds its primitives) that
        would otherwise land in this kind's first epoch only."""
        state = copy.deepcopy(self.model.state_dict())
        self.model.train()
        sizes = {
            batch.stop - batch.start
            for batch in training_batches(len(self.data.train_x), self.args.batch_size)
        }
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for size in sorted(sizes):
                images, labels = self._batch(torch.arange(size), torch.Generator().manual_seed(0))
                self._loss(images, labels)[0].backward()
        self.model.load_state_dict(state)
        self.opt.zero_grad(set_to_none=True)

    def _batch(self, idx, generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.data.train_x[idx], self.data.train_y[idx]
        if self.args.augment:
            images = augment(images, generator, fill=self.data.black)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _loss(self, images, labels, backward_writer=None):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            logits, infos = self.model(images, backward_writer=backward_writer)
            return F.cross_entropy(logits.float(), labels), logits, infos

    def _epoch(self, epoch: int) -> dict:
        model, data, args, device = self.model, self.data, self.args, self.device
        model.train()
        stats = _Stats(args.tol)
        memory = PeakMemory(device)
        memory.start()
        start = time.perf_counter()
        order = torch.randperm(len(data.train_x), generator=self.gen)
        desc = f"{self.kind} epoch {epoch}"
        for batch in tqdm(
            training_batches(len(order), args.batch_size), desc=desc, leave=False, disable=args.quiet or None
        ):
            images, labels = self._batch(order[batch], self.gen)
            loss, logits, infos = self._loss(images, labels, stats.backward)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            model.after_step()
            stats.batch(loss, logits, labels, infos)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak_memory_mb = memory.peak_mb()  # the training's, before the test set is evaluated
        self.schedule.step()
        return {
            "epoch": epoch,
            **stats.summary("train"),
            **evaluate(model, data, args, device),
            "seconds": seconds,
            "peak_memory_mb": peak_memory_mb,
        }


def training_batches(n: int, size: int) -> list[slice]:
    """Batches of ``size`` over ``n`` images; a last batch of one image joins the one before:
    batch normalization cannot train on a single sample."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, [*starts[1:], n], strict=True)]


@torch.no_grad()
def evaluate(model, data, args, device) -> dict:
    model.eval()
    stats = _Stats(args.tol)
    for i in range(0, len(data.test_x), args.batch_size):
        images = data.test_x[i : i + args.batch_size].to(device)
        labels = data.test_y[i : i + args.batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits, infos = model(images)
        stats.batch(F.cross_entropy(logits.float(), labels), logits, labels, infos)
    return stats.summary("test")


class _Stats:
    """Running means of one epoch; per-sample convergence over every equilibrium layer, forward
    and backward solves apart (where a solver reports no ``converged``, its lowest relative
    residual against ``tol``)."""

    def __init__(self, tol: float):
        self.tol = tol
        self.loss, self.correct, self.seen = 0.0, 0, 0
        self.forward, self.backward_steps = [], []
        self.converged, self.solves, self.backward_converged, self.backward_solves = 0, 0, 0, 0

    def _converged(self, info: dict) -> torch.Tensor:
        return info["converged"] if "converged" in info else info["rel_lowest"] <= self.tol

    def backward(self, info: dict) -> None:
        self.backward_steps.append(iterations(info))
        converged = self._converged(info)
        self.backward_converged += int(converged.sum())
        self.backward_solves += converged.numel()

    def batch(self, loss, logits, labels, infos) -> None:
        n = len(labels)
        self.loss += loss.item() * n
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.seen += n
        for info in infos:
            self.forward.append(iterations(info))
            converged = self._converged(info)
            self.converged += int(converged.sum())
            self.solves += converged.numel()

    def summary(self, split: str) -> dict:
        mean = lambda values: statistics.fmean(values) if values else float("nan")  # noqa: E731
        fraction = lambda part, whole: part / whole if whole else float("nan")  # noqa: E731
        return {
            f"{split}_loss": self.loss / self.seen,
            f"{split}_accuracy": self.correct / self.seen,
            f"{split}_forward_iterations": mean(self.forward),
            f"{split}_backward_iterations": mean(self.backward_steps),
            f"{split}_converged": fraction(self.converged, self.solves),
            f"{split}_backward_converged": fraction(self.backward_converged, self.backward_solves),
        }


def markdown(report: dict) -> str:
    synthetic = " (synthetic data)" if report["synthetic"] else ""
    lines = [
        f"Training: {report['model']} on {report['dataset']}{synthetic}, "
        f"{report['train_size']} train / {report['test_size']} test images, batch {report['batch_size']}, "
        f"{report['epochs']} epochs (lr {report['lr']:g}, x0.1 after epoch {report['milestone']}), "
        f"seed {report['seed']}, pcDEQ activation {report['activation']}, every kind at relative "
        f"tolerance {report['tolerance']:g}"
        f"{', bf16 autocast' if report['bf16'] else ''}{', augmented' if report['augment'] else ''}",
        f"Command: `{report['command']}`",
        f"Hardware: {report['hardware']}",
        "",
        "| kind | test accuracy | train accuracy | fwd iterations | bwd iterations "
        "| solves converged, train fwd (worst epoch) | train bwd (worst epoch) | test (worst epoch) "
        "| s / epoch (median) | peak memory MB (above epoch start) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, history in report["runs"].items():
        last = history[-1]
        seconds = statistics.median(row["seconds"] for row in history)
        worst = ("train_converged", "train_backward_converged", "test_converged")
        converged = [min(row[key] for row in history) for key in worst]
        lines.append(
            f"| {kind} | {100 * last['test_accuracy']:.2f}% | {100 * last['train_accuracy']:.2f}% | "
            f"{last['train_forward_iterations']:.1f} | {last['train_backward_iterations']:.1f} | "
            + " | ".join(f"{100 * fraction:.2f}%" for fraction in converged)
            + f" | {seconds:.2f} | {max(row['peak_memory_mb'] for row in history):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_as_command(main)

"""Data-parallel pcDEQ training with ``torch.nn.parallel.DistributedDataParallel``.

Launch with ``torchrun``, one process per GPU (NCCL) or per CPU worker (gloo)::

    torchrun --standalone --nproc_per_node 8 examples/train_ddp.py --steps 500
    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --mechanisms project

Each rank trains a digits classifier (scikit-learn's 8x8 digits, split across ranks) whose
equilibrium layer keeps ``W >= 0`` with one of the nonnegativity mechanisms:

* ``weight_norm``, ``parametrize``, ``project``: a :class:`~torchdeq_pcdeq.PcDEQLinear` with that
  mechanism (``project`` clamps after every optimizer step, on every rank alike);
* ``pcdeq_nonneg``: a plain ``nn.Linear`` constrained by ``torchdeq.apply_norm(...,
  norm_type="pcdeq_nonneg")``, as an existing TorchDEQ model would be.

DDP averages the gradients, so the ranks take identical steps. With ``--out DIR`` every rank
writes its final parameters (``rank{R}_{mechanism}.pt``) and a log of the steps
(``rank{R}.json``: global mean loss, smallest weight entry, forward and backward solves
converged), which the
test ``tests/test_distributed.py`` compares across ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchdeq
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchdeq_pcdeq
from torchdeq_pcdeq import PcDEQLinear, attach_projection, reference_init_

MECHANISMS = ("weight_norm", "parametrize", "project", "pcdeq_nonneg")


class DigitsDEQ(nn.Module):
    """``head(z*)`` with ``z* = tanh(W z* + x)``, ``x`` an admissible injection of the image."""

    def __init__(self, mechanism: str, width: int = 32):
        super().__init__()
        self.encoder = nn.Linear(64, width)
        if mechanism == "pcdeq_nonneg":
            self.cell = nn.Linear(width, width, bias=False)
            reference_init_(self.cell.weight)
            torchdeq.apply_norm(self.cell, norm_type="pcdeq_nonneg")
        else:
            self.cell = PcDEQLinear(width, "tanh", nonnegativity=mechanism)
        self.deq = torchdeq.get_deq(core="pcdeq")
        self.head = nn.Linear(width, 10)

    @property
    def weight(self) -> torch.Tensor:
        """The equilibrium layer's effective weight ``W``."""
        return self.cell.weight

    def forward(self, images: torch.Tensor, backward_writer=None) -> tuple[torch.Tensor, dict]:
        x = F.softplus(self.encoder(images), beta=5.0) + 1e-6  # strictly positive: pcDEQ-1
        if isinstance(self.cell, PcDEQLinear):
            step = lambda z: self.cell(z, x)  # noqa: E731
        else:
            step = lambda z: torch.tanh(self.cell(z) + x)  # noqa: E731
        z_out, info = self.deq(step, torch.zeros_like(x), backward_writer=backward_writer)
        return self.head(z_out[-1]), info


def train(mechanism: str, args, device: torch.device, data) -> dict:
    """Train one model for ``args.steps`` steps; return this rank's log."""
    rank, world = dist.get_rank(), dist.get_world_size()
    images, labels = data
    torch.manual_seed(args.seed + rank)  # different initialisations: DDP must broadcast rank 0's
    model = DigitsDEQ(mechanism).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    if mechanism == "project":
        attach_projection(optimizer, model)

    shard = torch.arange(rank, len(labels), world)  # a disjoint slice of the data per rank
    generator = torch.Generator().manual_seed(args.seed + rank)
    log = {"loss": [], "min_weight": [], "converged": []}
    backward = []  # the backward solve's statistics, written during loss.backward()
    for _ in range(args.steps):
        batch = shard[torch.randint(len(shard), (args.batch_size,), generator=generator)]
        logits, info = ddp(images[batch], backward_writer=backward.append)
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        with torch.no_grad():
            log["loss"].append(mean_loss.item() / world)
            log["min_weight"].append(model.weight.min().item())
            solves = [info, *backward]  # forward and backward
            log["converged"].append(len(solves) == 2 and all(bool(i["converged"].all()) for i in solves))
        backward.clear()
    if args.out:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, Path(args.out) / f"rank{rank}_{mechanism}.pt")
    return log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may wait")
    parser.add_argument("--out", default=None, help="directory for each rank's parameters and log")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)  # one core per worker
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        digits = load_digits()
        data = (
            torch.tensor(digits.data / 16.0, dtype=torch.float32, device=device),
            torch.tensor(digits.target, device=device),
        )
        logs = {mechanism: train(mechanism, args, device, data) for mechanism in args.mechanisms}
        rank = dist.get_rank()
        if args.out:
            meta = {
                "world_size": dist.get_world_size(),
                "backend": backend,
                "plugin": torchdeq_pcdeq.__version__,
            }
            (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({**meta, "logs": logs}))
        if rank == 0:
            for mechanism, log in logs.items():
                losses = log["loss"]
                print(
                    f"{mechanism:>12}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                    f"min W {min(log['min_weight']):.3g}, converged {sum(log['converged'])}/{len(losses)}"
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

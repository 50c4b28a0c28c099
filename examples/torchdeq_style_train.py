"""A training script written for TorchDEQ alone: it never imports torchdeq_pcdeq.

It follows TorchDEQ's own example models (``add_deq_args``, ``apply_norm(f, args=args)``,
``get_deq(args)``, ``reset_norm(f)`` at each forward) and trains a small DEQ classifier on the
8x8 digits shipped with scikit-learn. Switch it to pcDEQ with flags only:

    python -m torchdeq_pcdeq examples/torchdeq_style_train.py --core pcdeq --norm_type pcdeq_nonneg

Its last output line is a JSON summary (used by the tests).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchdeq import add_deq_args, apply_norm, get_deq, reset_norm


class DEQLayer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.linear.weight, std=0.01)

    def forward(self, z, u):
        return torch.tanh(self.linear(z) + u)


class Model(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.injection = args.injection
        self.inj = nn.Linear(64, args.width)
        self.f = DEQLayer(args.width)
        apply_norm(self.f, args=args)
        self.deq = get_deq(args)
        self.head = nn.Linear(args.width, 10)

    def forward(self, x):
        reset_norm(self.f)
        u = self.inj(x)
        if self.injection == "softplus":
            u = F.softplus(u, beta=5) + 1e-6
        z_out, info = self.deq(lambda z: self.f(z, u), torch.zeros_like(u))
        return self.head(z_out[-1]), info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_deq_args(parser)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--injection", choices=["softplus", "linear"], default="softplus")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    digits = load_digits()
    data = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    model = Model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    losses, nsteps, converged = [], [], []
    for epoch in range(args.epochs):
        order = torch.randperm(len(data))
        for i in range(0, len(data), args.batch_size):
            idx = order[i : i + args.batch_size]
            logits, info = model(data[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            nsteps.append(info["nstep"].max().item())
            if "converged" in info:
                converged.append(info["converged"].float().mean().item())
        print(f"epoch {epoch}: loss {sum(losses[-10:]) / 10:.3f}, max nstep {max(nsteps[-10:]):.0f}")

    model.eval()
    with torch.no_grad():
        accuracy = (model(data)[0].argmax(1) == labels).float().mean().item()
    summary = {
        "core": type(model.deq).__name__,
        "loss_first": sum(losses[:5]) / 5,
        "loss_last": sum(losses[-5:]) / 5,
        "train_accuracy": accuracy,
        "weight_min": model.f.linear.weight.min().item(),
        "nstep_max": max(nsteps),
        "f_max_iter": model.deq.f_max_iter,
        "converged_fraction": min(converged) if converged else None,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

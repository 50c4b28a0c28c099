"""Train a small pcDEQ classifier on the 8x8 digits shipped with scikit-learn.

The model mirrors the reference linear pcDEQ (docs/method.md, section 4) at digit size:
Linear(64, 64) -> BatchNorm -> admissible injection -> pcDEQ[tanh, W >= 0] -> BatchNorm -> Linear(64, 10),
trained with AdamW and implicit differentiation. Each epoch prints accuracy, forward and
backward iterations, the worst final residual and the fraction of converged solves.

Run: ``python examples/train_digits.py`` (``--epochs``, 12 by default).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchdeq
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from torchdeq_pcdeq import PcDEQLinear


class DigitsPcDEQ(nn.Module):
    def __init__(self, width: int = 64, activation: str = "tanh"):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width))
        self.f = PcDEQLinear(width, activation)
        self.deq = torchdeq.get_deq(core="pcdeq")
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, 10))

    def forward(self, images: torch.Tensor, backward_writer=None):
        x = self.f.inject(self.encoder(images))
        z_out, info = self.deq(lambda z: self.f(z, x), torch.zeros_like(x), backward_writer=backward_writer)
        return self.head(z_out[-1]), info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=args.seed, stratify=digits.target
    )
    x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

    model = DigitsPcDEQ(activation=args.activation)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1.5e-2)
    print(
        f"pcDEQ on scikit-learn digits: {len(x_train)} train / {len(x_test)} test, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, activation {args.activation}"
    )
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train))
        losses, f_steps, b_steps, residuals, converged = [], [], [], [], []

        def record_backward(backward_info, b_steps=b_steps):
            b_steps.append(backward_info["nstep"].mean().item())

        batches = tqdm(
            range(0, len(order), args.batch_size), desc=f"epoch {epoch:2d}", leave=False, disable=None
        )
        for i in batches:
            idx = order[i : i + args.batch_size]
            logits, info = model(x_train[idx], backward_writer=record_backward)
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            f_steps.append(info["nstep"].mean().item())
            residuals.append(info["rel_lowest"].max().item())
            converged.append(info["converged"].float().mean().item())
            batches.set_postfix(loss=f"{loss.item():.3f}")
        accuracy, test_info = evaluate(model, x_test, y_test)
        print(
            f"epoch {epoch:2d}  loss {sum(losses) / len(losses):.3f}  test acc {100 * accuracy:5.2f}%  "
            f"fwd iters {sum(f_steps) / len(f_steps):4.1f}  bwd iters {sum(b_steps) / len(b_steps):4.1f}  "
            f"worst rel residual {max(residuals):.1e}  converged {100 * min(converged):.0f}%  "
            f"W_min {model.f.weight.min().item():.1e}"
        )
    seconds = time.perf_counter() - start
    certificates = certify(model, x_test)
    report = {
        "test_accuracy": accuracy,
        "test_forward_iterations": test_info["nstep"].mean().item(),
        "test_converged": test_info["converged"].float().mean().item(),
        "seconds": seconds,
    }
    print(
        f"done in {seconds:.1f} s: test accuracy {100 * accuracy:.2f}%, "
        f"{report['test_forward_iterations']:.1f} forward iterations on average, "
        f"{100 * report['test_converged']:.0f}% of test solves converged"
    )
    print(
        f"certificates on the test set: |z - z*| <= {certificates['error_bound'].max():.1e} (enclosure), "
        f"spectral radius of df/dz <= {certificates['rate_bound'].max():.6f} (rate bound), "
        f"smallest injection {certificates['min_injection'].min():.1e}"
    )
    report.update({key: certificates[key].max().item() for key in ("error_bound", "rate_bound")})
    return report


@torch.no_grad()
def certify(model: DigitsPcDEQ, images: torch.Tensor) -> dict:
    """Solve the test set with the certified enclosure and the rate bound."""
    model.eval()
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_enclosure=True, pcdeq_rate_bound=True).eval()
    x = model.f.inject(model.encoder(images))
    _, info = deq(lambda z: model.f(z, x), torch.zeros_like(x))
    return info


@torch.no_grad()
def evaluate(model: DigitsPcDEQ, images: torch.Tensor, labels: torch.Tensor):
    model.eval()
    logits, info = model(images)
    return (logits.argmax(1) == labels).float().mean().item(), info


if __name__ == "__main__":
    main()

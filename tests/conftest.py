"""Shared helpers: small pcDEQ instances with known structure, and the CUDA marker."""

from __future__ import annotations

import pytest
import torch

import torchdeq_pcdeq
from torchdeq_pcdeq import PcDEQConv2d, PcDEQLinear, get_activation

ACTIVATIONS = ["tanh", "softsign", "relu6", "sigmoid"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def set_weight(layer, weight: torch.Tensor) -> None:
    """Give a 'project'-mode layer an explicit nonnegative weight."""
    with torch.no_grad():
        layer.operator.weight.copy_(weight)


def dense_instance(n=12, activation="tanh", batch=3, scale=1.5, seed=0, dtype=torch.float64):
    """A PcDEQLinear with a weight large enough for a nontrivial Jacobian, and an injection."""
    gen = torch.Generator().manual_seed(seed)
    f = PcDEQLinear(n, activation, nonnegativity="project", dtype=dtype)
    set_weight(f, torch.rand(n, n, generator=gen, dtype=dtype) * (2 * scale / n))
    x = f.inject(torch.randn(batch, n, generator=gen, dtype=dtype))
    return f, x


def conv_instance(channels=3, activation="tanh", batch=2, size=5, scale=1.5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f = PcDEQConv2d(channels, activation, nonnegativity="project", dtype=dtype)
    fan = channels * 9
    set_weight(f, torch.rand(channels, channels, 3, 3, generator=gen, dtype=dtype) * (2 * scale / fan))
    x = f.inject(torch.randn(batch, channels, size, size, generator=gen, dtype=dtype))
    return f, x


def upper_bound(activation: str, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, get_activation(activation).supremum)


def iterate(f, x, z, steps):
    out = [z]
    for _ in range(steps):
        z = f(z, x)
        out.append(z)
    return out


@pytest.fixture
def clean_activation_registry():
    """Remove activations registered by a test."""
    before = set(torchdeq_pcdeq.available_activations())
    yield
    for name in set(torchdeq_pcdeq.available_activations()) - before:
        torchdeq_pcdeq.unregister_activation(name)

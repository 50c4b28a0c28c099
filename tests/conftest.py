"""Shared helpers: small pcDEQ instances with known structure, and the CUDA marker."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import torchdeq_pcdeq
from torchdeq_pcdeq import PcDEQConv2d, PcDEQLinear, get_activation

ACTIVATIONS = ["tanh", "softsign", "relu6", "sigmoid"]

# The property tests draw the same examples on every run, so that a green run here is a green
# CI run (a random draw once found a failing case only on a later run). HYPOTHESIS_PROFILE=explore
# draws new examples each run, to look for more.
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def set_weight(layer, weight: torch.Tensor) -> None:
    """Give a layer an explicit nonnegative weight, through its nonnegativity mechanism."""
    if layer.nonnegativity == "project":
        with torch.no_grad():
            layer.operator.weight.copy_(weight)
    else:  # parametrize's setter goes through right_inverse: the layer then computes `weight`
        layer.operator.weight = weight


def dense_instance(
    n=12, activation="tanh", batch=3, scale=1.5, seed=0, dtype=torch.float64, nonnegativity="project"
):
    """A PcDEQLinear with a weight large enough for a nontrivial Jacobian, and an injection."""
    gen = torch.Generator().manual_seed(seed)
    f = PcDEQLinear(n, activation, nonnegativity=nonnegativity, dtype=dtype)
    set_weight(f, torch.rand(n, n, generator=gen, dtype=dtype) * (2 * scale / n))
    x = f.inject(torch.randn(batch, n, generator=gen, dtype=dtype))
    return f, x


def conv_instance(
    channels=3,
    activation="tanh",
    batch=2,
    size=5,
    scale=1.5,
    seed=0,
    dtype=torch.float64,
    nonnegativity="project",
):
    """A PcDEQConv2d with a weight large enough for a nontrivial Jacobian, and an injection."""
    gen = torch.Generator().manual_seed(seed)
    f = PcDEQConv2d(channels, activation, nonnegativity=nonnegativity, dtype=dtype)
    fan = channels * 9
    set_weight(f, torch.rand(channels, channels, 3, 3, generator=gen, dtype=dtype) * (2 * scale / fan))
    x = f.inject(torch.randn(batch, channels, size, size, generator=gen, dtype=dtype))
    return f, x


# Every layer's instance builder: the property tests of test_core.py and test_certify.py run on
# each entry (add a new layer's builder here).
INSTANCES = [dense_instance, conv_instance]
MODES = ["weight_norm", "parametrize", "project"]


def upper_bound(activation: str, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, get_activation(activation).supremum)


def iterate(f, x, z, steps):
    out = [z]
    for _ in range(steps):
        z = f(z, x)
        out.append(z)
    return out


def forget_warnings(monkeypatch) -> None:
    """Let the warnings said once per process be said again in this test, without using them up
    for the tests that check them."""
    monkeypatch.setattr(torchdeq_pcdeq.errors, "_warned_once", set())


@pytest.fixture
def clean_activation_registry():
    """Remove activations registered by a test."""
    before = set(torchdeq_pcdeq.available_activations())
    yield
    for name in set(torchdeq_pcdeq.available_activations()) - before:
        torchdeq_pcdeq.unregister_activation(name)

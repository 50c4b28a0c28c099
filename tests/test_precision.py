"""Low precision under autocast: positive injections, honest stopping, finite training steps.

float16 and bfloat16 autocast on the CPU here, and on CUDA when a GPU is present (the ``cuda``
cases skip cleanly without one).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torchdeq
from torch import nn

from conftest import forget_warnings
from torchdeq_pcdeq import (
    InvalidInputError,
    NonFiniteError,
    PcDEQConv2d,
    PcDEQLinear,
    PcDEQWarning,
    attach_projection,
    rate_bound,
)
from torchdeq_pcdeq.rounding import resolution_floor

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
]


GRADIENTS = {
    "ift": {},
    "hook_ift": {"hook_ift": True},
    "certified ift": {"pcdeq_rate_bound": True},  # calls f again inside backward()
}


class ConvClassifier(nn.Module):
    def __init__(self, channels: int = 8, **config):
        super().__init__()
        self.encoder = nn.Conv2d(1, channels, 3, padding=1)
        self.f = PcDEQConv2d(channels, "tanh")
        self.deq = torchdeq.get_deq(
            core="pcdeq", f_tol=1e-6, b_tol=1e-6, f_max_iter=300, b_max_iter=300, **config
        )
        self.head = nn.Linear(channels, 10)

    def forward(self, images, backward_writer=None):
        x = self.f.inject(self.encoder(images))
        z_out, info = self.deq(lambda z: self.f(z, x), torch.zeros_like(x), backward_writer=backward_writer)
        return self.head(z_out[-1].mean((2, 3))), x, z_out[-1], info


@pytest.mark.parametrize("gradient", list(GRADIENTS))
@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_a_training_step_under_autocast_is_finite_converged_and_stops_at_the_resolution(
    device, dtype, gradient, monkeypatch
):
    torch.manual_seed(0)
    model = ConvClassifier(**GRADIENTS[gradient]).to(device)
    images = (torch.rand(16, 1, 12, 12, device=device) - 0.5) * 40  # many injections underflow
    labels = torch.arange(16, device=device) % 10
    forget_warnings(monkeypatch)  # said once per process
    backward_stats = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device, dtype=dtype):
            logits, x, z, info = model(images, backward_writer=backward_stats.append)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
    said = [str(w.message) for w in caught if issubclass(w.category, PcDEQWarning)]
    # The expected notices: the tolerance is raised to what the dtype (or, certified, the
    # contraction factor) can resolve. Anything else, e.g. a solve that did not converge, fails.
    expected = ("tol=", "The backward solve is not certified in")
    assert [m for m in said if not m.startswith(expected)] == []

    (b_info,) = backward_stats
    assert bool(b_info["converged"].all()) and int(b_info["nstep"].max()) < 60
    if gradient == "certified ift":
        # In half-precision arithmetic a certified bound could not go below 32 eps / (1 - q)
        # (0.25 relative in bfloat16): the backward says it is not certified, and solves plainly.
        uncertified = [m for m in said if m.startswith("The backward solve is not certified")]
        assert "error_bound" not in b_info and len(uncertified) == 1
        assert f"in {dtype} arithmetic" in uncertified[0]  # autocast's, not the state's

    # The state has the injection's dtype: softplus computes in the autocast dtype on the CPU and
    # in float32 on CUDA (autocast's float32 list); the layer's products are low precision either way.
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        injection_dtype = nn.functional.softplus(model.encoder(images)).dtype
    assert x.dtype == injection_dtype and z.dtype == injection_dtype
    assert (x > 0).all(), "the injection floor must keep pcDEQ-1 injections strictly positive"
    assert (z > 0).all()
    # An unreachable tolerance (1e-6) stops at the dtype's floor long before the budget...
    assert bool(info["converged"].all())
    assert int(info["nstep"].max()) < 60
    # ...and "converged" is true: recomputing the residual gives the same order as the floor.
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        fz = model.f(z, x)
    residual = ((fz.float() - z.float()).flatten(1).norm(dim=1) / fz.float().flatten(1).norm(dim=1)).max()
    assert residual.item() <= 2 * resolution_floor(dtype)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.f.weight.min() >= 0


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_the_low_precision_fixed_point_is_close_to_the_float64_one(device, dtype):
    torch.manual_seed(0)
    f = PcDEQLinear(32, "sigmoid").to(device)  # pcDEQ-2 (sigmoid(0) > 0): nonnegative injection
    u = torch.randn(4, 32, device=device)
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-12, f_max_iter=500)
    with torch.no_grad():
        x64 = f.double().inject(u.double())
        exact, _ = deq(lambda z: f(z, x64), torch.zeros_like(x64))
        f.float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PcDEQWarning)
            with torch.autocast(device, dtype=dtype):
                x = f.inject(u.to(dtype))
                low, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    error = (low[-1].double() - exact[-1]).norm() / exact[-1].norm()
    assert bool(info["converged"].all()) and int(info["nstep"].max()) < 100
    assert error.item() < 20 * torch.finfo(dtype).eps


def test_the_rate_bound_under_autocast_falls_back_for_an_f_that_cannot_run_in_float32():
    """bfloat16 weights cannot meet a float32 state outside autocast: q comes from autocast's arithmetic."""
    torch.manual_seed(0)
    weight = torch.rand(8, 8, dtype=torch.float64) * 0.1
    x = torch.full((2, 8), 0.1, dtype=torch.float64)
    z = torch.rand(2, 8, dtype=torch.float64) + 0.1
    exact = rate_bound(lambda v: torch.tanh(v @ weight.T + x), z)
    low_weight, low_x = weight.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = rate_bound(lambda v: torch.tanh(v @ low_weight.T + low_x), z.to(torch.bfloat16))
    torch.testing.assert_close(q.double(), exact, rtol=0.05, atol=0)


def test_a_certified_hook_backward_after_two_solves_under_autocast():
    """The second solve's checks must not make the first one's float32 rate bound fail."""
    torch.manual_seed(0)
    f = PcDEQLinear(16)
    deq = torchdeq.get_deq(core="pcdeq", hook_ift=True, pcdeq_rate_bound=True, pcdeq_nonconvergence="ignore")
    u = torch.randn(2, 4, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PcDEQWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = []
            for i in range(2):
                x = f.inject(u[i])
                outs.append(deq(lambda z, x=x: f(z, x), torch.zeros_like(x))[0][-1])
        sum(out.float().sum() for out in outs).backward()
    assert torch.isfinite(u.grad).all() and (u.grad != 0).any()


@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
def test_a_backward_inside_an_autocast_region_computes_as_the_float32_forward_did(gradient):
    torch.manual_seed(0)
    f = PcDEQLinear(16)
    deq = torchdeq.get_deq(core="pcdeq", b_tol=1e-6, hook_ift=gradient == "hook_ift")
    u = torch.randn(4, 16, requires_grad=True)

    def input_gradient(region) -> torch.Tensor:
        u.grad = None
        x = f.inject(u)
        z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
        with region:
            z_out[-1].sum().backward()
        return u.grad.clone()

    outside = input_gradient(contextlib.nullcontext())
    inside = input_gradient(torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.equal(inside, outside)


class AmplifyingClassifier(nn.Module):
    """relu6 with row sums 0.97 and small injections: the adjoint grows about 30-fold."""

    def __init__(self, gradient: str, channels: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(20, channels)
        self.f = PcDEQLinear(channels, "relu6", nonnegativity="project")
        with torch.no_grad():
            w = torch.rand(channels, channels)
            self.f.linear.weight.copy_(w * 0.97 / w.sum(1, keepdim=True))
        self.deq = torchdeq.get_deq(
            core="pcdeq", f_max_iter=400, b_max_iter=400, hook_ift=gradient == "hook_ift"
        )
        self.head = nn.Linear(channels, 10)

    def forward(self, inputs, backward_writer=None):
        x = self.f.inject(self.encoder(inputs) - 3)
        z_out, _ = self.deq(lambda z: self.f(z, x), torch.zeros_like(x), backward_writer=backward_writer)
        return self.head(z_out[-1])


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def _float16_gradients(model: nn.Module, loss_scale: float, stats: list) -> dict[str, torch.Tensor]:
    """The parameters' gradients of a float16-autocast step whose loss is scaled by ``loss_scale``."""
    device = model.head.weight.device
    torch.manual_seed(1)
    inputs, labels = torch.randn(16, 20).to(device), (torch.arange(16) % 10).to(device)
    model.zero_grad()
    with torch.autocast(device.type, dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(inputs, stats.append).float(), labels)
    (loss * loss_scale).backward()
    return {name: p.grad / loss_scale for name, p in model.named_parameters()}


@pytest.mark.parametrize("gradient", ["ift", "hook_ift"])
@pytest.mark.parametrize("device", DEVICES)
def test_float16_loss_scaling_gives_the_implicit_gradient_or_an_overflow_never_a_wrong_one(device, gradient):
    """An adjoint that overflows float16 under loss scaling is solved again, scaled into range.

    Before, the overflow read as divergence at 2^20: 12 of 16 samples got the one-step gradient
    (90-120% off), finite, with a warning blaming the forward, and a GradScaler saw nothing to
    back off from.
    """
    model = AmplifyingClassifier(gradient).to(device)
    stats: list = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tol=", PcDEQWarning)  # the tolerance raised to float16's
        reference = _float16_gradients(model, 2.0**8, stats)
        scaled = _float16_gradients(model, 2.0**16, stats)
        overflowing = _float16_gradients(model, 2.0**20, stats)  # any other warning fails
    assert len(stats) == 3  # one backward solve per step
    for b_info in stats:
        assert bool(b_info["converged"].all()) and not bool(b_info["diverged"].any())
    # the scaled solve's statistics are in the gradient's units: 2^12 times those at 2^8
    ratio = stats[2]["abs_lowest"] / stats[0]["abs_lowest"]
    assert ((ratio > 2.0**11) & (ratio < 2.0**13)).all(), ratio
    for name, grad in scaled.items():
        torch.testing.assert_close(grad, reference[name], rtol=0.02, atol=1e-5)
    # The implicit gradient at 2^20 exceeds float16's range downstream of the core: it overflows
    # there, as in any float16 layer, and a GradScaler backs off.
    assert not all(torch.isfinite(grad).all() for grad in overflowing.values())


def test_a_diverging_adjoint_under_float16_is_still_reported_as_diverging():
    """Solved again in range, an adjoint that really diverges (5.4x per product) overflows again."""
    f = PcDEQLinear(1, "relu6", nonnegativity="project")  # test_core's instance, from test_fuzz
    with torch.no_grad():
        f.linear.weight.fill_(5.432)
    u = torch.tensor([[[-20.0], [-21.0], [12.6]]], requires_grad=True)
    deq = torchdeq.get_deq(core="pcdeq", b_max_iter=400)
    seen: list = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tol=", PcDEQWarning)
        with torch.autocast("cpu", dtype=torch.float16):
            x = f.inject(u)
            z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x), backward_writer=seen.append)
        with pytest.warns(PcDEQWarning, match=r"adjoint iteration diverged .* for 1 of 1 samples"):
            (z_out[-1].float() * 2.0**10).sum().backward()
    assert seen[0]["diverged"].tolist() == [True]
    assert torch.isfinite(u.grad).all() and torch.isfinite(f.linear.weight.grad).all()


def test_a_non_finite_loss_gradient_of_a_half_model_still_raises():
    """GradScaler refuses float16 parameters: in a half model a NaN gradient is a bug to report."""
    f = PcDEQLinear(16).half()
    x = f.inject(torch.randn(4, 16).half())
    # the default tolerance is below float16's floor, which says so once per process: the
    # test must pass alone as well as after another half-precision test
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-2, b_tol=1e-2, pcdeq_nonconvergence="ignore")
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
    with pytest.raises(NonFiniteError, match="The loss gradient arriving at the pcdeq core holds NaN or Inf"):
        (z_out[-1] * torch.tensor(float("nan"), dtype=torch.float16)).sum().backward()


def test_an_adjoint_beyond_float16s_range_in_a_half_model_is_said(monkeypatch):
    """The adjoint (50,081 / slope here) exceeds 65,504 while its solve converges: Inf, and a warning.

    tanh with W = 0.9 / 8 and a loss gradient of 30,000 per entry: the first solve overflows,
    the solve in range converges, and the solution multiplied back is beyond float16's range.
    """
    forget_warnings(monkeypatch)  # said once per process
    f = PcDEQLinear(8, nonnegativity="project")
    with torch.no_grad():
        f.linear.weight.fill_(0.9 / 8)
    f = f.half()
    x = f.inject(torch.zeros(2, 8, dtype=torch.float16)).requires_grad_()
    seen: list = []
    deq = torchdeq.get_deq(core="pcdeq", f_tol=1e-2, b_tol=1e-2)  # above float16's floor
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x), backward_writer=seen.append)
    with pytest.warns(PcDEQWarning, match=r"adjoint .* exceeds float16's range \(65,504\) in 2 of 2 samples"):
        (grad,) = torch.autograd.grad(z_out[-1], x, torch.full_like(z_out[-1], 30000.0))
    assert torch.isinf(grad).all() and bool(seen[-1]["converged"].all())


@pytest.mark.parametrize("device", DEVICES)
def test_an_overflowed_loss_gradient_under_float16_reaches_gradscaler(device, monkeypatch):
    """GradScaler's overflow steps pass through the core: no exception, each step skipped, one warning."""
    forget_warnings(monkeypatch)
    model = AmplifyingClassifier("ift").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    attach_projection(optimizer, model)  # the layer's weight is projected to >= 0
    scaler = torch.amp.GradScaler(device, init_scale=2.0**30, growth_interval=10_000)
    torch.manual_seed(1)
    inputs, labels = torch.randn(16, 20).to(device), (torch.arange(16) % 10).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    scales = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):
            optimizer.zero_grad()
            with torch.autocast(device, dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(inputs).float(), labels)
            scaler.scale(loss).backward()
            # GradScaler's own test: every gradient. One layer's can overflow while another's is
            # finite (on CUDA at 2^20 the encoder's was finite, the layer's weight gradient was not).
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            scales.append(scaler.get_scale())
            scaler.step(optimizer)
            scaler.update()
            if finite:
                break
            # the overflowed step was skipped
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    said = [str(w.message) for w in caught if issubclass(w.category, PcDEQWarning)]
    assert len([m for m in said if "GradScaler skips the step" in m]) == 1
    assert [m for m in said if "GradScaler" not in m and not m.startswith("tol=")] == []
    assert finite and len(scales) > 1 and scales[-1] < 2.0**30
    # the step taken trained the layers on both sides of the solve
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    names = [name for name, _ in model.named_parameters()]
    assert changed[names.index("encoder.weight")] and changed[names.index("f.linear.weight")]


def test_the_float16_solve_in_range_scales_each_sample_by_its_own_power_of_two():
    """A sample whose gradient is 2^-20 of the others keeps its accuracy when they overflow.

    One power of two for the batch would bring that sample to float16's subnormals.
    """
    layer = AmplifyingClassifier("ift").f
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=400, b_max_iter=400)
    torch.manual_seed(2)
    u = torch.randn(16, 16) - 3

    def input_gradient(weights: torch.Tensor) -> tuple[torch.Tensor, list]:
        v = u.clone().requires_grad_()
        seen: list = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "tol=", PcDEQWarning)
            with torch.autocast("cpu", dtype=torch.float16):
                x = layer.inject(v)
                z_out, _ = deq(lambda z: layer(z, x), torch.zeros_like(x), backward_writer=seen.append)
            (z_out[-1].float() * weights[:, None]).sum().backward()
        return v.grad, seen

    small = torch.full((16,), 2.0**-8)
    alone, seen = input_gradient(small)  # no overflow: solved as it comes
    assert not seen[0]["diverged"].any()
    mixed = torch.full((16,), 2.0**12)
    mixed[5] = 2.0**-8
    together, seen = input_gradient(mixed)  # the others overflow: solved again, in range
    assert not seen[0]["diverged"].any() and seen[0]["converged"].all()
    torch.testing.assert_close(together[5], alone[5], rtol=1e-3, atol=0)


def test_dtypes_that_autocast_cannot_mix_are_a_typed_error_not_pytorchs():
    """Found by review: a float64 injection with a float32 layer, or a float16 model, under
    bfloat16 autocast gave PyTorch's raw errors ("expected m1 and m2 to have the same dtype",
    "Unexpected floating ScalarType in at::autocast::prioritize")."""
    deq = torchdeq.get_deq(core="pcdeq")
    layer = PcDEQLinear(8)
    x = layer.inject(torch.randn(2, 8))
    bad = [(layer, x.double(), r"state torch.float64 and injection torch.float64, weights torch.float32")]
    bad.append((PcDEQLinear(8).double(), x, r"weights torch.float64; autocast mixes float32 with"))
    bad.append((PcDEQLinear(8).half(), x.half(), r"got a torch.float16 initial state; autocast mixes"))
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore", PcDEQWarning)  # (tolerances below bfloat16's floor)
        for f, inj, match in bad:
            with pytest.raises(InvalidInputError, match=match):
                deq(lambda z: f(z, inj), torch.zeros_like(inj))
        # what autocast does mix, and a model wholly in one dtype, run
        for f, inj in [(layer, x), (layer, x.bfloat16()), (PcDEQLinear(8).double(), x.double())]:
            _, info = deq(lambda z: f(z, inj), torch.zeros_like(inj))
            assert bool(info["converged"].all())

"""The kernel of a pcDEQ convolution's untracked products (torchdeq_pcdeq.conv_kernels)."""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections import Counter

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
import torchdeq
from torch.utils._python_dispatch import TorchDispatchMode

from torchdeq_pcdeq import (
    InvalidInputError,
    NotPositiveMonotoneError,
    PcDEQConv2d,
    PcDEQWarning,
    UnknownNameError,
    add_pcdeq_args,
    conv_kernels,
    pcdeq_fixed_point,
)
from torchdeq_pcdeq.conv_kernels import Choice, same_conv2d, same_conv2d_transposed

pytestmark = pytest.mark.skipif(not conv_kernels.nnpack_available(), reason="PyTorch built without NNPACK")

NNPACK = torch.ops.aten._nnpack_spatial_convolution.default


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def _instance(batch=17, channels=6, size=7, kernel=3, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    z = torch.rand(batch, channels, size, size, generator=gen)
    w = torch.rand(channels, channels, kernel, kernel, generator=gen) / (channels * kernel)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    return z, w


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 17])
def test_nnpack_products_match_the_float64_convolution(kernel, channels_last, batch):
    z, w = _instance(batch=batch, kernel=kernel, channels_last=channels_last)
    pad = kernel // 2
    exact = F.conv2d(z.double(), w.double(), padding=pad)
    with OpCounter() as counter:
        out = same_conv2d(z, w, pad, "nnpack")
    assert counter.ops[NNPACK] == 1
    assert out.dtype == torch.float32 and out.shape == exact.shape
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)

    v = torch.rand_like(z)
    exact_t = F.conv_transpose2d(v.double(), w.double(), padding=pad)
    for algorithm in ("nnpack", "pytorch"):
        torch.testing.assert_close(
            same_conv2d_transposed(v, z, w, pad, algorithm).double(), exact_t, rtol=1e-5, atol=1e-6
        )


def test_the_transposed_product_is_the_adjoint_for_non_square_kernels():
    gen = torch.Generator().manual_seed(1)
    z, v = torch.rand(16, 3, 6, 6, generator=gen), torch.rand(16, 5, 6, 6, generator=gen)
    w = torch.rand(5, 3, 3, 3, generator=gen)
    lhs = (v.double() * F.conv2d(z.double(), w.double(), padding=1)).sum()
    for algorithm in ("nnpack", "pytorch"):
        rhs = (same_conv2d_transposed(v, z, w, 1, algorithm).double() * z.double()).sum()
        torch.testing.assert_close(rhs, lhs, rtol=1e-5, atol=0)


def _kernel_used(run) -> str:
    with OpCounter() as counter:
        run()
    return "nnpack" if counter.ops[NNPACK] else "pytorch"


def test_nnpack_is_used_only_where_it_computes_what_conv2d_would():
    z, w = _instance()
    assert _kernel_used(lambda: same_conv2d(z, w, 1, "nnpack")) == "nnpack"
    assert _kernel_used(lambda: same_conv2d(z, w, 1, "pytorch")) == "pytorch"
    # float64: NNPACK computes in float32 only.
    assert _kernel_used(lambda: same_conv2d(z.double(), w.double(), 1, "nnpack")) == "pytorch"
    # A gradient to record: the tracked application goes through F.conv2d and autograd.
    tracked = z.clone().requires_grad_()
    assert _kernel_used(lambda: same_conv2d(tracked, w, 1, "nnpack")) == "pytorch"
    with torch.no_grad():
        assert _kernel_used(lambda: same_conv2d(tracked, w, 1, "nnpack")) == "nnpack"
    # CPU autocast computes the convolution in bfloat16.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _kernel_used(lambda: same_conv2d(z, w, 1, "nnpack")) == "pytorch"
    # Forward-mode AD (the rate bound's Jacobian-vector product): NNPACK has no tangent rule.
    with torch.no_grad(), forward_ad.dual_level():
        dual = forward_ad.make_dual(z, torch.ones_like(z))
        out = same_conv2d(dual, w, 1, "nnpack")
        tangent = forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, F.conv2d(torch.ones_like(z), w, padding=1))
    # torch.func transforms: no batching rule.
    per_sample = torch.func.vmap(lambda s: same_conv2d(s, w, 1, "nnpack"))(z.unsqueeze(1))
    torch.testing.assert_close(per_sample.squeeze(1), F.conv2d(z, w, padding=1))


@pytest.mark.parametrize("transposed", [False, True], ids=["W z", "W^T y"])
def test_auto_times_each_product_once_per_shape_and_layout(transposed):
    z, w = _instance(batch=19, channels=5)  # a shape no other test uses
    product = "W^T y" if transposed else "W z"
    key = (product, tuple(z.shape), tuple(w.shape), True, torch.get_num_threads())
    assert key not in conv_kernels.choices()
    v = torch.randn_like(z)  # for W^T y: a gradient, of any sign
    if transposed:
        run = lambda: same_conv2d_transposed(v, z, w, 1, "auto")  # noqa: E731
        pytorch_op = torch.ops.aten.convolution_backward.default
        exact = F.conv_transpose2d(v.double(), w.double(), padding=1)
    else:
        run = lambda: same_conv2d(z, w, 1, "auto")  # noqa: E731
        pytorch_op = torch.ops.aten.convolution.default
        exact = F.conv2d(z.double(), w.double(), padding=1)
    with OpCounter() as first:
        out = run()
    choice = conv_kernels.choices()[key]
    assert isinstance(choice, Choice) and choice.pytorch_ms > 0 and choice.nnpack_ms > 0
    assert (choice.algorithm == "nnpack") == (choice.nnpack_ms < 0.9 * choice.pytorch_ms)
    # A warm-up and three timed runs of each candidate, then the product itself.
    assert first.ops[NNPACK] == 4 + (choice.algorithm == "nnpack")
    assert first.ops[pytorch_op] == 4 + (choice.algorithm == "pytorch")
    with OpCounter() as second:
        again = run()
    assert second.ops[NNPACK] == (choice.algorithm == "nnpack")
    assert second.ops[pytorch_op] == (choice.algorithm == "pytorch")
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    # The other product and the other layout are timed under their own keys.
    assert sum(k[0] == product and k[1] == tuple(z.shape) for k in conv_kernels.choices()) == 1
    # Which kernel the timing picks depends on the machine's load: NNPACK's Winograd transforms
    # round to about 5e-6 of the largest entry on this instance (PyTorch's, to 1e-7).
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=2e-5 * exact.abs().max().item())


def test_sign_exact_products_keep_both_products_on_pytorchs_kernel_and_winograd_products_are_counted():
    z, w = _instance()
    before = conv_kernels.winograd_products()
    assert _kernel_used(lambda: same_conv2d(z, w, 1, "nnpack")) == "nnpack"
    assert conv_kernels.winograd_products() == before + 1
    with conv_kernels.sign_exact_products():
        with conv_kernels.sign_exact_products():  # blocks nest
            assert _kernel_used(lambda: same_conv2d(z, w, 1, "nnpack")) == "pytorch"
        assert _kernel_used(lambda: same_conv2d(z, w, 1, "nnpack")) == "pytorch"
        # W^T y has no sign to keep, but the certified backward's rounding margin covers
        # direct products only: inside the block it is PyTorch's too, in PyTorch's layout.
        assert _kernel_used(lambda: same_conv2d_transposed(z, z, w, 1, "nnpack")) == "pytorch"
        assert conv_kernels.transposed_layout(z, w, 1, "nnpack") is None
    assert conv_kernels.winograd_products() == before + 1  # adjoint products are not counted
    assert _kernel_used(lambda: same_conv2d(z, w, 1, "nnpack")) == "nnpack"
    assert _kernel_used(lambda: same_conv2d_transposed(z, z, w, 1, "nnpack")) == "nnpack"
    with pytest.raises(RuntimeError, match="inside"), conv_kernels.sign_exact_products():
        raise RuntimeError("inside the block")
    assert _kernel_used(lambda: same_conv2d(z, w, 1, "nnpack")) == "nnpack"  # left on error too


@pytest.mark.parametrize(
    "nnpack_ticks, expected",
    [
        (5.0, Choice("pytorch", 1e3, 5e3)),
        (0.95, Choice("pytorch", 1e3, 950.0)),
        (0.5, Choice("nnpack", 1e3, 500.0)),
    ],
    ids=["slower", "5% faster: not enough", "twice as fast"],
)
@pytest.mark.parametrize("transposed", [False, True], ids=["W z", "W^T y"])
def test_choice_follows_the_timings(monkeypatch, nnpack_ticks, expected, transposed):
    """A fake clock: PyTorch's kernel takes one second a run, NNPACK ``nnpack_ticks``."""
    z, w = _instance(batch=3, channels=2, size=4)
    clock = {"now": 0.0}

    def advancing(run, ticks):
        def timed(*args, **kwargs):
            clock["now"] += ticks
            return run(*args, **kwargs)

        return timed

    monkeypatch.setattr(conv_kernels.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(conv_kernels, "_nnpack", advancing(conv_kernels._nnpack, nnpack_ticks))
    monkeypatch.setattr(conv_kernels, "_pytorch_transposed", advancing(conv_kernels._pytorch_transposed, 1.0))
    monkeypatch.setattr(conv_kernels, "_pytorch", advancing(conv_kernels._pytorch, 1.0))
    rng = torch.get_rng_state()
    choice = conv_kernels._time_both(z, w, 1, transposed)
    assert torch.equal(torch.get_rng_state(), rng)  # the user's random stream is untouched
    assert choice.algorithm == expected.algorithm
    assert choice.pytorch_ms == pytest.approx(expected.pytorch_ms)
    assert choice.nnpack_ms == pytest.approx(expected.nnpack_ms)


def test_layer_option_from_argument_config_and_errors(monkeypatch):
    assert PcDEQConv2d(4).conv_algorithm == "auto"
    assert PcDEQConv2d(4, args={"pcdeq_conv_algorithm": "pytorch"}).conv_algorithm == "pytorch"
    parsed = add_pcdeq_args(argparse.ArgumentParser()).parse_args(["--pcdeq_conv_algorithm", "nnpack"])
    assert PcDEQConv2d(4, args=parsed).conv_algorithm == "nnpack"
    assert "conv_algorithm='nnpack'" in repr(PcDEQConv2d(4, conv_algorithm="nnpack"))
    assert "conv_algorithm" not in repr(PcDEQConv2d(4))
    with pytest.raises(UnknownNameError, match="winograd"):
        PcDEQConv2d(4, conv_algorithm="winograd")
    monkeypatch.setattr(conv_kernels, "nnpack_available", lambda: False)
    with pytest.raises(InvalidInputError, match="no NNPACK"):
        PcDEQConv2d(4, conv_algorithm="nnpack")
    z, w = _instance()
    assert PcDEQConv2d(4, conv_algorithm="auto").conv_algorithm == "auto"  # auto: falls back quietly
    assert _kernel_used(lambda: same_conv2d_transposed(z, z, w, 1, "auto")) == "pytorch"


def _train_step(algorithm: str, channels_last: bool):
    torch.manual_seed(0)
    f = PcDEQConv2d(6, conv_algorithm=algorithm)
    with torch.no_grad():
        f.operator.parametrizations.weight.original0.mul_(40.0)  # the norm g: a Jacobian that matters
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_guard="raise")
    u = torch.randn(17, 6, 7, 7, generator=torch.Generator().manual_seed(1))
    x = f.inject(u)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with OpCounter() as counter:
        z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
        (z_out[-1] * torch.linspace(0, 1, 7)).sum().backward()
    grads = [p.grad.clone() for p in f.parameters()]
    return z_out[-1].detach(), grads, info, counter.ops


def _assert_close_to_winograd_accuracy(actual, expected):
    """Winograd products round relative to the largest entries they sum, not to each output:
    within 1e-4 of the largest gradient entry (the error moves with NNPACK's thread count: one
    entry of 1.6 was 1.15e-4 off on one thread, within 1e-4 on two)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_training_step_with_nnpack_matches_pytorchs_kernel(channels_last):
    z_nn, grads_nn, info, ops = _train_step("nnpack", channels_last)
    z_pt, grads_pt, _, ops_pt = _train_step("pytorch", channels_last)
    assert info["converged"].all() and int(info["nstep"].max()) > 3
    torch.testing.assert_close(z_nn, z_pt, rtol=1e-5, atol=1e-6)
    for g_nn, g_pt in zip(grads_nn, grads_pt):
        _assert_close_to_winograd_accuracy(g_nn, g_pt)
    # Every W z of the solve (the first, W 0, is skipped) and every W^T y of the backward
    # runs on NNPACK; the weight gradient stays on convolution_backward, without input gradient.
    assert ops[NNPACK] >= int(info["nstep"].max()) - 1 + 2
    assert ops_pt[NNPACK] == 0
    masks = _convolution_backward_masks(lambda: _train_step("nnpack", channels_last))
    assert masks == [[False, True, False]]


def _nnpack_chosen_everywhere(monkeypatch):
    monkeypatch.setattr(conv_kernels, "_CHOICES", {})
    monkeypatch.setattr(conv_kernels, "_time_both", lambda *args: Choice("nnpack", 2.0, 1.0))


def test_auto_runs_both_products_on_nnpack_where_timed_faster_under_the_guard(monkeypatch):
    _nnpack_chosen_everywhere(monkeypatch)
    before = conv_kernels.winograd_products()
    z_auto, grads_auto, info, ops = _train_step("auto", channels_last=True)
    z_pt, grads_pt, _, _ = _train_step("pytorch", channels_last=True)
    torch.testing.assert_close(z_auto, z_pt, rtol=1e-5, atol=1e-6)
    for g_auto, g_pt in zip(grads_auto, grads_pt):
        _assert_close_to_winograd_accuracy(g_auto, g_pt)
    # Every W z of the solve but the skipped first one, then the adjoint's products; the guard
    # passed it at once (one solve), and only the tracked forward ran on PyTorch's kernel.
    forward_products = int(info["nstep"].max()) - 1
    assert conv_kernels.winograd_products() == before + forward_products
    assert ops[NNPACK] >= forward_products + 2
    assert ops[torch.ops.aten.convolution.default] == 0


def _solve(f, x, **options):
    deq = torchdeq.get_deq(core="pcdeq", **options).eval()  # the solve alone: no f(z*) after it
    with OpCounter() as counter:
        z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    return z_out[-1].detach(), info, counter.ops


def _layer_and_injection(algorithm="auto", seed=2, activation="tanh"):
    f = PcDEQConv2d(6, conv_algorithm=algorithm, activation=activation)
    x = f.inject(torch.randn(5, 6, 7, 7, generator=torch.Generator().manual_seed(seed)))
    return f, x


@pytest.mark.parametrize("algorithm", ["auto", "nnpack"])
@pytest.mark.parametrize(
    "options",
    [
        dict(pcdeq_enclosure=True),
        dict(pcdeq_rate_bound=True),
        dict(pcdeq_enclosure=True, pcdeq_rate_bound=True),
    ],
    ids=["enclosure", "rate bound", "both"],
)
def test_certified_core_solves_make_sign_exact_products(monkeypatch, algorithm, options):
    """The certificates' margins cover direct products only: no Winograd product in such a
    solve (a rate bound is taken at the solve's state, which must be below z*)."""
    _nnpack_chosen_everywhere(monkeypatch)
    f, x = _layer_and_injection(algorithm)
    before = conv_kernels.winograd_products()
    z, info, ops = _solve(f, x, **options)
    assert ops[NNPACK] == 0 and conv_kernels.winograd_products() == before
    assert ops[torch.ops.aten.convolution.default] > 0
    if "pcdeq_enclosure" in options:
        assert bool((info["error_bound"] <= 1e-4 * z.amax()).all())
    if "pcdeq_rate_bound" in options:
        assert bool(torch.isfinite(info["rate_bound"]).all())
    _, _, plain_ops = _solve(f, x)  # the same layer's plain solve does use NNPACK
    assert plain_ops[NNPACK] > 0


def test_the_certified_closed_form_training_step_makes_sign_exact_products(monkeypatch):
    """With pcdeq_rate_bound, the closed-form gradient's adjoint products W^T y run on PyTorch's
    kernel as well (the certified bound's rounding margin covers direct products only)."""
    _nnpack_chosen_everywhere(monkeypatch)
    f, x = _layer_and_injection("nnpack")

    def step(**options) -> dict:
        deq = torchdeq.get_deq(core="pcdeq", **options)
        with OpCounter() as counter:
            z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
            assert type(z_out[-1].grad_fn).__name__ == "_ClosedFormImplicitGradBackward"
            z_out[-1].sum().backward()
        return counter.ops

    assert step(pcdeq_rate_bound=True)[NNPACK] == 0
    assert step()[NNPACK] > 0  # the plain step of the same layer does use NNPACK


def test_sradius_by_rate_bound_makes_sign_exact_products(monkeypatch):
    _nnpack_chosen_everywhere(monkeypatch)
    f, x = _layer_and_injection()
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_sradius="rate_bound").eval()
    with OpCounter() as counter:
        _, info = deq(lambda z: f(z, x), torch.zeros_like(x), sradius_mode=True)
    assert counter.ops[NNPACK] == 0 and bool(torch.isfinite(info["sradius"]).all())


@pytest.mark.parametrize("certificate", ["enclosure", "contraction"])
def test_the_solver_makes_sign_exact_products_in_its_certified_modes(certificate):
    """Called directly, without the core."""
    f, x = _layer_and_injection("nnpack")
    x0 = torch.zeros_like(x)
    if certificate == "enclosure":
        options = dict(enclosure=True, upper=1.0)
    else:  # any positive weights and rate: the products are what is checked here
        options = dict(weights=torch.ones_like(x), rate=torch.full((5,), 0.5))
    with OpCounter() as counter, torch.no_grad():
        pcdeq_fixed_point(lambda z: f(z, x), x0, max_iter=30, **options)
        assert counter.ops[NNPACK] == 0
        pcdeq_fixed_point(lambda z: f(z, x), x0, max_iter=30)
        assert counter.ops[NNPACK] > 0


def _nnpack_rounding(monkeypatch, call: int, edit):
    """NNPACK whose ``call``-th product (from 1) is edited in place by ``edit``."""
    nnpack, calls = conv_kernels._nnpack, []

    def rounded(z, weight, padding):
        out = nnpack(z, weight, padding)
        calls.append(1)
        if len(calls) == call:
            edit(out)
        return out

    monkeypatch.setattr(conv_kernels, "_nnpack", rounded)


def test_winograd_products_of_a_pcdeq_layer_are_clamped_at_zero(monkeypatch):
    """Rounding below 0 does not survive the layer: its states stay nonnegative, guard or not."""
    _nnpack_chosen_everywhere(monkeypatch)
    _nnpack_rounding(monkeypatch, call=2, edit=lambda out: out.sub_(1.0))  # everything below 0
    f, x = _layer_and_injection(activation="softsign")  # softsign(t) < 0 for t < 0
    z, info, ops = _solve(f, x, pcdeq_guard="off")
    assert ops[NNPACK] > 2 and bool(info["converged"].all())
    assert z.min() >= 0
    spike = torch.full((16, 8, 8, 8), 1e-6)
    spike[:, :, 3, 3] = 6.0
    w = torch.rand(8, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    assert same_conv2d(spike, w, 1, "nnpack").min() < 0  # Winograd's own rounding
    assert same_conv2d(spike, w, 1, "nnpack", nonnegative=True).min() == 0


@pytest.mark.parametrize("guard", ["raise", "warn"])
def test_a_guard_failure_under_winograd_products_is_judged_again_with_sign_exact_ones(monkeypatch, guard):
    _nnpack_chosen_everywhere(monkeypatch)
    # The third product (iteration 4) rounds one entry to half its value: the iterate falls.
    _nnpack_rounding(monkeypatch, call=3, edit=lambda out: out[0, 0, 3, 3].mul_(0.5))
    exact, _ = _layer_and_injection("pytorch")
    f, x = _layer_and_injection("auto")
    f.load_state_dict(exact.state_dict())
    z_exact, _, _ = _solve(exact, x, pcdeq_check_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning: the rounding was no violation
        z, info, ops = _solve(f, x, pcdeq_guard=guard, pcdeq_check_every=1)
    # The first solve failed the guard at iteration 4, after three Winograd products; the
    # second made PyTorch's products only, and its result is the pytorch solve's.
    assert ops[NNPACK] == 3
    assert ops[torch.ops.aten.convolution.default] == int(info["nstep"].max()) - 1
    assert bool(info["converged"].all())
    torch.testing.assert_close(z, z_exact, rtol=0, atol=0)


def test_the_closed_form_gradient_survives_the_second_look(monkeypatch):
    _nnpack_chosen_everywhere(monkeypatch)
    _nnpack_rounding(monkeypatch, call=3, edit=lambda out: out[0, 0, 3, 3].mul_(0.5))
    f, x = _layer_and_injection("auto")
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_check_every=1)
    taken = []
    original = type(deq).take_last_step
    monkeypatch.setattr(
        type(deq), "take_last_step", lambda self, z: taken.append(original(self, z)) or taken[-1]
    )
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
    z_out[-1].sum().backward()
    assert len(taken) == 1 and taken[0] is not None  # no tracked application of f instead


@pytest.mark.parametrize("guard", ["raise", "warn"])
def test_a_real_violation_is_still_reported_once_after_the_second_look(monkeypatch, guard):
    _nnpack_chosen_everywhere(monkeypatch)
    f, x = _layer_and_injection(seed=3)
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_guard=guard, pcdeq_nonconvergence="ignore").eval()
    decreasing = lambda z: f(z, x) * (1 - z.sum() / (1 + z.sum()))  # noqa: E731 - not monotone
    before = conv_kernels.winograd_products()
    with OpCounter() as counter:
        if guard == "raise":
            with pytest.raises(NotPositiveMonotoneError, match="below iterate") as raised:
                deq(decreasing, torch.zeros_like(x))
            assert raised.value.__context__ is None  # the second solve's own error, unchained
        else:
            with pytest.warns(PcDEQWarning, match="below iterate") as caught:
                deq(decreasing, torch.zeros_like(x))
            assert len([w for w in caught if issubclass(w.category, PcDEQWarning)]) == 1
    # Both solves ran: the first with NNPACK's products, the second with PyTorch's only.
    assert conv_kernels.winograd_products() - before == counter.ops[NNPACK] > 0
    assert counter.ops[torch.ops.aten.convolution.default] > 0


@pytest.mark.parametrize("backward_under_autocast", [False, True])
def test_the_adjoint_iterates_in_nnpacks_layout_with_three_conversions_per_backward(
    monkeypatch, backward_under_autocast
):
    """NNPACK reads and writes NCHW: the closed-form gradient holds its iterates in NCHW, so a
    channels-last state costs three conversions per backward (slope and incoming gradient in,
    the result out), however many products, and no elementwise operation mixes layouts. The
    gradients are PyTorch's kernel's, to the adjoint solve's rounding. A backward() inside an
    autocast region computes as the forward did (here: without autocast), layout included."""
    z, w = _instance(channels_last=True)
    monkeypatch.setattr(conv_kernels, "_CHOICES", {})
    # NNPACK timed faster for W^T y only: the forward iterates stay channels-last.
    monkeypatch.setattr(
        conv_kernels, "_time_both", lambda *args: Choice("nnpack" if args[-1] else "pytorch", 2.0, 1.0)
    )
    assert conv_kernels.transposed_layout(z, w, 1, "auto") is torch.contiguous_format
    assert conv_kernels.transposed_layout(z, w, 1, "nnpack") is torch.contiguous_format
    assert conv_kernels.transposed_layout(z, w, 1, "pytorch") is None
    assert conv_kernels.transposed_layout(z.double(), w.double(), 1, "nnpack") is None
    assert PcDEQConv2d(6, conv_algorithm="pytorch").adjoint_layout(z, w) is None

    class OwnProducts(PcDEQConv2d):
        def operator_vjp(self, v, z, weight, *, state=True, weight_grad=False):
            return super().operator_vjp(v, z, weight, state=state, weight_grad=weight_grad)

    assert OwnProducts(6, conv_algorithm="nnpack").adjoint_layout(z, w) is None  # theirs to say

    state = (17, 6, 7, 7)
    layouts = []

    class Layouts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            dense = [a for a in (*args, out) if isinstance(a, torch.Tensor) and a.shape == state]
            layouts.append((func, {_layout(t) for t in dense} - {None}))
            return out

    def step(algorithm: str, record: bool):
        torch.manual_seed(0)
        f = PcDEQConv2d(6, conv_algorithm=algorithm)
        with torch.no_grad():
            f.operator.parametrizations.weight.original0.mul_(40.0)  # a Jacobian that matters
        u = torch.randn(*state)
        x = f.inject(u).contiguous(memory_format=torch.channels_last).requires_grad_()
        z_out, _ = torchdeq.get_deq(core="pcdeq")(lambda z: f(z, x), torch.zeros_like(x))
        weights = torch.rand(state).contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_under_autocast)
        with Layouts() if record else contextlib.nullcontext(), autocast:
            (z_out[-1] * weights).sum().backward()
        return x.grad, [p.grad for p in f.parameters()]

    x_grad, grads = step("auto", record=True)
    conversions = [func for func, seen in layouts if len(seen) > 1 and func is not NNPACK]
    assert len(conversions) == 3 and all(func is torch.ops.aten.clone.default for func in conversions)
    products = [seen for func, seen in layouts if func is NNPACK]
    assert len(products) >= 2 and all(seen == {"NCHW"} for seen in products)
    assert x_grad.is_contiguous(memory_format=torch.channels_last)
    x_grad_pt, grads_pt = step("pytorch", record=False)
    # Both stop their adjoint solves at a relative 1e-4 (of each sample's norm), from iterates
    # that differ by rounding: entries agree to that tolerance of the largest.
    for g, g_pt in zip([x_grad, *grads], [x_grad_pt, *grads_pt]):
        torch.testing.assert_close(g, g_pt, rtol=1e-3, atol=1e-4 * float(g_pt.abs().max()))


def _layout(t: torch.Tensor) -> str | None:
    if t.is_contiguous():
        return "NCHW"
    return "channels-last" if t.is_contiguous(memory_format=torch.channels_last) else None


def _convolution_backward_masks(run):
    masks = []

    class Masks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    with Masks():
        run()
    return masks


def test_nnpack_products_of_nonnegative_tensors_can_be_negative_so_sign_exact_blocks_avoid_them():
    """Why certified solves and the guard's second look need PyTorch's kernel: Winograd subtracts."""
    torch.manual_seed(0)
    z = torch.full((16, 8, 8, 8), 1e-6)
    z[:, :, 3, 3] = 6.0
    w = torch.rand(8, 8, 3, 3)
    exact = F.conv2d(z.double(), w.double(), padding=1)
    assert exact.min() > 0
    assert same_conv2d(z, w, 1, "pytorch").min() >= 0
    assert same_conv2d(z, w, 1, "nnpack").min() < 0
    assert PcDEQConv2d(4).conv_algorithm == torchdeq_pcdeq_config_default() == "auto"
    with conv_kernels.sign_exact_products():
        for algorithm in conv_kernels.CONV_ALGORITHMS:
            assert same_conv2d(z, w, 1, algorithm).min() >= 0


def torchdeq_pcdeq_config_default():
    from torchdeq_pcdeq.config import PCDEQ_OPTIONS

    return PCDEQ_OPTIONS["pcdeq_conv_algorithm"].default


def test_an_empty_batch_or_a_subclass_goes_to_pytorchs_kernel():
    z, w = _instance()
    assert same_conv2d(z[:0], w, 1, "nnpack").shape == (0, 6, 7, 7)
    assert _kernel_used(lambda: same_conv2d(z[:0], w, 1, "nnpack")) == "pytorch"
    # Not "same" padding: NNPACK's transposed product would have another shape.
    assert _kernel_used(lambda: same_conv2d(z, w, 0, "nnpack")) == "pytorch"

    class Tagged(torch.Tensor):
        pass

    assert type(same_conv2d(z.as_subclass(Tagged), w, 1, "nnpack")) is Tagged


def test_a_winograd_product_of_a_negative_state_keeps_its_sign_for_the_guard():
    """Found by review: the clamp at 0 of NNPACK's products, meant for their rounding, also hid
    a negative state (f = layer(z - 0.5, x)): the guard passed with "nnpack" and "auto" and the
    solve returned a fixed point of another map, where PyTorch's kernel raised."""
    torch.manual_seed(0)
    z, w = torch.rand(16, 4, 8, 8) - 0.5, torch.rand(4, 4, 3, 3)
    unclamped = same_conv2d(z, w, padding=1, algorithm="nnpack")
    assert bool((unclamped < -1e-3).any())  # (really negative, not rounding)
    torch.testing.assert_close(same_conv2d(z, w, padding=1, algorithm="nnpack", nonnegative=True), unclamped)
    assert bool((same_conv2d(z.abs(), w, padding=1, algorithm="nnpack", nonnegative=True) >= 0).all())
    for algorithm in ("pytorch", "nnpack"):
        f = PcDEQConv2d(4, "tanh", conv_algorithm=algorithm)
        x = f.inject(torch.randn(16, 4, 8, 8))
        deq = torchdeq.get_deq(core="pcdeq").eval()
        with torch.no_grad(), pytest.raises(NotPositiveMonotoneError, match="negative entries"):
            deq(lambda z: f(z - 0.5, x), torch.zeros_like(x))


def test_pytorchs_kernel_stays_sign_exact_with_onednn_off(monkeypatch):
    """Found by review: with oneDNN off (or not built in) PyTorch sends F.conv2d of 16 samples
    or more to NNPACK: the "sign-exact" products rounded below 0 (-5.8e-4 where the exact
    minimum is +2.8e-5) and the guard failed a valid model, with no second look."""
    torch.manual_seed(0)
    f = PcDEQConv2d(8, "tanh", nonnegativity="project", conv_algorithm="pytorch")
    f.weight = torch.rand(8, 8, 3, 3) * 0.05
    u = torch.full((16, 8, 6, 6), -30.0)
    u[:, :, 3, 2] = 3.0
    x = f.inject(u)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # (restored after the test)
    z = torch.rand(16, 8, 6, 6) * 1e-6
    z[:, :, 3, 2] = 6.0
    assert bool((same_conv2d(z, f.weight.detach(), padding=1, algorithm="pytorch") >= 0).all())
    for options in ({}, {"pcdeq_enclosure": True}):
        deq = torchdeq.get_deq(core="pcdeq", **options).eval()
        with torch.no_grad():
            _, info = deq(lambda z: f(z, x), torch.zeros_like(x))
        assert bool(info["converged"].all())


def test_nnpack_honours_pytorchs_switch_and_auto_the_deterministic_mode(monkeypatch):
    """Found by review: "nnpack" made Winograd products under torch.backends.nnpack.flags(
    enabled=False), and "auto" kept a choice that one noisy timing can flip between runs under
    torch.use_deterministic_algorithms(True)."""
    z, w = torch.rand(16, 4, 8, 8), torch.rand(4, 4, 3, 3)
    before = conv_kernels.winograd_products()
    with torch.backends.nnpack.flags(enabled=False):
        same_conv2d(z, w, padding=1, algorithm="nnpack")
    assert conv_kernels.winograd_products() == before
    monkeypatch.setattr(conv_kernels, "_time_both", lambda *args: pytest.fail("timed"))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    same_conv2d(torch.rand(16, 4, 9, 9), w, padding=1, algorithm="auto")  # (a shape never timed)
    assert conv_kernels.winograd_products() == before

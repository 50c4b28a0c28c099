import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ACTIVATIONS, set_weight
from torchdeq_pcdeq import (
    InvalidInputError,
    NegativeWeightError,
    PcDEQConv2d,
    PcDEQLinear,
    PcDEQWarning,
    UnknownNameError,
    get_activation,
)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", ["weight_norm", "parametrize", "project"])
def test_linear_forward_is_sigma_of_wz_plus_x(activation, mode):
    torch.manual_seed(0)
    f = PcDEQLinear(7, activation, nonnegativity=mode)
    z, x = torch.rand(3, 7), f.inject(torch.randn(3, 7))
    expected = get_activation(activation)(z @ f.weight.T + x)
    torch.testing.assert_close(f(z, x), expected)
    assert (f.weight >= 0).all()


def test_conv_forward_is_sigma_of_conv_plus_x():
    torch.manual_seed(0)
    f = PcDEQConv2d(4, "softsign", kernel_size=5)
    z, x = torch.rand(2, 4, 6, 6), f.inject(torch.randn(2, 4, 6, 6))
    expected = F.softsign(F.conv2d(z, f.weight, padding=2) + x)
    torch.testing.assert_close(f(z, x), expected)
    assert f.weight.shape == (4, 4, 5, 5) and (f.weight >= 0).all()


@pytest.mark.parametrize("mode", ["weight_norm", "parametrize", "project"])
def test_reference_initialisation(mode):
    torch.manual_seed(0)
    for layer, fan in [
        (PcDEQLinear(80, nonnegativity=mode), 160),
        (PcDEQConv2d(82, nonnegativity=mode), 164),
    ]:
        w = layer.weight.detach()
        bound = 1e-2 / fan**0.5
        assert w.min() >= 0 and w.max() < bound
        assert w.mean().item() == pytest.approx(bound / 2, rel=0.05)
    if mode == "weight_norm":
        chain = layer.conv.parametrizations.weight
        scale, direction = chain.original0.detach(), chain.original1.detach()
        torch.testing.assert_close(scale.flatten(), direction.flatten(1).norm(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_pcdeq1_injection_is_strictly_positive_even_where_softplus_underflows(dtype):
    f = PcDEQLinear(4, "tanh")
    u = torch.tensor([[-1e4, -200.0, 0.0, 3.0]], dtype=dtype)
    x = f.inject(u)
    assert x.dtype == dtype
    assert (x > 0).all()
    assert x[0, 3].item() == pytest.approx(3.0, rel=1e-2)


def test_pcdeq1_injection_is_softplus_beta5_plus_floor():
    f = PcDEQLinear(3, "relu6", injection_floor=1e-3)
    u = torch.randn(5, 3)
    torch.testing.assert_close(f.inject(u), F.softplus(u, beta=5) + 1e-3)


def test_pcdeq2_injection_is_relu():
    f = PcDEQLinear(3, "sigmoid")
    u = torch.tensor([[-1.0, 0.0, 2.0]])
    assert torch.equal(f.inject(u), torch.tensor([[0.0, 0.0, 2.0]]))
    assert f(torch.zeros(1, 3), f.inject(u)).shape == (1, 3)  # zero injection is admissible here


def test_constructor_errors():
    with pytest.raises(UnknownNameError, match="'relu6', 'sigmoid', 'softsign', 'tanh'"):
        PcDEQLinear(4, "relu")
    with pytest.raises(UnknownNameError, match="Valid: 'parametrize', 'project', 'weight_norm'"):
        PcDEQLinear(4, nonnegativity="clamp")
    with pytest.raises(InvalidInputError, match="odd kernel_size"):
        PcDEQConv2d(4, kernel_size=2)
    with pytest.raises(InvalidInputError, match="features must be a positive integer, got 0"):
        PcDEQLinear(0)
    for floor in (0.0, math.inf, math.nan, True):
        with pytest.raises(
            InvalidInputError, match=f"injection_floor must be a positive finite number, got {floor}"
        ):
            PcDEQLinear(3, injection_floor=floor)


def test_shape_errors_say_what_was_expected():
    lin = PcDEQLinear(8)
    with pytest.raises(InvalidInputError, match=r"\(batch, \.\.\., 8\).*got shape \(8,\)"):
        lin(torch.zeros(8), torch.ones(8))
    with pytest.raises(InvalidInputError, match=r"got shape \(8, 3\)"):
        lin.inject(torch.zeros(8, 3))  # batch dimension last
    with pytest.raises(InvalidInputError, match="injection must have the state's shape"):
        lin(torch.zeros(2, 8), torch.ones(1, 8))
    with pytest.raises(InvalidInputError, match=r"state's shape \(2, 8\), got float"):
        lin(torch.zeros(2, 8), 0.5)
    with pytest.raises(InvalidInputError, match=r"\(batch, \.\.\., 8\).*got list"):
        lin([torch.zeros(2, 8)], torch.ones(2, 8))  # e.g. a list of states from a helper
    conv = PcDEQConv2d(4)
    with pytest.raises(InvalidInputError, match=r"\(batch, 4, height, width\), got shape \(2, 3, 5, 5\)"):
        conv(torch.zeros(2, 3, 5, 5), torch.ones(2, 3, 5, 5))


def test_dtype_and_device_mismatch():
    lin = PcDEQLinear(4)
    with pytest.raises(InvalidInputError, match=r"torch.float64.*weights torch.float32"):
        lin(torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(torch.zeros(2, 4), lin.inject(torch.randn(2, 4)))
    assert torch.isfinite(out).all()


def test_non_finite_injection_is_reported():
    lin = PcDEQLinear(4)
    u = torch.randn(2, 4)
    u[0, 1] = float("nan")
    u[1, 2] = float("inf")
    x = lin.inject(u)  # NaN and Inf pass through softplus ...
    with pytest.raises(InvalidInputError, match="injection holds 1 NaN and 1 Inf entries out of 8"):
        lin(torch.zeros(2, 4), x)  # ... and the first call reports them
    with pytest.raises(InvalidInputError, match="1 NaN and 1 Inf"):
        lin(torch.zeros(2, 4), u)


def test_non_admissible_injection_is_reported_and_rechecked_after_in_place_change():
    lin = PcDEQLinear(4, "tanh")
    with pytest.raises(
        InvalidInputError, match=r"strictly positive injection, got 4 entries.*layer.inject\(u\)"
    ):
        lin(torch.zeros(1, 4), torch.zeros(1, 4))
    x = lin.inject(torch.randn(1, 4))
    lin(torch.zeros(1, 4), x)
    with torch.no_grad():
        x.mul_(-1.0)
    with pytest.raises(InvalidInputError, match="strictly positive"):
        lin(torch.zeros(1, 4), x)
    sig = PcDEQLinear(4, "sigmoid")
    with pytest.raises(InvalidInputError, match="nonnegative injection"):
        sig(torch.zeros(1, 4), -torch.ones(1, 4))


def test_a_state_of_another_dtype_is_reported_after_the_injection_was_verified():
    """The checks run once per injection and kind of state, not once per injection."""
    lin = PcDEQLinear(4, "tanh")
    x = lin.inject(torch.randn(2, 4))
    lin(torch.rand(2, 4), x)  # verified with a float32 state
    with pytest.raises(InvalidInputError, match=r"state torch\.float64 and injection torch\.float32"):
        lin(torch.rand(2, 4, dtype=torch.float64), x)  # was a bare RuntimeError from the product


@pytest.mark.parametrize("mode", ["weight_norm", "project"])
def test_weights_moved_to_another_dtype_are_reported_after_the_injection_was_verified(mode):
    lin = PcDEQLinear(4, nonnegativity=mode)
    z, x = torch.rand(2, 4), lin.inject(torch.randn(2, 4))
    lin(z, x)  # verified with float32 weights
    lin.double()
    with pytest.raises(InvalidInputError, match=r"injection torch\.float32, weights torch\.float64"):
        lin(z, x)  # was a bare RuntimeError from the product
    # verified under autocast, which mixes dtypes, then called outside it
    lin = PcDEQLinear(4, nonnegativity=mode)
    z, x = z.bfloat16(), lin.inject(torch.randn(2, 4)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(z, x)
    with pytest.raises(InvalidInputError, match=r"injection torch\.bfloat16, weights torch\.float32"):
        lin(z, x)


def test_project_mode_reports_weights_made_negative_by_hand():
    lin = PcDEQLinear(4, nonnegativity="project")
    x = lin.inject(torch.randn(1, 4))
    lin(torch.zeros(1, 4), x)
    with torch.no_grad():
        lin.linear.weight[1, 2] = -0.5
    with pytest.raises(NegativeWeightError, match=r"1 negative entry \(min -0.5\).*attach_projection"):
        lin(torch.zeros(1, 4), x)
    set_weight(lin, torch.rand(4, 4))
    assert torch.isfinite(lin(torch.zeros(1, 4), x)).all()


@pytest.mark.parametrize("mode", ["weight_norm", "parametrize"])
def test_parametrized_modes_restore_the_guarantee_for_weights_set_by_hand(mode):
    lin = PcDEQLinear(3, nonnegativity=mode)
    with pytest.warns(PcDEQWarning, match="absolute values"):
        lin.linear.weight = -torch.ones(3, 3)
    torch.testing.assert_close(lin.weight, torch.ones(3, 3))
    with torch.no_grad():
        for p in lin.parameters():
            p.mul_(-1.0)
    assert (lin.weight >= 0).all()


def test_layers_work_under_inference_mode():
    f = PcDEQConv2d(3)
    with torch.inference_mode():
        x = f.inject(torch.randn(1, 3, 4, 4))
        z = f(f(torch.zeros_like(x), x), x)
    assert (z > 0).all()


def test_whole_module_pickles_after_a_forward(tmp_path):
    # PyTorch serialises parametrized modules through state_dict only; "project" has none
    f = PcDEQLinear(5, nonnegativity="project")
    x = f.inject(torch.randn(2, 5))
    out = f(torch.zeros(2, 5), x)
    torch.save(f, tmp_path / "f.pt")
    loaded = torch.load(tmp_path / "f.pt", weights_only=False)
    torch.testing.assert_close(loaded(torch.zeros(2, 5), x), out)


def test_a_project_layer_built_under_inference_mode_runs_and_still_checks_its_weight():
    """Found by review: its weight, an inference tensor, has no version counter to key the
    check on, which raised PyTorch's raw "Inference tensors do not track version counter"."""
    with torch.inference_mode():
        f = PcDEQLinear(4, nonnegativity="project")
        x = f.inject(torch.randn(2, 4))
        assert torch.equal(f(torch.zeros_like(x), x), torch.tanh(x))
        f.linear.weight[0, 0] = -1.0  # (an edit in place, which no version counter records)
        with pytest.raises(NegativeWeightError, match="1 negative entry"):
            f(torch.zeros_like(x), x)

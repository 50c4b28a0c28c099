import math

import pytest
import torch

from torchdeq_pcdeq import (
    Activation,
    ActivationCheckError,
    InvalidInputError,
    PcDEQLinear,
    UnknownNameError,
    available_activations,
    get_activation,
    register_activation,
    unregister_activation,
)


@pytest.mark.parametrize(
    ("name", "at_zero", "sup", "variant"),
    [("tanh", 0.0, 1.0, 1), ("softsign", 0.0, 1.0, 1), ("relu6", 0.0, 6.0, 1), ("sigmoid", 0.5, 1.0, 2)],
)
def test_builtin_records(name, at_zero, sup, variant):
    record = get_activation(name)
    assert (record.name, record.value_at_zero, record.supremum, record.variant) == (
        name,
        at_zero,
        sup,
        variant,
    )
    assert record(torch.zeros(1)).item() == at_zero
    assert record(torch.tensor([1e9])).item() == pytest.approx(sup)
    assert record.bounded


def test_builtins_pass_their_own_check():
    from torchdeq_pcdeq.activations import check_activation

    for name in ["tanh", "softsign", "relu6", "sigmoid"]:
        record = get_activation(name)
        assert check_activation(name, record.function, record.supremum) == record.value_at_zero


def test_register_valid_activation(clean_activation_registry):
    record = register_activation("expsat", lambda x: 1 - torch.exp(-x), supremum=1.0)
    assert (record.value_at_zero, record.variant) == (0.0, 1)
    assert get_activation("expsat") is record
    assert "expsat" in available_activations()
    shifted = register_activation("shifted", lambda x: 0.25 + 0.5 * torch.tanh(x), supremum=0.75)
    assert shifted.variant == 2 and shifted.value_at_zero == 0.25


def test_register_unbounded_activation(clean_activation_registry):
    record = register_activation("log1p", torch.log1p, supremum=math.inf)
    assert not record.bounded


@pytest.mark.parametrize(
    ("function", "supremum", "property_", "where"),
    [
        (lambda x: x - 1.0, math.inf, "nonnegative", "at x=0"),
        (lambda x: torch.exp(-x), 1.0, "nondecreasing", "between x=0 and x=0.005"),
        (lambda x: x.square(), math.inf, "concave", "around x=0.005"),
        (lambda x: 2 * torch.tanh(x), 1.0, "bounded", "x=0.55"),
        (lambda x: torch.where(x > 50, torch.full_like(x, math.nan), torch.tanh(x)), 1.0, "finite", "x=50"),
    ],
)
def test_register_rejects_with_property_and_location(
    clean_activation_registry, function, supremum, property_, where
):
    with pytest.raises(ActivationCheckError, match=f"not {property_}") as err:
        register_activation("bad", function, supremum=supremum)
    assert where in str(err.value)
    assert "bad" not in available_activations()


def test_register_rejects_sin_where_it_turns_negative(clean_activation_registry):
    with pytest.raises(ActivationCheckError, match=r"not nonnegative .* at x=3\.14"):
        register_activation("sine", torch.sin, supremum=1.0)


def test_register_refuses_builtin_and_duplicates(clean_activation_registry):
    with pytest.raises(InvalidInputError, match="built-in"):
        register_activation("tanh", torch.tanh, supremum=1.0)
    register_activation("mine", torch.tanh, supremum=1.0)
    with pytest.raises(InvalidInputError, match="overwrite=True"):
        register_activation("mine", torch.tanh, supremum=1.0)
    replaced = register_activation("mine", torch.sigmoid, supremum=1.0, overwrite=True)
    assert replaced.variant == 2
    with pytest.raises(InvalidInputError, match="positive number"):
        register_activation("other", torch.tanh, supremum=0)


def test_register_reports_a_crashing_function(clean_activation_registry):
    def crash(x):
        raise RuntimeError("boom")

    with pytest.raises(ActivationCheckError, match="boom"):
        register_activation("crash", crash, supremum=1.0)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        get_activation("tahn")
    message = str(err.value)
    for name in ["relu6", "sigmoid", "softsign", "tanh"]:
        assert repr(name) in message
    assert "Did you mean 'tanh'?" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", [["tanh"], {}, None, 3])
def test_an_activation_that_is_not_a_name_is_a_typed_error(name):
    for refuse in (get_activation, unregister_activation, lambda n: PcDEQLinear(4, activation=n)):
        with pytest.raises(InvalidInputError, match=f"a str, e.g. 'tanh'.*got {type(name).__name__}"):
            refuse(name)


def test_unregister(clean_activation_registry):
    register_activation("tmp", torch.tanh, supremum=1.0)
    unregister_activation("tmp")
    assert "tmp" not in available_activations()
    with pytest.raises(InvalidInputError):
        unregister_activation("tanh")
    with pytest.raises(UnknownNameError):
        unregister_activation("tmp")


def test_record_passes_through_get_activation():
    record = Activation("custom", torch.tanh, 0.0, 1.0, 1)
    assert get_activation(record) is record


def test_a_value_at_zero_within_rounding_of_zero_is_pcdeq1(clean_activation_registry):
    record = register_activation("shifted", lambda x: torch.tanh(x) - 1e-12, supremum=1.0)
    assert record.value_at_zero == 0.0 and record.variant == 1


@pytest.mark.parametrize("name", ["tanh", "softsign", "relu6", "sigmoid"])
def test_each_builtin_slope_is_the_derivative_read_from_the_output(name):
    record = get_activation(name)
    u = torch.cat(
        [torch.linspace(-8, 8, 2001, dtype=torch.float64), torch.tensor([0.0, 6.0, 1e-9, 6 - 1e-9])]
    )
    u.requires_grad_()
    (expected,) = torch.autograd.grad(record.function(u).sum(), u)
    torch.testing.assert_close(record.slope(record.function(u.detach())), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["tanh", "softsign", "relu6", "sigmoid"])
def test_each_builtin_derivative_from_the_pre_activation_keeps_its_digits_where_the_output_saturates(name):
    """The certificates' sigma': within a few ulps in float32 over [-1, 100] where normal, also
    where the output rounds to its limit and the slope read from it is 0 (tanh beyond u = 9)."""
    record = get_activation(name)
    u = torch.cat([torch.linspace(-1, 100, 20_001), torch.tensor([0.0, 1e-8, 5.9999, 6.0, 15.1, 17.0, 89.0])])
    exact = record.derivative(u.double())
    if name != "relu6":  # float64's own formula, against autograd where float64's output keeps digits
        u64 = u.double()[u < 8].requires_grad_()
        (autograd,) = torch.autograd.grad(record.function(u64).sum(), u64)
        torch.testing.assert_close(exact[u < 8], autograd, rtol=1e-9, atol=0)
    normal = exact > torch.finfo(torch.float32).tiny
    error = (record.derivative(u).double() - exact).abs() / exact.where(normal, 1.0)
    assert float(error[normal].max()) <= 4 * torch.finfo(torch.float32).eps
    if name in ("tanh", "sigmoid"):  # what the derivative is for: the slope keeps no digits here
        saturated = torch.tensor([17.0])
        assert float(record.slope(record.function(saturated))) == 0.0 < float(record.derivative(saturated))

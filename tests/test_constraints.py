import copy

import pytest
import torch
import torchdeq
from torch import nn
from torch.nn.utils import parametrize

from torchdeq_pcdeq import (
    InvalidInputError,
    NegativeWeightError,
    NonNegative,
    NonNegativeWeightNorm,
    PcDEQConv2d,
    PcDEQLinear,
    PcDEQWarning,
    UnknownNameError,
    attach_projection,
    constrain_nonnegative,
    layers,
    reference_init_,
)
from torchdeq_pcdeq.constraints import weight_cache

MODES = ["weight_norm", "parametrize", "project"]


def test_weight_norm_formula_and_sign():
    norm = NonNegativeWeightNorm(dim=0)
    scale = torch.tensor([[2.0], [-3.0]])
    direction = torch.tensor([[3.0, -4.0], [0.0, 1.0]])
    expected = torch.tensor([[2.0 * 3 / 5, 2.0 * 4 / 5], [0.0, 3.0]])
    assert torch.equal(norm(scale, direction), expected)


def test_weight_norm_conv_keeps_one_scale_per_output_channel():
    direction = torch.randn(4, 3, 3, 3)
    scale = torch.rand(4, 1, 1, 1)
    w = NonNegativeWeightNorm(dim=0)(scale, direction)
    assert (w >= 0).all()
    torch.testing.assert_close(w.flatten(1).norm(dim=1), scale.flatten())


def test_weight_norm_zero_row_gives_zero_not_nan_in_value_and_gradient():
    scale = torch.ones(3, 1, requires_grad=True)
    direction = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 1.0]], requires_grad=True)
    w = NonNegativeWeightNorm()(scale, direction)
    assert torch.equal(w[1], torch.zeros(2))
    assert torch.isfinite(w).all()
    w.sum().backward()
    assert torch.isfinite(scale.grad).all() and torch.isfinite(direction.grad).all()
    assert torch.equal(direction.grad[1], torch.zeros(2))


@pytest.mark.parametrize("parametrization", [NonNegative(), NonNegativeWeightNorm()])
def test_parametrizations_gradcheck_float64(parametrization):
    torch.manual_seed(0)
    raw = torch.rand(4, 5, dtype=torch.float64) + 0.1
    if isinstance(parametrization, NonNegative):
        assert torch.autograd.gradcheck(parametrization, (raw.requires_grad_(),))
    else:
        scale = (torch.rand(4, 1, dtype=torch.float64) + 0.5).requires_grad_()
        assert torch.autograd.gradcheck(parametrization, (scale, raw.requires_grad_()))


def test_right_inverse_round_trips_nonnegative_weights():
    w = torch.rand(5, 4)
    for p in (NonNegative(), NonNegativeWeightNorm()):
        originals = p.right_inverse(w)
        originals = originals if isinstance(originals, tuple) else (originals,)
        torch.testing.assert_close(p(*originals), w)


def test_registering_on_negative_weights_warns_and_uses_absolute_values():
    lin = nn.Linear(4, 4, bias=False)
    original = lin.weight.detach().clone()
    with pytest.warns(PcDEQWarning, match="negative entries"):
        constrain_nonnegative(lin, "weight_norm")
    torch.testing.assert_close(lin.weight, original.abs())


def test_a_default_initialised_weight_made_nonnegative_is_said_to_saturate_the_activation():
    """PyTorch's default init of a 64-unit layer, made |W|: rows summing to about 4, z* near 1."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    gain = lin.weight.detach().abs().sum(1).max().item()
    with pytest.warns(PcDEQWarning, match=rf"rows sum to up to {gain:.3g}: above 1.*gradients vanish"):
        constrain_nonnegative(lin, "weight_norm")
    small = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        small.weight.copy_(
            reference_init_(torch.empty(64, 64)) * torch.where(torch.rand(64, 64) < 0.5, -1, 1)
        )
    with pytest.warns(PcDEQWarning, match="negative entries") as caught:
        constrain_nonnegative(small, "weight_norm")
    assert "rows sum" not in str(caught[0].message)  # a small weight does not saturate anything


def test_the_negative_weight_warning_names_the_parameter_it_is_about():
    class TwoWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(-torch.ones(3, 3) / 9), nn.Parameter(torch.ones(3, 3) / 9)

    module = TwoWeights()
    with pytest.warns(
        PcDEQWarning, match=r"^NonNegative on TwoWeights\.w1: .*reference_init_\(module\.w1\)"
    ) as caught:
        constrain_nonnegative(module, "parametrize", name="w1")
        constrain_nonnegative(module, "weight_norm", name="w2")  # nonnegative: no warning
    assert len(caught) == 1
    # a pcDEQ layer's operator is named as the user reaches it
    layer = PcDEQLinear(3)
    with pytest.warns(PcDEQWarning, match=r"^NonNegativeWeightNorm on PcDEQLinear\.linear\.weight: "):
        layer.weight = -torch.ones(3, 3) / 9
    # registered by hand, the parametrization knows no names, and says so plainly
    lin = nn.Linear(3, 3, bias=False)
    with pytest.warns(PcDEQWarning, match=r"^NonNegativeWeightNorm: .*reference_init_\(module\.weight\)"):
        parametrize.register_parametrization(lin, "weight", NonNegativeWeightNorm())


def test_constrain_nonnegative_rejects_unknown_mode_and_double_registration():
    lin = nn.Linear(3, 3, bias=False)
    reference_init_(lin.weight)
    with pytest.raises(UnknownNameError, match="'parametrize', 'project', 'weight_norm'"):
        constrain_nonnegative(lin, "clamp")
    constrain_nonnegative(lin, "parametrize")
    with pytest.raises(InvalidInputError, match="already parametrized"):
        constrain_nonnegative(lin, "weight_norm")
    with pytest.raises(InvalidInputError, match="no tensor 'kernel'"):
        constrain_nonnegative(nn.Linear(2, 2), "parametrize", name="kernel")


@pytest.mark.parametrize("mode", MODES)
def test_each_layer_mechanism_keeps_weights_nonnegative_through_100_large_adamw_steps(mode):
    torch.manual_seed(0)
    f = PcDEQLinear(16, nonnegativity=mode)
    inj = nn.Linear(16, 16)
    u = torch.randn(8, 16)
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=60, pcdeq_nonconvergence="ignore")
    start = f.weight.detach().clone()
    opt = torch.optim.AdamW([*f.parameters(), *inj.parameters()], lr=1.0, weight_decay=1e-2)
    if mode == "project":
        attach_projection(opt, f)
    target = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    mins = []
    for _ in range(100):
        x = f.inject(inj(u))
        z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
        loss = (z_out[-1] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mins.append(f.weight.detach().min().item())
    assert min(mins) >= 0.0
    assert torch.isfinite(f.weight).all()
    assert (f.weight.detach() - start).abs().max() > 1e-2, "the weights must actually have been trained"


def test_pcdeq_nonneg_norm_keeps_plain_linear_nonnegative_through_100_large_adamw_steps():
    torch.manual_seed(0)
    f = nn.Linear(16, 16, bias=False)
    reference_init_(f.weight)
    torchdeq.apply_norm(f, norm_type="pcdeq_nonneg")
    deq = torchdeq.get_deq(core="pcdeq", f_max_iter=60, pcdeq_nonconvergence="ignore")
    u = torch.randn(8, 16, requires_grad=True)
    opt = torch.optim.AdamW([*f.parameters(), u], lr=1.0, weight_decay=1e-2)
    target = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(100):
        torchdeq.reset_norm(f)
        x = nn.functional.softplus(u, beta=5) + 1e-6
        z_out, _ = deq(lambda z: torch.tanh(f(z) + x), torch.zeros_like(x))
        loss = (z_out[-1] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert f.weight.min() >= 0
    assert torch.isfinite(f.weight).all()


@pytest.mark.parametrize("mode", MODES)
def test_layers_deepcopy_and_state_dict_round_trip(mode, tmp_path):
    torch.manual_seed(0)
    f = PcDEQLinear(6, nonnegativity=mode)
    x = f.inject(torch.randn(2, 6))
    z = torch.rand(2, 6)
    clone = copy.deepcopy(f)
    torch.testing.assert_close(clone(z, x), f(z, x), rtol=0, atol=0)
    with torch.no_grad():
        next(clone.parameters()).mul_(2.0)
    assert not torch.equal(clone.weight, f.weight), "the copy must not share parameters"

    torch.save(f.state_dict(), tmp_path / "f.pt")
    fresh = PcDEQLinear(6, nonnegativity=mode)
    fresh.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True))
    torch.testing.assert_close(fresh(z, x), f(z, x), rtol=0, atol=0)


def test_pcdeq_nonneg_norm_deepcopy_and_remove():
    f = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Conv2d(2, 2, 3, padding=1, bias=False))
    for m in f:
        reference_init_(m.weight)
    torchdeq.apply_norm(f, norm_type="pcdeq_nonneg")
    assert all(parametrize.is_parametrized(m, "weight") for m in f)
    clone = copy.deepcopy(f)
    torch.testing.assert_close(clone[0].weight, f[0].weight)
    before = [m.weight.detach().clone() for m in f]
    torchdeq.remove_norm(f)
    for m, w in zip(f, before):
        assert not parametrize.is_parametrized(m)
        assert isinstance(m.weight, nn.Parameter)
        torch.testing.assert_close(m.weight.detach(), w)
        assert (m.weight >= 0).all()


def test_pcdeq_nonneg_norm_survives_gradient_accumulation():
    torch.manual_seed(0)
    f = nn.Linear(6, 6, bias=False)
    reference_init_(f.weight)
    torchdeq.apply_norm(f, norm_type="pcdeq_nonneg")
    deq = torchdeq.get_deq(core="pcdeq")
    xs = [torch.rand(3, 6) + 0.1 for _ in range(2)]

    def loss(x):
        torchdeq.reset_norm(f)
        return deq(lambda z: torch.tanh(f(z) + x), torch.zeros_like(x))[0][-1].sum()

    total = loss(xs[0]) + loss(xs[1])  # two forwards, one backward
    total.backward()
    accumulated = [p.grad.clone() for p in f.parameters()]
    f.zero_grad()
    for x in xs:
        loss(x).backward()
    for a, b in zip(accumulated, (p.grad for p in f.parameters())):
        torch.testing.assert_close(a, b)


def test_pcdeq_nonneg_reports_unsupported_torchdeq_options():
    lin = nn.Linear(3, 3)
    reference_init_(lin.weight)
    with pytest.warns(PcDEQWarning, match="norm_clip"):
        torchdeq.apply_norm(lin, norm_type="pcdeq_nonneg", args={"norm_clip": True})


def test_attach_projection_errors():
    f = PcDEQLinear(4)  # weight_norm: nothing to project
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    with pytest.raises(InvalidInputError, match="no pcDEQ layer with nonnegativity='project'"):
        attach_projection(opt, f)
    g = PcDEQLinear(4, nonnegativity="project")
    with pytest.raises(InvalidInputError, match="not updated by this optimizer"):
        attach_projection(opt, g)
    opt_g = torch.optim.SGD(g.parameters(), lr=0.1)
    with torch.no_grad():
        g.linear.weight[0, 0] = -1.0
    with pytest.raises(NegativeWeightError, match="1 negative entries"):
        attach_projection(opt_g, g)


def test_attach_projection_leaves_out_frozen_layers_of_a_module():
    """A frozen layer needs no projection: the optimizer of the rest is accepted, not told to
    pass "the optimizer that trains them"."""
    frozen, trained = PcDEQLinear(4, nonnegativity="project"), PcDEQLinear(4, nonnegativity="project")
    frozen.requires_grad_(False)
    model = nn.ModuleList([frozen, trained])
    opt = torch.optim.SGD(trained.parameters(), lr=10.0)
    attach_projection(opt, model)
    trained.linear.weight.grad = torch.ones(4, 4)
    opt.step()
    assert bool((trained.linear.weight >= 0).all())
    with pytest.raises(InvalidInputError, match=r"all 1 weight.* are frozen .* not in this optimizer"):
        attach_projection(opt, frozen)
    # a frozen weight the optimizer holds is projected once it is unfrozen (progressive unfreezing)
    frozen = PcDEQLinear(4, nonnegativity="project").requires_grad_(False)
    opt = torch.optim.SGD(frozen.parameters(), lr=10.0)
    attach_projection(opt, frozen)
    frozen.requires_grad_(True)
    frozen.linear.weight.grad = torch.ones(4, 4)
    opt.step()
    assert bool((frozen.linear.weight >= 0).all())


@pytest.mark.parametrize("nonnegativity", ["weight_norm", "parametrize", "project"])
def test_a_layer_built_on_the_meta_device_loads_a_checkpoint(nonnegativity):
    """meta -> to_empty -> load_state_dict, the usual way to load a large model: the negative-
    initialisation check has no values to read on "meta"."""
    source = PcDEQConv2d(3, nonnegativity=nonnegativity)
    target = PcDEQConv2d(3, nonnegativity=nonnegativity, device="meta").to_empty(device="cpu")
    target.load_state_dict(source.state_dict())
    x, z = torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5)
    assert torch.equal(target(z, x), source(z, x))
    meta = nn.Sequential(nn.Linear(4, 4, bias=False, device="meta"))
    torchdeq.apply_norm(meta, norm_type="pcdeq_nonneg")
    assert meta[0].weight.is_meta


def test_projection_clamps_after_each_step_and_detaches():
    g = PcDEQLinear(4, nonnegativity="project")
    opt = torch.optim.SGD(g.parameters(), lr=1.0)
    handle = attach_projection(opt, g)
    g.linear.weight.grad = torch.ones(4, 4)
    opt.step()
    assert torch.equal(g.linear.weight.detach(), torch.zeros(4, 4))
    handle.remove()
    g.linear.weight.grad = torch.ones(4, 4)
    opt.step()
    assert (g.linear.weight < 0).all()


def test_weight_norm_is_exact_in_half_precision():
    torch.manual_seed(0)
    f = PcDEQLinear(80)  # reference init: entries near 1e-4, squares subnormal in float16
    expected = f.weight.detach().clone()
    f.half()
    torch.testing.assert_close(f.weight.float(), expected, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("mode", ["parametrize", "weight_norm"])
def test_zero_entries_and_rows_of_an_assigned_weight_train(mode):
    """abs has no gradient at 0: a weight from the projection (clamped zeros) assigned to a
    parametrized layer must not leave its zeros dead; its value is kept to below rounding."""
    f = PcDEQLinear(4, nonnegativity=mode)
    weight = torch.rand(4, 4) + 0.1
    weight[0, 1] = 0.0  # one zero entry
    weight[2] = 0.0  # one zero row
    f.linear.weight = weight
    assert f.weight[2].max() <= 1e-38 and f.weight[0, 1] <= 1e-38
    torch.testing.assert_close(f.weight, weight, rtol=1e-6, atol=1e-38)
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    for _ in range(3):  # a loss that pushes every entry up
        opt.zero_grad()
        (-f.weight.sum()).backward()
        opt.step()
    assert f.weight[0, 1] > 1e-3 and (f.weight[2] > 1e-3).all()


def test_weight_norm_right_inverse_keeps_float16_weights():
    """The scale accumulates in float32, as the forward does: float16 squares underflow."""
    p = NonNegativeWeightNorm()
    weight = (torch.rand(3, 1000) * 2e-4 + 1e-5).half()  # squares of about 1e-8: subnormal or 0
    torch.testing.assert_close(p(*p.right_inverse(weight)), weight, rtol=2e-3, atol=0)
    layer = PcDEQLinear(1000, dtype=torch.float16)  # the reference initialisation, in float16
    scale = layer.linear.parametrizations.weight.original0.float().flatten()
    torch.testing.assert_close(scale, layer.weight.float().norm(dim=1), rtol=2e-3, atol=0)


# -- the solves' weight cache --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weight_norm", "parametrize"])
def test_the_weight_cache_computes_once_and_again_only_when_the_raw_weight_changed(mode, monkeypatch):
    parametrization = {"weight_norm": NonNegativeWeightNorm, "parametrize": NonNegative}[mode]
    computed = []
    compute = parametrization._weight
    monkeypatch.setattr(
        parametrization, "_weight", lambda self, *raw: computed.append(1) or compute(self, *raw)
    )
    layer = PcDEQLinear(4, nonnegativity=mode)
    lin = nn.Linear(4, 4, bias=False)
    reference_init_(lin.weight)
    constrain_nonnegative(lin, mode)
    chain = lin.parametrizations.weight
    raw = chain.original if mode == "parametrize" else chain.original0  # |V|, or the scale |g|
    for read in (lambda: layer._weight_in(layers._CONTEXT), lambda: lin.weight):
        computed.clear()
        with torch.no_grad(), weight_cache():
            first = [read() for _ in range(5)]
            assert len(computed) == 1 and all(w is first[0] for w in first)
            with torch.enable_grad():  # recording: computed every time, tracked
                assert read().requires_grad and read().requires_grad and len(computed) == 3
        with torch.no_grad():
            read()  # outside a block: computed every time
        assert len(computed) == 4
    with torch.no_grad(), weight_cache():
        before = lin.weight
        raw.mul_(2)  # changed in place (|2 V|, or the scale |2 g|): computed again
        assert torch.equal(lin.weight, 2 * before)


@pytest.mark.parametrize("mode", ["weight_norm", "parametrize"])
def test_the_weight_cache_follows_parameters_swapped_in_by_functional_call(mode):
    # e.g. f averaging one layer over two parameter sets: each call must use its own set
    layer = PcDEQLinear(4, nonnegativity=mode)
    z, x = torch.rand(2, 4), layer.inject(torch.randn(2, 4))
    first = {name: p.detach().clone() for name, p in layer.named_parameters()}  # version 0, as second
    second = {name: 3 * p for name, p in first.items()}
    with torch.no_grad():
        expected = [torch.func.functional_call(layer, params, (z, x)) for params in (first, second)]
        with weight_cache():
            got = [torch.func.functional_call(layer, params, (z, x)) for params in (first, second) * 2]
    assert not torch.equal(expected[0], expected[1])
    for out, want in zip(got, expected * 2):
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_a_weight_chained_with_another_parametrization_is_not_kept_by_the_layer():
    # The other parametrization may hold state of its own (here a scale): its weight is computed
    # at each call, and ours, first in the chain, still comes from the cache.
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(1.0))

        def forward(self, weight):
            return self.s * weight

    layer = PcDEQLinear(4)
    parametrize.register_parametrization(layer.linear, "weight", Scale())
    base = layer.weight.detach().clone()
    with torch.no_grad(), weight_cache():
        for gain in (0.5, 0.25):
            params = {"linear.parametrizations.weight.1.s": torch.tensor(gain)}
            torch.testing.assert_close(
                torch.func.functional_call(layer, params, (torch.ones(1, 4), torch.ones(1, 4))),
                torch.tanh(torch.ones(1, 4) @ (gain * base).T + 1),
            )
        layer.linear.parametrizations.weight[1].s.fill_(0.1)
        torch.testing.assert_close(layer._weight_in(layers._CONTEXT), 0.1 * base)


@pytest.mark.parametrize("nonnegativity", ["weight_norm", "parametrize", "project"])
def test_assigning_a_layers_weight_stores_it_in_every_mode(nonnegativity):
    """``layer.weight = W`` raised a raw AttributeError (and a raw KeyError for an nn.Parameter);
    it now stores W: through the parametrization, or checked and copied in "project" mode."""
    torch.manual_seed(0)
    f = PcDEQLinear(4, nonnegativity=nonnegativity)
    names = [name for name, _ in f.named_parameters()]
    target = torch.rand(4, 4)
    f.weight = target
    torch.testing.assert_close(f.weight.detach(), target)
    f.weight = nn.Parameter(2 * target)
    torch.testing.assert_close(f.weight.detach(), 2 * target)
    assert [name for name, _ in f.named_parameters()] == names  # no second parameter
    with pytest.raises(InvalidInputError, match=r"the weight's shape \(4, 4\), got shape \(3, 4\)"):
        f.weight = torch.rand(3, 4)
    f.weight = 3 * target.double()  # converted to the layer's dtype, as copy_ would
    torch.testing.assert_close(f.weight.detach(), 3 * target)
    on_meta = PcDEQLinear(4, nonnegativity=nonnegativity, device="meta")
    on_meta.weight = torch.empty(4, 4, device="meta")  # (no values to check yet)
    assert on_meta.weight.is_meta
    if nonnegativity == "project":
        negative = target.clone()
        negative[0, 0] = -1.0
        with pytest.raises(NegativeWeightError, match="assigned weight has 1 negative entry;"):
            f.weight = negative
        torch.testing.assert_close(f.weight.detach(), 3 * target)  # unchanged


@pytest.mark.parametrize(("saved", "built"), [("weight_norm", "project"), ("project", "parametrize")])
def test_a_checkpoint_of_another_nonnegativity_mode_is_named_as_such(saved, built):
    """PyTorch's error listed parametrization keys, and strict=False kept the initial W silently."""
    source, target = PcDEQLinear(4, nonnegativity=saved), PcDEQLinear(4, nonnegativity=built)
    message = f"under the keys of nonnegativity='{saved}'.*stores it as nonnegativity='{built}' does"
    for strict in (True, False):
        with pytest.raises(InvalidInputError, match=message):
            target.load_state_dict(source.state_dict(), strict=strict)
    folded = PcDEQLinear(4)
    folded.fold_nonnegativity()  # a folded layer is a "project" one: its checkpoint loads there
    PcDEQLinear(4, nonnegativity="project").load_state_dict(folded.state_dict())
    # judged by what the layer holds now: a buffer of its operator (the same key in every mode)
    # is not its W, and a parametrization removed by hand leaves a plain weight
    masked = PcDEQLinear(4, nonnegativity=built)
    masked.linear.register_buffer("mask", torch.ones(4, 4))
    source.linear.register_buffer("mask", torch.ones(4, 4))
    with pytest.raises(InvalidInputError, match=message):
        masked.load_state_dict(source.state_dict(), strict=False)
    removed = PcDEQLinear(4, nonnegativity="weight_norm")
    parametrize.remove_parametrizations(removed.linear, "weight")
    with pytest.raises(InvalidInputError, match="stores it as nonnegativity='project' does"):
        removed.load_state_dict(PcDEQLinear(4).state_dict(), strict=False)


def test_a_project_layer_with_another_parametrization_loads_its_own_checkpoint():
    """Its own keys (a spectral norm's parametrizations.weight.original) are not another mode's."""
    layers = [PcDEQLinear(4, nonnegativity="project") for _ in range(2)]
    for layer in layers:
        nn.utils.parametrizations.spectral_norm(layer.linear)
    layers[1].load_state_dict(layers[0].state_dict())

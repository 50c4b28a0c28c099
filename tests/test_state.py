"""State: checkpoints mid-training, EMA copies and folding the parametrization, per mechanism.

Mechanisms: the layers' ``weight_norm``, ``parametrize`` and ``project`` modes, and TorchDEQ's
``apply_norm(norm_type="pcdeq_nonneg")`` on a plain ``nn.Linear``.
"""

from __future__ import annotations

import pytest
import torch
import torchdeq
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torchdeq_pcdeq import NegativeWeightError, PcDEQLinear, attach_projection, reference_init_

MECHANISMS = ["weight_norm", "parametrize", "project", "pcdeq_nonneg"]


class Cell(nn.Module):
    """``tanh(W z + x)`` with ``W >= 0`` kept by ``mechanism``; ``.weight`` is the effective W."""

    def __init__(self, mechanism: str, features: int = 6):
        super().__init__()
        if mechanism == "pcdeq_nonneg":
            self.linear = nn.Linear(features, features, bias=False)
            reference_init_(self.linear.weight)
            torchdeq.apply_norm(self.linear, norm_type="pcdeq_nonneg")
            self.layer = None
        else:
            self.layer = PcDEQLinear(features, nonnegativity=mechanism)
        self.deq = torchdeq.get_deq(core="pcdeq")

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight if self.layer is not None else self.linear.weight

    def forward(self, x):
        if self.layer is not None:
            step = lambda z: self.layer(z, x)  # noqa: E731
        else:
            step = lambda z: torch.tanh(self.linear(z) + x)  # noqa: E731
        z_out, info = self.deq(step, torch.zeros_like(x))
        return z_out[-1], info


def _optimizer(cell: Cell, mechanism: str, lr: float = 1.0) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(cell.parameters(), lr=lr)
    if mechanism == "project":
        attach_projection(optimizer, cell.layer)
    return optimizer


def _push_weights_negative(cell: Cell, optimizer, x) -> None:
    """One large step whose gradient drives every weight entry down (z grows with W)."""
    z, _ = cell(x)
    z.sum().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_checkpoint_saved_between_step_and_next_forward_loads_with_nonnegative_weights(mechanism, tmp_path):
    torch.manual_seed(0)
    cell = Cell(mechanism)
    optimizer = _optimizer(cell, mechanism, lr=50.0)  # a step far larger than any weight
    x = torch.rand(4, 6) + 0.1
    _push_weights_negative(cell, optimizer, x)
    torch.save(cell.state_dict(), tmp_path / "mid.pt")  # after step(), before the next forward

    fresh = Cell(mechanism)
    fresh.load_state_dict(torch.load(tmp_path / "mid.pt", weights_only=True))
    assert fresh.weight.min() >= 0
    torch.testing.assert_close(fresh.weight, cell.weight, rtol=0, atol=0)
    z_fresh, info = fresh(x)
    z_cell, _ = cell(x)
    assert bool(info["converged"].all())
    torch.testing.assert_close(z_fresh, z_cell, rtol=0, atol=0)


def test_the_step_above_would_make_an_unconstrained_weight_negative():
    """The checkpoint test is meaningful: the same step on a plain parameter goes negative."""
    torch.manual_seed(0)
    cell = Cell("project")
    optimizer = torch.optim.SGD(cell.parameters(), lr=50.0)  # no projection attached
    _push_weights_negative(cell, optimizer, torch.rand(4, 6) + 0.1)
    assert cell.layer.linear.weight.min() < 0


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_an_ema_copy_trains_along_and_keeps_the_guarantee(mechanism):
    torch.manual_seed(0)
    cell = Cell(mechanism)
    ema = AveragedModel(cell, multi_avg_fn=get_ema_multi_avg_fn(0.9))  # deep-copies the cell
    optimizer = _optimizer(cell, mechanism, lr=0.5)
    x = torch.rand(8, 6) + 0.1
    for _ in range(5):
        z, _ = cell(x)
        ((z - 0.3) ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(cell)
    assert ema.module.weight.min() >= 0
    assert not torch.equal(ema.module.weight, cell.weight), "the EMA must own its parameters"
    z_ema, info = ema(x)
    assert bool(info["converged"].all()) and torch.isfinite(z_ema).all()


@pytest.mark.parametrize("mechanism", ["weight_norm", "parametrize"])
@pytest.mark.parametrize("how", ["fold_nonnegativity", "remove_parametrizations"])
def test_removing_the_parametrization_leaves_a_plain_nonnegative_parameter(mechanism, how, tmp_path):
    torch.manual_seed(0)
    f = PcDEQLinear(6, nonnegativity=mechanism)
    x = f.inject(torch.randn(3, 6))
    z = torch.rand(3, 6)
    before_weight, before_out = f.weight.detach().clone(), f(z, x)
    if how == "fold_nonnegativity":
        f.fold_nonnegativity()
    else:
        parametrize.remove_parametrizations(f.linear, "weight", leave_parametrized=True)

    assert not parametrize.is_parametrized(f.linear)
    assert isinstance(f.linear.weight, nn.Parameter) and f.linear.weight.min() >= 0
    torch.testing.assert_close(f.linear.weight.detach(), before_weight, rtol=0, atol=0)
    torch.testing.assert_close(f(z, x), before_out, rtol=0, atol=0)
    assert f.projection_targets() == [f.linear.weight]

    # A plain parameter is no longer nonnegative by construction: the forward checks it.
    with torch.no_grad():
        f.linear.weight[0, 0] = -1.0
    with pytest.raises(NegativeWeightError, match="1 negative entry"):
        f(z, x)


def test_removing_pcdeq_nonneg_through_torchdeq_leaves_a_plain_nonnegative_parameter():
    cell = Cell("pcdeq_nonneg")
    before = cell.weight.detach().clone()
    torchdeq.remove_norm(cell)
    assert isinstance(cell.linear.weight, nn.Parameter) and cell.linear.weight.min() >= 0
    torch.testing.assert_close(cell.linear.weight.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["project", "folded"])
def test_a_weight_edited_through_data_after_a_checked_forward_is_caught_at_the_next_solve(how):
    """``.data`` edits keep the version counter; the weight is checked again per injection
    (outside a solve) and per solve."""
    torch.manual_seed(0)
    f = PcDEQLinear(4, nonnegativity="project" if how == "project" else "weight_norm")
    if how == "folded":
        f.fold_nonnegativity()
    z = torch.rand(2, 4)
    f(z, f.inject(torch.randn(2, 4)))  # checked, and remembered as checked
    f.linear.weight.data[0, 0] = -0.5
    with pytest.raises(NegativeWeightError, match="1 negative entry"):
        f(z, f.inject(torch.randn(2, 4)))  # the next solve's injection


@pytest.mark.parametrize("how", ["project", "folded"])
def test_a_weight_edited_through_data_between_solves_with_one_injection_is_caught(how):
    """A solve that reuses the last solve's injection tensor (an evaluation loop over one batch)
    checks the weight again all the same: once per solve, not only per new injection."""
    torch.manual_seed(0)
    f = PcDEQLinear(4, nonnegativity="project" if how == "project" else "weight_norm")
    if how == "folded":
        f.fold_nonnegativity()
    deq = torchdeq.get_deq(core="pcdeq").eval()
    x = f.inject(torch.randn(2, 4))
    deq(lambda z: f(z, x), torch.zeros_like(x))
    f.linear.weight.data[0, 0] = -0.5
    with pytest.raises(NegativeWeightError, match="1 negative entry"):
        deq(lambda z: f(z, x), torch.zeros_like(x))


def test_a_folded_layer_checks_any_weight_it_is_given():
    torch.manual_seed(0)
    f = PcDEQLinear(4)
    f.fold_nonnegativity()
    x, z = f.inject(torch.randn(2, 4)), torch.rand(2, 4)
    with pytest.raises(NegativeWeightError):
        torch.func.functional_call(f, {"linear.weight": -torch.ones(4, 4)}, (z, x))


@pytest.mark.parametrize("gradient", [{}, {"hook_ift": True}, {"pcdeq_rate_bound": True}])
def test_a_whole_model_saved_with_torch_save_trains_as_the_original(gradient, tmp_path):
    # Whole-module pickling: PyTorch refuses it for parametrized modules (weight_norm and
    # parametrize modes), so the project mode stands for the core's part, its gradient producer.
    from torchdeq_pcdeq.models import build_model

    torch.manual_seed(0)
    model = build_model("linear", "mnist", nonnegativity="project", deq=gradient).double()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    images = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    grads = []
    for m in (model, loaded):
        logits, infos = m(images)
        logits.square().sum().backward()
        assert infos[0]["converged"].all()
        grads.append([p.grad for p in m.parameters()])
    for original, restored in zip(*grads, strict=True):
        torch.testing.assert_close(original, restored, rtol=0, atol=0)

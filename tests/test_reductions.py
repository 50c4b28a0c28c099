"""Reductions over states in any layout, and solves that never copy a channels-last state."""

import math

import pytest
import torch
import torchdeq

import torchdeq_pcdeq  # noqa: F401  (registers the pcdeq core)
from torchdeq_pcdeq import InvalidInputError, PcDEQConv2d
from torchdeq_pcdeq.reductions import extremes, sample_dims, storage_order

LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(1, 3).contiguous().transpose(1, 3),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_storage_order_is_a_contiguous_view_of_the_same_elements(layout):
    t = LAYOUTS[layout](torch.randn(3, 4, 5, 6))
    dense = storage_order(t)
    assert dense.is_contiguous()
    assert dense.data_ptr() == t.data_ptr()  # a view: nothing copied
    assert sorted(dense.flatten().tolist()) == sorted(t.flatten().tolist())


def test_storage_order_leaves_a_tensor_with_gaps_alone():
    t = torch.randn(3, 4, 5, 6)[:, :, ::2]  # not dense in any order
    assert storage_order(t) is t


@pytest.mark.parametrize("layout", LAYOUTS)
def test_extremes_are_the_minimum_and_maximum(layout):
    t = LAYOUTS[layout](torch.randn(3, 4, 5, 6))
    assert [v.item() for v in extremes(t)] == [t.min().item(), t.max().item()]
    t[1, 2, 3, 4] = math.nan
    assert all(math.isnan(v.item()) for v in extremes(t))
    gappy = torch.randn(3, 4, 5, 6)[:, :, ::2]
    assert [v.item() for v in extremes(gappy)] == [gappy.min().item(), gappy.max().item()]


def test_sample_dims_reduce_each_sample():
    t = LAYOUTS["channels_last"](torch.randn(3, 4, 5, 6))
    assert sample_dims(t) == (1, 2, 3)
    torch.testing.assert_close(t.amin(dim=sample_dims(t)), t.reshape(3, -1).amin(dim=1), rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match=r"shape \(3,\)"):
        sample_dims(torch.randn(3))  # dim=() would reduce over the whole batch


@pytest.mark.parametrize(
    "make", [lambda: torch.ones(3, 1).expand(3, 4), lambda: torch.randn(6).as_strided((3, 4), (1, 1))]
)
def test_extremes_of_expanded_or_overlapping_tensors_are_right(make):
    t = make()
    assert storage_order(t) is t  # no dense order: aminmax makes its own copy
    assert [v.item() for v in extremes(t)] == [t.min().item(), t.max().item()]


def _state_copies(run, shape) -> list[str]:
    """The copies of state-sized tensors that ``run`` makes, by name of the op that asked."""
    with torch.profiler.profile(record_shapes=True) as prof:
        run()
    return [
        event.cpu_parent.name if event.cpu_parent else event.name
        for event in prof.events()
        if event.name == "aten::copy_" and event.input_shapes and list(event.input_shapes[0]) == list(shape)
    ]


@pytest.mark.parametrize("gradient", ["ift", "hook_ift", None])
def test_a_channels_last_solve_with_its_guard_copies_no_state(gradient):
    """The guard's extremes, the injection's check and the statistics reduce in place.

    Before, ``torch.aminmax`` and ``flatten(1)`` copied the state at every check: on the MNIST
    single-conv model six copies per training step, 2.4% of its time.
    """
    torch.manual_seed(0)
    # NNPACK reads NCHW: its copy of a channels-last state is deliberate, and timed by "auto".
    f = PcDEQConv2d(8, conv_algorithm="pytorch")
    x = f.inject(torch.randn(4, 8, 6, 6)).contiguous(memory_format=torch.channels_last)
    grad = torch.rand_like(x)  # channels-last too: the backward has nothing to convert
    options = {"hook_ift": True} if gradient == "hook_ift" else {}
    deq = torchdeq.get_deq(core="pcdeq", pcdeq_guard="raise", **options).train(gradient is not None)

    def run():
        z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
        assert bool(info["converged"].all())
        if gradient is not None:
            z_out[-1].backward(grad)

    assert _state_copies(run, x.shape) == []

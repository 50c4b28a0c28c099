import warnings

import pytest
import torch

from torchdeq_pcdeq import InvalidInputError, PcDEQConv2d, PcDEQLinear, UnknownNameError
from torchdeq_pcdeq.models import ModelConfig, build_model

# Parameter counts of the reference (docs/method.md, section 4), weight-norm scale included.
COUNTS = [
    ("linear", "mnist", 70_410),
    ("single_conv", "mnist", 69_136),
    ("multi_conv", "mnist", 41_278),
    ("single_conv", "svhn", 164_760),
    ("single_conv", "cifar10", 164_760),
    ("multi_conv", "svhn", 130_950),
    ("multi_conv", "cifar10", 130_950),
    ("multi_conv", "cifar10_aug", 661_470),
]


@pytest.mark.parametrize(("architecture", "dataset", "count"), COUNTS)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_parameter_counts_match_the_reference(architecture, dataset, count, activation):
    model = build_model(architecture, dataset, activation=activation)
    assert model.num_parameters() == count
    assert all(layer.activation.name == activation for layer in model.layers)


@pytest.mark.parametrize(("architecture", "shape", "layers"), [
    ("linear", (3, 1, 28, 28), PcDEQLinear),
    ("single_conv", (3, 1, 28, 28), PcDEQConv2d),
    ("multi_conv", (3, 3, 32, 32), PcDEQConv2d),
])  # fmt: skip
def test_models_classify_and_report_one_info_per_equilibrium_layer(architecture, shape, layers):
    torch.manual_seed(0)
    dataset = "mnist" if shape[1] == 1 else "cifar10"
    model = build_model(ModelConfig(architecture, dataset, deq={"f_tol": 1e-5}))
    logits, infos = model(torch.rand(shape))
    assert logits.shape == (3, 10)
    assert len(infos) == len(model.layers) == (3 if architecture == "multi_conv" else 1)
    assert all(isinstance(layer, layers) for layer in model.layers)
    assert all(info["converged"].all() for info in infos)
    assert all(core.f_tol == 1e-5 and core.gradient == "hook_ift" for core in model.cores)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_names_and_missing_defaults():
    with pytest.raises(UnknownNameError, match="Valid: 'linear', 'multi_conv', 'single_conv'"):
        build_model("resnet")
    with pytest.raises(UnknownNameError, match="Unknown dataset 'imagenet'"):
        build_model("linear", "imagenet")
    with pytest.raises(InvalidInputError, match=r"no 'linear' model for 'cifar10'.*channels="):
        build_model("linear", "cifar10")
    assert build_model("linear", "cifar10", channels=16).num_parameters() > 0
    with pytest.raises(InvalidInputError, match="three positive channel counts"):
        build_model("multi_conv", "mnist", channels=12)
    with pytest.raises(
        InvalidInputError, match=r"three positive channel counts \(C1, C2, C3\), got \(12, 0, 48\)"
    ):
        build_model("multi_conv", "mnist", channels=(12, 0, 48))


def test_multi_conv_refuses_images_its_stages_would_shrink_below_its_pool():
    # whatever the width: no advice to pass channels=..., which cannot help
    for channels in (None, (4, 4, 4)):
        with pytest.raises(InvalidInputError, match=r"at least 19x19.*'digits' has 8x8 images"):
            build_model("multi_conv", "digits", channels=channels)


def test_a_deq_config_that_chooses_the_gradient_overrides_the_models_default():
    def gradients(deq):
        return {core.gradient for core in build_model("linear", "digits", deq=deq).cores}

    assert gradients({}) == {"hook_ift"}
    assert gradients({"ift": True}) == {"ift"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # grad is used: no warning that it is not
        assert gradients({"ift": False, "grad": 3}) == {"phantom"}


@pytest.mark.parametrize(
    ("architecture", "nonnegativity", "deq"),
    [
        ("linear", "weight_norm", None),
        ("single_conv", "parametrize", None),
        ("multi_conv", "project", None),
        ("single_conv", "weight_norm", {"hook_ift": False}),
        ("linear", "weight_norm", {"hook_ift": True, "pcdeq_rate_bound": True}),
        ("multi_conv", "weight_norm", {"pcdeq_enclosure": True}),
    ],
)
@pytest.mark.filterwarnings("ignore::torchdeq_pcdeq.PcDEQWarning")  # tolerances raised at random init
def test_training_a_model_keeps_the_live_tensors_flat(architecture, nonnegativity, deq):
    """No tensor outlives its step: the bytes held by live tensors stop growing after warm-up
    (a leak grows them by a state or more at every step)."""
    import gc

    import torch.nn.functional as F

    from torchdeq_pcdeq import attach_projection

    def live_bytes() -> int:
        gc.collect()
        return sum(
            o.untyped_storage().nbytes() for o in gc.get_objects() if issubclass(type(o), torch.Tensor)
        )

    torch.manual_seed(0)
    dataset = "cifar10" if architecture == "multi_conv" else "mnist"
    channels = {"linear": 16, "single_conv": 8, "multi_conv": (4, 8, 8)}[architecture]
    model = build_model(architecture, dataset, nonnegativity=nonnegativity, channels=channels, deq=deq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if nonnegativity == "project":
        attach_projection(optimizer, model)
    shape = (8, 3, 32, 32) if dataset == "cifar10" else (8, 1, 28, 28)
    sizes = []
    for _ in range(7):
        logits, _ = model(torch.rand(shape))
        loss = F.cross_entropy(logits, torch.randint(0, 10, (8,)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        del logits, loss
        sizes.append(live_bytes())
    # warm-up allocates for good (optimizer state, gradients' buffers, caches); then flat
    assert sizes[-3] == sizes[-2] == sizes[-1], sizes


@pytest.mark.parametrize(
    ("architecture", "shape"), [("single_conv", (4, 1, 28, 28)), ("multi_conv", (4, 3, 32, 32))]
)
def test_conv_models_compute_in_channels_last_without_converting_a_state(architecture, shape):
    """The images are made channels-last before the stem (a one-channel batch needs a real copy:
    its strides fit both layouts, and a convolution reads them as NCHW), so every injection
    reaches its solve in channels-last and, on PyTorch's kernels, no state-sized tensor changes
    layout (NNPACK, where "auto" picks it, reads NCHW: see conv_kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    dataset = "mnist" if shape[1] == 1 else "cifar10"
    model = build_model(architecture, dataset, channels=8 if architecture == "single_conv" else (4, 8, 8))
    conversions, injections = [], []

    copies = (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # images and states, not the head's pooled 3x3 or 1x1 features
            if func in copies and args[0].dim() == 4 and args[0].shape[-1] > 3:
                conversions.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    for layer in model.layers:
        layer.conv_algorithm = "pytorch"
        layer.register_forward_pre_hook(lambda module, inputs: injections.append(inputs[1]))
    with Copies():
        model(torch.rand(shape))
    assert conversions == [shape]  # the images, and nothing else
    assert injections and all(
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in injections
    )

"""The reference pcDEQ architectures (docs/method.md, section 4), built from a config.

Three architectures, each for pcDEQ-1 (``activation="tanh"``, injection ``softplus_5``) or
pcDEQ-2 (``activation="sigmoid"``, injection ``relu``), built only from the public API: pcDEQ
layers, their ``inject``, and the ``pcdeq`` core.

* ``linear`` (MNIST): Flatten, Linear(784, C), BN1d, inj, DEQ[C x C], BN1d, Linear(C, 10).
* ``single_conv``: Conv3x3(in, C), BN2d, inj, DEQ[conv C -> C], MaxPool(3, 1, 1), BN2d,
  AvgPool2d(8), Flatten, Linear(C * (H // 8)^2, 10).
* ``multi_conv``: three stages of [Conv3x3, BN, inj, DEQ, MaxPool, BN] with channels
  ``(C1, C2, C3)``, the second and third convolutions with stride 2 and no padding, then
  AvgPool2d(4), Flatten, Linear(C3, 10).

Default channels per dataset follow the reference; with the weight norm (the layers' default,
scale ``g`` counted) the parameter counts are those of docs/method.md: MNIST 70,410 / 69,136 /
41,278; SVHN and CIFAR-10 164,760 (single) and 130,950 (multi); CIFAR-10 with augmentation
661,470 (multi).

Example:
    >>> from torchdeq_pcdeq.models import build_model
    >>> model = build_model("linear", "mnist")
    >>> model.num_parameters()
    70410
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torchdeq
from torch import Tensor, nn

from .errors import InvalidInputError, check_choice
from .layers import PcDEQConv2d, PcDEQLayer, PcDEQLinear

__all__ = ["ARCHITECTURES", "DATASETS", "ModelConfig", "PcDEQClassifier", "build_model"]

ARCHITECTURES = ("linear", "single_conv", "multi_conv")
# The models' core config unless overridden: implicit differentiation through the single-graph
# hook (the default autograd.Function recomputes f in the backward pass). A deq config that sets
# ift or hook_ift itself chooses the gradient alone (ift=False: phantom gradients).
DEFAULT_DEQ = {"hook_ift": True}


@dataclass(frozen=True)
class _Dataset:
    in_channels: int
    image_size: int
    channels: dict  # architecture -> default channels


DATASETS = {
    "mnist": _Dataset(1, 28, {"linear": 80, "single_conv": 82, "multi_conv": (12, 24, 48)}),
    "svhn": _Dataset(3, 32, {"single_conv": 125, "multi_conv": (20, 50, 80)}),
    "cifar10": _Dataset(3, 32, {"single_conv": 125, "multi_conv": (20, 50, 80)}),
    "cifar10_aug": _Dataset(3, 32, {"multi_conv": (100, 120, 140)}),
    # no multi_conv: its two stride-2 stages leave 8x8 images 1x1, below its 4x4 average pool
    "digits": _Dataset(1, 8, {"linear": 64, "single_conv": 16}),
}


@dataclass
class ModelConfig:
    """What :func:`build_model` builds.

    Attributes:
        architecture: ``"linear"``, ``"single_conv"`` or ``"multi_conv"``.
        dataset: a key of :data:`DATASETS` (input shape and default channels).
        activation: ``"tanh"`` (pcDEQ-1, the default) or ``"sigmoid"`` (pcDEQ-2), or any
            registered activation.
        channels: width override (an int, or three ints for ``multi_conv``).
        nonnegativity: the layers' mechanism (default ``"weight_norm"``, as the reference).
        num_classes: output classes.
        deq: config of the ``pcdeq`` cores (a dict of TorchDEQ / plugin keys), on top of
            :data:`DEFAULT_DEQ` unless it sets ``ift`` or ``hook_ift`` (it then chooses the
            gradient alone).
    """

    architecture: str = "linear"
    dataset: str = "mnist"
    activation: str = "tanh"
    channels: int | tuple[int, ...] | None = None
    nonnegativity: str = "weight_norm"
    num_classes: int = 10
    deq: dict = field(default_factory=dict)


class PcDEQClassifier(nn.Module):
    """A stack of stages ``stem -> inject -> pcDEQ -> post`` and a classification head.

    ``forward`` returns ``(logits, infos)`` with one TorchDEQ ``info`` dict per equilibrium layer.
    """

    def __init__(
        self,
        stages: list[tuple[nn.Module, PcDEQLayer, nn.Module]],
        head: nn.Module,
        deq_config,
        channels_last: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.stems = nn.ModuleList(stem for stem, _, _ in stages)
        self.layers = nn.ModuleList(layer for _, layer, _ in stages)
        self.posts = nn.ModuleList(post for _, _, post in stages)
        self.head = head
        # One core per equilibrium layer: each keeps its own statistics and hooks.
        self.cores = nn.ModuleList(torchdeq.get_deq(_with_core(deq_config)) for _ in stages)

    def forward(self, images: Tensor, backward_writer=None) -> tuple[Tensor, list[dict]]:
        h, infos = images, []
        if self.channels_last:
            # The stem then computes in channels-last and hands the injection over without a
            # copy. (contiguous() would keep a one-channel batch as it is: its strides fit both
            # layouts, and the convolution reads them as NCHW.)
            h = images.clone(memory_format=torch.channels_last)
        for stem, layer, post, core in zip(self.stems, self.layers, self.posts, self.cores):
            x = layer.inject(stem(h))
            if self.channels_last:
                # oneDNN's convolutions run 10% (forward) to 30% (backward) faster on CPU in
                # channels-last layout. Where the layer's W z runs on NNPACK (conv_kernels) the
                # iterates after the first are NCHW; a whole-NCHW model measured no faster.
                x = x.contiguous(memory_format=torch.channels_last)
            z_out, info = core(
                lambda z, layer=layer, x=x: layer(z, x), torch.zeros_like(x), backward_writer=backward_writer
            )
            infos.append(info)
            z_star = z_out[-1]
            if self.channels_last:
                # Back from NNPACK's NCHW, if the solve used it: an untracked max-pool reads NCHW
                # 4x slower (97 against 21 ms on the MNIST state; with autograd both the same).
                z_star = z_star.contiguous(memory_format=torch.channels_last)
            h = post(z_star)
        return self.head(h), infos

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _with_core(deq_config) -> dict:
    config = dict(deq_config) if isinstance(deq_config, dict) else dict(vars(deq_config))
    config["core"] = "pcdeq"
    return config


def build_model(
    architecture: str | ModelConfig = "linear",
    dataset: str = "mnist",
    *,
    activation: str = "tanh",
    channels: int | tuple[int, ...] | None = None,
    nonnegativity: str = "weight_norm",
    num_classes: int = 10,
    deq: dict | None = None,
) -> PcDEQClassifier:
    """Build a reference pcDEQ classifier (see the module docstring).

    Args:
        architecture: ``"linear"``, ``"single_conv"``, ``"multi_conv"``, or a :class:`ModelConfig`
            (then the other arguments are ignored).
        dataset: ``"mnist"``, ``"svhn"``, ``"cifar10"``, ``"cifar10_aug"`` or ``"digits"``.
        activation: pcDEQ activation of every equilibrium layer.
        channels: width override.
        nonnegativity: nonnegativity mechanism of the layers.
        num_classes: output classes.
        deq: config of the ``pcdeq`` cores.

    Raises:
        UnknownNameError: unknown architecture or dataset.
        InvalidInputError: no default width for this pair (pass ``channels``) or a malformed one.
    """
    if not isinstance(architecture, ModelConfig):
        architecture = ModelConfig(
            architecture, dataset, activation, channels, nonnegativity, num_classes, deq or {}
        )
    cfg = architecture
    check_choice("architecture", cfg.architecture, ARCHITECTURES)
    data = DATASETS[check_choice("dataset", cfg.dataset, DATASETS)]
    if cfg.architecture == "multi_conv":
        _check_multi_conv_input(data.image_size, cfg.dataset)  # before the width: no width helps
    width = cfg.channels if cfg.channels is not None else data.channels.get(cfg.architecture)
    if width is None:
        raise InvalidInputError(
            f"The reference has no {cfg.architecture!r} model for {cfg.dataset!r} (defaults exist for "
            f"{sorted(data.channels)}); pass channels=... to build one anyway."
        )
    layer_kwargs = dict(activation=cfg.activation, nonnegativity=cfg.nonnegativity)
    if cfg.architecture == "linear":
        width = _single(width)
        features = data.in_channels * data.image_size**2
        stem = nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.BatchNorm1d(width))
        stages = [(stem, PcDEQLinear(width, **layer_kwargs), nn.BatchNorm1d(width))]
        head = nn.Linear(width, cfg.num_classes)
    elif cfg.architecture == "single_conv":
        width = _single(width)
        stem = nn.Sequential(nn.Conv2d(data.in_channels, width, 3, padding=1), nn.BatchNorm2d(width))
        post = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(width))
        stages = [(stem, PcDEQConv2d(width, **layer_kwargs), post)]
        pooled = data.image_size // 8
        head = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(width * pooled**2, cfg.num_classes))
    else:
        widths = _triple(width)
        stages, previous = [], data.in_channels
        for i, c in enumerate(widths):
            conv = nn.Conv2d(previous, c, 3, padding=1) if i == 0 else nn.Conv2d(previous, c, 3, stride=2)
            post = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(c))
            stages.append((nn.Sequential(conv, nn.BatchNorm2d(c)), PcDEQConv2d(c, **layer_kwargs), post))
            previous = c
        head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(widths[-1], cfg.num_classes))
    deq = cfg.deq if {"ift", "hook_ift"} & set(cfg.deq) else {**DEFAULT_DEQ, **cfg.deq}
    return PcDEQClassifier(stages, head, deq, channels_last=cfg.architecture != "linear")


def _check_multi_conv_input(size: int, dataset: str) -> None:
    final = size
    for _ in range(2):  # the two stride-2, unpadded 3x3 stems
        final = (final - 3) // 2 + 1
    if final < 4:
        raise InvalidInputError(
            f"multi_conv needs images of at least 19x19 (its two stride-2 stages end above its 4x4 "
            f"average pool), but {dataset!r} has {size}x{size} images. Use linear or single_conv."
        )


def _positive_int(width) -> bool:
    return isinstance(width, int) and not isinstance(width, bool) and width >= 1


def _single(width) -> int:
    if not _positive_int(width):
        raise InvalidInputError(f"This architecture takes one positive int of channels, got {width!r}.")
    return width


def _triple(width) -> tuple[int, int, int]:
    if not (isinstance(width, (tuple, list)) and len(width) == 3 and all(map(_positive_int, width))):
        raise InvalidInputError(
            f"multi_conv takes three positive channel counts (C1, C2, C3), got {width!r}."
        )
    return tuple(width)

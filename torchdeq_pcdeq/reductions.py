"""Reductions over states in any memory layout, without copying them.

Convolutional states usually live in channels-last layout (the equilibrium convolutions are
faster there on CPU). Some reductions copy a tensor that is not contiguous before reducing it:
``torch.aminmax`` does, and so does ``flatten(1)``, which cannot be a view of a channels-last
tensor. On a state of 64 x 82 x 28 x 28 each copy costs about as much as the activation. The
helpers here reduce a dense tensor in its storage order instead.

Example:
    >>> import torch
    >>> z = torch.arange(24.0).view(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    >>> [value.item() for value in extremes(z)]
    [0.0, 23.0]
    >>> z.amin(dim=sample_dims(z)).tolist()  # per sample, where flatten(1).amin(1) would copy
    [0.0, 12.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InvalidInputError

__all__ = ["extremes", "sample_dims", "storage_order"]


def storage_order(t: Tensor) -> Tensor:
    """``t`` permuted so that it is contiguous, when it is dense in some other order (else ``t``).

    The result holds the same elements in another dimension order: only for reductions over all
    of them.
    """
    if t.is_contiguous():
        return t
    dense = t.permute(sorted(range(t.dim()), key=t.stride, reverse=True))
    return dense if dense.is_contiguous() else t


def extremes(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(min, max)`` over all entries of ``t``: one reduction, no copy. NaN makes both NaN."""
    return torch.aminmax(storage_order(t))


def sample_dims(t: Tensor) -> tuple[int, ...]:
    """The dimensions of one sample (all but the first): reduce over them for per-sample values.

    Raises:
        InvalidInputError: ``t`` has no dimension besides the batch; reducing over ``()``
            would reduce over everything.
    """
    if t.dim() < 2:
        raise InvalidInputError(
            f"Per-sample values need a tensor of shape (batch, ...) with at least 2 dimensions, got "
            f"shape {tuple(t.shape)}. Add a feature dimension with t.unsqueeze(1)."
        )
    return tuple(range(1, t.dim()))

"""What a floating-point dtype lets a solve resolve and certify.

Every tolerance, guard slack and certified margin in the package is a number of ulps of the
dtype that ``f`` computes in (:func:`arithmetic_dtype`): the state's, or autocast's when it is
coarser. The two counts live here so that the solver, the guard and the certified backward
agree on them.

Example:
    >>> import torch
    >>> from torchdeq_pcdeq.rounding import arithmetic_dtype, resolution_floor
    >>> z = torch.zeros(2, 3)
    >>> arithmetic_dtype(z), resolution_floor(torch.float32)
    (torch.float32, 2.384185791015625e-07)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     arithmetic_dtype(z)
    torch.bfloat16
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["RESOLUTION_ULPS", "GUARD_ULPS", "resolution_floor", "arithmetic_dtype", "under_autocast"]

# Successive iterates of a converged solve still differ by about an ulp per entry, so relative
# residuals below this many machine epsilons are unreachable in the arithmetic's dtype.
RESOLUTION_ULPS = 2.0
# Rounding slack of the guard, and rounding margin added to the enclosure's bound, in ulps of
# the largest entry.
GUARD_ULPS = 16.0


def resolution_floor(dtype: torch.dtype) -> float:
    """The smallest relative residual that iterates of ``dtype`` can be trusted to reach."""
    return RESOLUTION_ULPS * torch.finfo(dtype).eps


def arithmetic_dtype(state: Tensor) -> torch.dtype:
    """The coarsest dtype ``f`` computes in: the state's, or autocast's when it is coarser.

    Under autocast a float32 state is produced by bfloat16 or float16 products, so it carries
    their rounding, not float32's.
    """
    if under_autocast(state):
        fast = torch.get_autocast_dtype(state.device.type)
        if torch.finfo(fast).eps > torch.finfo(state.dtype).eps:
            return fast
    return state.dtype


def under_autocast(state: Tensor) -> bool:
    """Whether autocast is on for ``state``'s device (it exists for CPU and CUDA only)."""
    device = state.device.type
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)


@functools.cache
def dtype_constants(dtype: torch.dtype) -> tuple[torch.dtype, float]:
    """(accumulation dtype, its smallest normal number) for states of ``dtype``."""
    acc = torch.promote_types(dtype, torch.float32)
    return acc, torch.finfo(acc).tiny

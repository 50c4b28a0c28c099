"""Registration of the plugin into TorchDEQ's registries.

TorchDEQ keeps module-level dicts (last writer wins, no unregister, no discovery). This is the
only module that touches them. :func:`register` is called on ``import torchdeq_pcdeq`` and is
idempotent; it never overwrites a key that another object holds, and warns instead.

Example:
    >>> import torchdeq_pcdeq
    >>> torchdeq_pcdeq.register()
    {'core:pcdeq': 'present', 'solver:pcdeq_fixed_point': 'present', 'norm:pcdeq_nonneg': 'present'}
"""

from __future__ import annotations

import torchdeq.core
import torchdeq.norm.base_norm
import torchdeq.solver

from .config import CORE_NAME, NORM_NAME, SOLVER_NAME, command_line_flags, torchdeq_argparse_defaults
from .constraints import PcDEQNonnegNorm
from .core import PcDEQCore
from .errors import UnknownNameError, warn
from .solver import pcdeq_fixed_point

__all__ = [
    "register",
    "solver_names",
    "core_names",
    "norm_names",
    "explain_registry_error",
    "CORE_NAME",
    "SOLVER_NAME",
    "NORM_NAME",
]


def _entries():
    """(kind, key, object, registry dict, TorchDEQ's register function) for each entry."""
    return [
        ("core", CORE_NAME, PcDEQCore, torchdeq.core._core, torchdeq.core.register_deq),
        ("solver", SOLVER_NAME, pcdeq_fixed_point, torchdeq.solver._solvers, torchdeq.solver.register_solver),
        (
            "norm",
            NORM_NAME,
            PcDEQNonnegNorm,
            torchdeq.norm.base_norm._norm_class,
            torchdeq.norm.base_norm.register_norm,
        ),
    ]


def solver_names() -> list[str]:
    """The keys of TorchDEQ's solver registry."""
    return sorted(torchdeq.solver._solvers)


def core_names() -> list[str]:
    """The keys of TorchDEQ's core registry (``get_deq(core=...)``)."""
    return sorted(torchdeq.core._core)


def norm_names() -> list[str]:
    """The values ``apply_norm(norm_type=...)`` accepts: the norm registry's keys and ``"none"``."""
    return sorted({"none", *torchdeq.norm.base_norm._norm_class})


# TorchDEQ reports an unknown registry key with a bare assertion; these are its messages.
_TORCHDEQ_REGISTRY_ASSERTIONS = {
    "Not registered DEQ class!": ("core", core_names),
    "Not registered norm type!": ("norm_type", norm_names),
}


def explain_registry_error(error: BaseException, argv: list[str] | None = None) -> UnknownNameError | None:
    """An :class:`UnknownNameError` for TorchDEQ's bare "Not registered ..." assertions, else None.

    TorchDEQ's ``get_deq`` and ``apply_norm`` say only ``AssertionError: Not registered DEQ
    class!`` for an unknown ``core`` or ``norm_type``; the runner (``python -m torchdeq_pcdeq``)
    turns that into a message with the valid names, the name read from ``--core`` /
    ``--norm_type`` in ``argv`` when given there and not valid (a valid one there means the
    failing name came from elsewhere: code or a config file, which the message cannot name).

    Example:
        >>> explain_registry_error(AssertionError("Not registered DEQ class!"), ["--core", "pcdq"])
        UnknownNameError("Unknown core 'pcdq'. Valid: ... Did you mean 'pcdeq'?")
    """
    if not isinstance(error, AssertionError) or str(error) not in _TORCHDEQ_REGISTRY_ASSERTIONS:
        return None
    key, valid_names = _TORCHDEQ_REGISTRY_ASSERTIONS[str(error)]
    valid = valid_names()
    name = command_line_flags(argv or [], torchdeq_argparse_defaults()).get(key)
    return UnknownNameError(key, name, valid, named=name is not None and name not in valid)


def _same(current: object, ours: object) -> bool:
    """Ours, possibly from a re-import of this package (same module and qualified name)."""
    return current is ours or (
        getattr(current, "__module__", None) == ours.__module__
        and getattr(current, "__qualname__", None) == ours.__qualname__
    )


def register() -> dict[str, str]:
    """Register the core, solver and norm into TorchDEQ.

    Returns:
        ``{"kind:key": status}`` with status ``"registered"`` (added now), ``"present"``
        (already ours) or ``"skipped"`` (another object holds the key; a
        :class:`~torchdeq_pcdeq.PcDEQWarning` says which).

    Example:
        >>> import torchdeq
        >>> from torchdeq_pcdeq import register
        >>> register()  # (importing torchdeq_pcdeq has registered them already)
        {'core:pcdeq': 'present', 'solver:pcdeq_fixed_point': 'present', 'norm:pcdeq_nonneg': 'present'}
        >>> type(torchdeq.get_deq(core="pcdeq")).__name__
        'PcDEQCore'
    """
    status = {}
    for kind, key, ours, registry, register_fn in _entries():
        current = registry.get(key)
        if current is None:
            register_fn(key, ours)
            status[f"{kind}:{key}"] = "registered"
        elif _same(current, ours):
            status[f"{kind}:{key}"] = "present"
        else:
            status[f"{kind}:{key}"] = "skipped"
            warn(
                f"TorchDEQ's {kind} registry already holds {key!r} "
                f"({getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', current)!s}); "
                f"torchdeq_pcdeq left it in place, so {kind} {key!r} is NOT the pcDEQ one. Remove "
                "the other registration or import torchdeq_pcdeq first."
            )
    return status

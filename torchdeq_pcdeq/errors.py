"""Typed errors and warnings of torchdeq_pcdeq.

Every error is a :class:`PcDEQError`, itself a :class:`ValueError`, so ``except ValueError``
keeps working for code that does not know this package. Each message says what was expected,
what was received and what to do.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
import os
import sys
import warnings
from collections.abc import Hashable, Iterable

import torch
import torchdeq

__all__ = [
    "PcDEQError",
    "PcDEQWarning",
    "UnknownNameError",
    "InvalidInputError",
    "ActivationCheckError",
    "NegativeWeightError",
    "PreconditionError",
    "NotPositiveMonotoneError",
    "NonUniqueFixedPointError",
    "ConvergenceError",
    "NonFiniteError",
]


class PcDEQError(ValueError):
    """Base class of every error raised by torchdeq_pcdeq."""


class PcDEQWarning(UserWarning):
    """Base class of every warning issued by torchdeq_pcdeq (filter it with ``warnings``)."""


class UnknownNameError(PcDEQError):
    """A name (activation, mode, option, ...) that is not one of the valid ones.

    ``named=False`` when only the kind of name is known: the message then omits ``name``.

    Example:
        >>> raise UnknownNameError("activation", "tahn", ["tanh", "sigmoid"])
        Traceback (most recent call last):
        ...
        torchdeq_pcdeq.errors.UnknownNameError: Unknown activation 'tahn'. Valid: ... Did you mean 'tanh'?
    """

    def __init__(self, kind: str, name: object, valid: Iterable[str], note: str = "", *, named: bool = True):
        self.kind, self.name, self.valid = kind, name if named else None, sorted(valid)
        given = f" {name!r}" if named else ""
        hint = did_you_mean(name, self.valid) if named else ""
        super().__init__(
            f"Unknown {kind}{given}. Valid: {quote_all(self.valid)}.{hint}" + (f" {note}" if note else "")
        )


class InvalidInputError(PcDEQError):
    """A tensor or argument with the wrong shape, dtype, device, sign or value."""


class ActivationCheckError(PcDEQError):
    """An activation that is not nonnegative, nondecreasing and concave on [0, inf)."""


class NegativeWeightError(PcDEQError):
    """A weight that must be nonnegative has negative entries."""


class PreconditionError(PcDEQError):
    """The runtime guard saw evidence that ``f`` breaks a pcDEQ precondition."""


class NotPositiveMonotoneError(PreconditionError):
    """The iterates are ones that a positive-monotone map cannot produce."""


class NonUniqueFixedPointError(PreconditionError):
    """The enclosure's lower and upper sequences settled on different fixed points."""


class ConvergenceError(PcDEQError):
    """A fixed-point solve ended without reaching its tolerance."""


class NonFiniteError(PcDEQError):
    """An iterate holds NaN or Inf."""


# Frames of these are not the user's: a warning points past them, at the line that called in.
_INTERNAL_PREFIXES = (
    *(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, torchdeq)),
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    "<frozen importlib",  # an import that triggers a warning: the user's import line
)


def warn(message: str) -> None:
    """Issue a :class:`PcDEQWarning` attributed to the user's line that led to it.

    The line is the innermost frame outside torch, TorchDEQ and this package, so that the
    attribution holds whatever the path in (``get_deq`` or the core's constructor,
    ``Module.__call__``, autograd's backward, an import). It is named to
    ``warnings.warn_explicit``: ``warnings.warn``'s ``stacklevel`` skips importlib's frames
    on its own and would count past it.
    """
    if torch.compiler.is_compiling():  # Dynamo cannot trace frame walking: the caller's line
        warnings.warn(message, PcDEQWarning, stacklevel=2)
        return
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_PREFIXES):
        frame = frame.f_back
    scope = frame.f_globals
    warnings.warn_explicit(
        message,
        PcDEQWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=scope.get("__name__", "<string>"),
        registry=scope.setdefault("__warningregistry__", {}),
        # (no module_globals: with them the source line is asked of the module's loader, which
        # raises ImportError for a script run as ``python -m pkg.module``, named __main__)
    )


# The causes warned about once per process (training would repeat most of them at every step).
_warned_once: set[Hashable] = set()


def warned_once(key: Hashable) -> bool:
    """Whether :func:`warn_once` has already said ``key`` in this process (for callers whose check
    itself costs something, such as a host sync)."""
    return key in _warned_once


def warn_once(key: Hashable, message: str) -> None:
    """:func:`warn` ``message`` the first time this process meets ``key``, the cause's identity
    (a name, and what the message depends on, such as a dtype).

    Example:
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for step in range(3):
        ...         warn_once(("example", torch.float32), "a cause each training step meets")
        >>> len(caught)
        1
    """
    if key not in _warned_once:
        _warned_once.add(key)
        warn(message)


def quote_all(names: Iterable[str]) -> str:
    """``['a', 'b']`` -> ``"'a', 'b'"``."""
    return ", ".join(repr(n) for n in names)


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """A ``" Did you mean 'x'?"`` suffix when a valid name is close to ``name``, else ``""``."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def as_integer(value: object) -> int | None:
    """``value`` as an int if it is a whole number: an int (Python's, NumPy's, an integer 0-dim
    tensor) or a whole float (``50.0``, as a config read from JSON may hold); else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def positive_int(key: str, value: object) -> int:
    """``value`` as an int if it is a whole number >= 1 (see :func:`as_integer`), else a typed error
    naming ``key``."""
    number = as_integer(value)
    if number is None or number < 1:
        raise InvalidInputError(f"{key} must be an integer >= 1, got {value!r}.")
    return number


def positive_float(key: str, value: object) -> float:
    """``value`` as a float if it is a positive finite number, else a typed error naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise InvalidInputError(f"{key} must be a positive finite number, got {value!r}.")
    return float(value)


def check_choice(kind: str, value: object, valid: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``valid``; raise :class:`UnknownNameError` otherwise."""
    valid = list(valid)
    if value not in valid:
        raise UnknownNameError(kind, value, valid)
    return value  # type: ignore[return-value]

"""Configuration of the pcdeq core: pcDEQ defaults, plugin options, validation, argparse flags.

TorchDEQ reads its configuration from a dict, an argparse ``Namespace`` or a ``DEQConfig``. The
pcdeq core reads the same keys, never writes into the caller's object, and adds plugin options
prefixed ``pcdeq_`` (:data:`PCDEQ_OPTIONS`).

Which keys count as "set by the user" decides whether a pcDEQ default replaces them:

* in a dict (or keyword arguments), every present key is set;
* a config carrying every key of ``torchdeq.add_deq_args`` was built by argparse, which fills
  every flag: there a key counts as set only when its value differs from TorchDEQ's default.

Example:
    >>> from torchdeq_pcdeq.config import resolve_core_config
    >>> cfg = resolve_core_config({"f_max_iter": 50}, {})
    >>> (cfg["f_max_iter"], cfg["f_tol"], cfg["f_stop_mode"], cfg["f_solver"])
    (50, 0.0001, 'rel', 'pcdeq_fixed_point')
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import warnings
from dataclasses import dataclass

from torchdeq.utils import add_deq_args
from torchdeq.utils.config import DEQConfig

from .errors import InvalidInputError, PcDEQWarning, check_choice
from .solver import GUARD_MODES

__all__ = [
    "PCDEQ_CORE_DEFAULTS",
    "PCDEQ_OPTIONS",
    "NONCONVERGENCE_MODES",
    "GUARANTEED_SOLVERS",
    "add_pcdeq_args",
    "resolve_core_config",
]

SOLVER_NAME = "pcdeq_fixed_point"
NORM_NAME = "pcdeq_nonneg"

# TorchDEQ keys whose pcDEQ default differs from TorchDEQ's.
PCDEQ_CORE_DEFAULTS: dict[str, object] = {
    "f_solver": SOLVER_NAME,
    "b_solver": SOLVER_NAME,
    "f_max_iter": 200,
    "b_max_iter": 200,
    "f_tol": 1e-4,
    "b_tol": 1e-4,
    "f_stop_mode": "rel",
    "b_stop_mode": "rel",
    "ift": True,
}

NONCONVERGENCE_MODES = ("warn", "raise", "ignore")
# Plain iteration converges for every pcDEQ; Anderson and Broyden carry no such guarantee.
GUARANTEED_SOLVERS = (SOLVER_NAME, "fixed_point_iter", "simple_fixed_point_iter")
# Norms under which a plain nn.Linear / nn.Conv2d may keep nonnegative weights.
NONNEGATIVE_NORMS = (NORM_NAME, "none")


@dataclass(frozen=True)
class Option:
    default: object
    choices: tuple | None
    help: str


def _check_every(value: object) -> object:
    if value == "auto":
        return value
    try:
        number = int(value)  # argparse hands over strings
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or (isinstance(value, float) and value != number):
        raise InvalidInputError(f"pcdeq_check_every must be 'auto' or an integer >= 1, got {value!r}.")
    return number


PCDEQ_OPTIONS: dict[str, Option] = {
    "pcdeq_guard": Option(
        "raise",
        GUARD_MODES,
        "runtime guard: at each convergence check, verify the iterates are nonnegative and, "
        "from z_init = 0, nondecreasing (raise / warn / off)",
    ),
    "pcdeq_nonconvergence": Option(
        "warn",
        NONCONVERGENCE_MODES,
        "what to do when a forward or backward solve ends above its tolerance "
        "(info['converged'] is False for those samples either way)",
    ),
    "pcdeq_check_every": Option(
        "auto",
        None,
        "iterations between convergence checks: 'auto' (scheduled from the observed rate) or an "
        "integer; 1 records a residual at every iteration",
    ),
}


@functools.cache
def torchdeq_argparse_defaults() -> dict[str, object]:
    """The values ``torchdeq.add_deq_args`` gives when no flag is passed."""
    parser = argparse.ArgumentParser(add_help=False)
    add_deq_args(parser)
    return vars(parser.parse_args([]))


def add_pcdeq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every pcdeq plugin option to ``parser`` as ``--pcdeq_*`` flags; return the parser.

    Example:
        >>> import argparse
        >>> parser = add_pcdeq_args(argparse.ArgumentParser())
        >>> parser.parse_args(["--pcdeq_guard", "warn"]).pcdeq_guard
        'warn'
    """
    group = parser.add_argument_group("pcDEQ (torchdeq_pcdeq)")
    for key, option in PCDEQ_OPTIONS.items():
        kwargs = dict(default=option.default, help=f"{option.help} (default: {option.default})")
        if option.choices is not None:
            kwargs["choices"] = option.choices
        group.add_argument(f"--{key}", **kwargs)
    return parser


def _explicit_keys(config: dict) -> set[str]:
    """Keys the user set (see the module docstring)."""
    defaults = torchdeq_argparse_defaults()
    if not set(defaults) <= set(config):
        return set(config)
    return {k for k, v in config.items() if k not in defaults or v != defaults[k]}


def _warn_unknown_keys(config: dict, from_argparse: bool) -> None:
    known = set(torchdeq_argparse_defaults()) | set(PCDEQ_OPTIONS) | {"core", "no_stat"}
    for key in config:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if key.startswith("pcdeq_") or (close and not from_argparse):
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(PCDEQ_OPTIONS))
            warnings.warn(
                f"Unknown config key {key!r} is ignored by the pcdeq core.{hint} Plugin options: {valid}.",
                PcDEQWarning,
                stacklevel=4,
            )


def resolve_core_config(args, kwargs: dict) -> dict:
    """A private, validated config for the pcdeq core; the caller's object is never modified.

    Raises:
        InvalidInputError / UnknownNameError: an invalid value, with the valid ones.
    """
    source = DEQConfig(args).config
    from_argparse = set(torchdeq_argparse_defaults()) <= set(source)
    explicit = _explicit_keys(source) | set(kwargs)
    config = {**source, **kwargs}
    _warn_unknown_keys(config, from_argparse)

    for key, value in PCDEQ_CORE_DEFAULTS.items():
        if key not in explicit:
            config[key] = value
    # TorchDEQ's --ift flag cannot say "off"; only a dict can ask for phantom gradients.
    config["pcdeq_gradient"] = (
        "hook_ift" if config.get("hook_ift") else "ift" if config.get("ift", True) else "phantom"
    )
    for key, option in PCDEQ_OPTIONS.items():
        config.setdefault(key, option.default)
        if option.choices is not None:
            check_choice(key, config[key], option.choices)
    config["pcdeq_check_every"] = _check_every(config["pcdeq_check_every"])

    for prefix in ("f", "b"):
        _check_positive_int(config, f"{prefix}_max_iter")
        _check_positive_float(config, f"{prefix}_tol")
        check_choice(f"{prefix}_stop_mode", config[f"{prefix}_stop_mode"], ("rel", "abs"))
        solver = config[f"{prefix}_solver"]
        if solver not in GUARANTEED_SOLVERS:
            warnings.warn(
                f"{prefix}_solver={solver!r} has no convergence guarantee for pcDEQ (only plain "
                f"fixed-point iteration has); the pcdeq core will use it as asked. Remove the "
                f"option to use {SOLVER_NAME!r}.",
                PcDEQWarning,
                stacklevel=3,
            )
    norm = config.get("norm_type")
    if norm is not None and norm not in NONNEGATIVE_NORMS:
        warnings.warn(
            f"norm_type={norm!r} allows negative weights, which void pcDEQ's guarantees for plain "
            f"nn.Linear / nn.Conv2d layers in f. Pass --norm_type {NORM_NAME} (or norm_type="
            f"'{NORM_NAME}'). The pcDEQ layers constrain their own weights whatever the norm_type.",
            PcDEQWarning,
            stacklevel=3,
        )
    return config


def _check_positive_int(config: dict, key: str) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{key} must be an integer >= 1, got {value!r}.")


def _check_positive_float(config: dict, key: str) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise InvalidInputError(f"{key} must be a positive finite number, got {value!r}.")

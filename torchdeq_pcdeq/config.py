"""Configuration of the pcdeq core: pcDEQ defaults, plugin options, validation, argparse flags.

TorchDEQ reads its configuration from a dict, an argparse ``Namespace`` or a ``DEQConfig``. The
pcdeq core reads the same keys, never writes into the caller's object, and adds plugin options
prefixed ``pcdeq_`` (:data:`PCDEQ_OPTIONS`).

Which keys count as "set by the user" decides whether a pcDEQ default replaces them:

* in a dict (or keyword arguments), every present key is set;
* keywords of ``torchdeq.get_deq(args, **kwargs)`` are set: get_deq merges them into the
  config it hands to the core (into an argparse Namespace's own dict), so the core reads them
  from that call (:func:`get_deq_keywords`);
* a config carrying every key of ``torchdeq.add_deq_args`` was built by argparse, which fills
  every flag: there a key counts as set when its value differs from TorchDEQ's default, or when
  its flag is on the process's command line (``--f_max_iter 40``: typed, though it is the
  default). A Namespace that the command line does not explain (``parse_args([...])`` in a
  notebook, or values set in code after parsing that differ from TorchDEQ's defaults) cannot
  say which of its values at TorchDEQ's defaults were meant: they take pcDEQ's defaults, with a
  warning that names each one replaced. A value set in code *to* TorchDEQ's default leaves no
  trace at all: it is replaced without a word, so pass it as a keyword;
* a core's own resolved config (``core.args``, a :class:`ResolvedConfig`) is final: a core
  rebuilt from it is the same core.

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
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torchdeq.core
from torchdeq.utils import add_deq_args
from torchdeq.utils.config import DEQConfig

from .constraints import NONNEGATIVITY_MODES
from .conv_kernels import CONV_ALGORITHMS
from .errors import (
    InvalidInputError,
    UnknownNameError,
    as_integer,
    check_choice,
    positive_float,
    positive_int,
    warn,
)
from .solver import GUARD_MODES

__all__ = [
    "PCDEQ_CORE_DEFAULTS",
    "PCDEQ_OPTIONS",
    "NONCONVERGENCE_MODES",
    "GUARANTEED_SOLVERS",
    "add_pcdeq_args",
    "resolve_core_config",
]

CORE_NAME = "pcdeq"
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
# The gradient mode that cores of earlier versions stored in their config (core.args): read from
# saved configs, checked against ift / hook_ift, and no longer written.
_LEGACY_GRADIENT_KEY = "pcdeq_gradient"
# Marks a core's resolved config, so that a copy saved as plain data (JSON, YAML, dict(...) in a
# checkpoint) rebuilds the same core rather than reading as argparse's (see _from_argparse).
RESOLVED_KEY = "pcdeq_resolved"
# Plain iteration converges for every pcDEQ; Anderson and Broyden carry no such guarantee.
GUARANTEED_SOLVERS = (SOLVER_NAME, "fixed_point_iter", "simple_fixed_point_iter")
_GET_DEQ_CODE = torchdeq.core.get_deq.__code__
# Norms under which a plain nn.Linear / nn.Conv2d may keep nonnegative weights.
NONNEGATIVE_NORMS = (NORM_NAME, "none")


@dataclass(frozen=True)
class Option:
    """A plugin option: its default, how a value is validated, and how argparse reads it."""

    default: object
    help: str
    choices: tuple | None = None
    kind: str = "choice"  # choice | flag | positive_float | optional_positive_float | check_every

    def convert(self, key: str, value: object) -> object:
        """The validated value (argparse strings included); raise on an invalid one."""
        if self.kind == "choice":
            return check_choice(key, value, self.choices)
        if self.kind == "flag":
            if not isinstance(value, bool):
                raise InvalidInputError(f"{key} must be True or False, got {value!r}.")
            return value
        if self.kind == "check_every":
            return _check_every(value)
        if value is None and self.kind == "optional_positive_float":
            return None
        number = _float(value)
        if number is None or not (0 < number < math.inf):
            raise InvalidInputError(f"{key} must be a positive finite number, got {value!r}.")
        return number

    def argparse_kwargs(self) -> dict:
        kwargs: dict = {"default": self.default, "help": f"{self.help} (default: {self.default})"}
        if self.kind == "flag":
            kwargs["action"] = "store_true"
        elif self.kind == "choice":
            kwargs["choices"] = self.choices
        elif self.kind in ("positive_float", "optional_positive_float"):
            kwargs["type"] = float
        return kwargs


def _float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_every(value: object) -> object:
    if value == "auto":
        return value
    # (whole numbers of any type, and argparse's strings of them; 5.5, inf and NaN are not)
    number = as_integer(_float(value) if isinstance(value, str) else value)
    if number is None or number < 1:
        raise InvalidInputError(f"pcdeq_check_every must be 'auto' or an integer >= 1, got {value!r}.")
    return number


PCDEQ_OPTIONS: dict[str, Option] = {
    "pcdeq_guard": Option(
        "raise",
        "runtime guard: at each convergence check, look for iterates a positive-monotone map "
        "cannot produce (negative, falling from z_init = 0; with the enclosure also crossing or "
        "settled apart) and name the likely broken precondition",
        GUARD_MODES,
    ),
    "pcdeq_nonconvergence": Option(
        "warn",
        "what to do when a forward or backward solve ends above its tolerance "
        "(info['converged'] is False for those samples either way)",
        NONCONVERGENCE_MODES,
    ),
    "pcdeq_check_every": Option(
        "auto",
        "iterations between convergence checks: 'auto' (scheduled from the observed rate) or an "
        "integer; 1 records a residual at every iteration",
        kind="check_every",
    ),
    "pcdeq_enclosure": Option(
        False,
        "certified enclosure: iterate from 0 and from the activation's supremum together, return "
        "the midpoint and info['error_bound'] >= max_i |z_i - z*_i|; stops on that bound "
        "(twice the forward cost)",
        kind="flag",
    ),
    "pcdeq_enclosure_upper": Option(
        None,
        "start of the enclosure's upper sequence; by default the largest supremum of the pcDEQ "
        "layers that f calls (set it when f uses plain torch layers)",
        kind="optional_positive_float",
    ),
    "pcdeq_rate_bound": Option(
        False,
        "certified rate: info['rate_bound'] = max_i (J v)_i / v_i >= spectral radius of the "
        "Jacobian at z*, with v = J z + 1e-3 z at a state z below z* (two Jacobian-vector products); "
        "the implicit backward solve then stops on its own certified error bound",
        kind="flag",
    ),
    "pcdeq_sradius": Option(
        "power",
        "how eval-mode sradius_mode fills info['sradius']: TorchDEQ's 100-step 'power' method "
        "(an estimate) or the certified 'rate_bound' (an upper bound, two products)",
        ("power", "rate_bound"),
    ),
    "pcdeq_phantom": Option(
        False,
        "differentiate with TorchDEQ's phantom gradient (its grad steps and tau) instead of "
        "implicitly: what ift=False asks for in a dict or a keyword, which TorchDEQ's --ift flag "
        "cannot say",
        kind="flag",
    ),
    "pcdeq_nonneg_init": Option(
        "keep",
        "how norm_type='pcdeq_nonneg' starts each weight it constrains: 'keep' its magnitudes "
        "(|W|: a signed default initialisation gives rows summing to about sqrt(fan_in) / 2, "
        "which saturates a bounded activation) or 'reference' (torchdeq_pcdeq.reference_init_: "
        "small and nonnegative, the reference's start)",
        ("keep", "reference"),
    ),
    "pcdeq_nonnegativity": Option(
        "weight_norm",
        "how pcDEQ layers built with args=... keep W >= 0",
        NONNEGATIVITY_MODES,
    ),
    "pcdeq_injection_floor": Option(
        1e-6,
        "positive floor added to pcDEQ-1 injections by pcDEQ layers built with args=...",
        kind="positive_float",
    ),
    "pcdeq_conv_algorithm": Option(
        "auto",
        "kernel of the untracked convolutions of PcDEQConv2d layers built with args=...: 'auto' "
        "(solver and adjoint products each on the faster of F.conv2d's kernel and NNPACK, "
        "timed once per product, shape and layout), 'pytorch' (F.conv2d everywhere) or "
        "'nnpack' (NNPACK wherever it applies). Certified solves make their products on "
        "F.conv2d's sign-exact kernel, and a guard failure after NNPACK products is judged "
        "again with it",
        CONV_ALGORITHMS,
    ),
}


# The options of the core and of the norm pcdeq_nonneg, which act on a script's TorchDEQ calls
# (get_deq, apply_norm); the others configure pcDEQ layers built with args=...
RUNNER_OPTIONS = (
    "pcdeq_guard",
    "pcdeq_nonconvergence",
    "pcdeq_check_every",
    "pcdeq_enclosure",
    "pcdeq_enclosure_upper",
    "pcdeq_rate_bound",
    "pcdeq_sradius",
    "pcdeq_phantom",
    "pcdeq_nonneg_init",
)
# Set by the runner (python -m torchdeq_pcdeq) from its --pcdeq_* flags, as JSON, so that the
# script's processes and their children read them.
RUNNER_OPTIONS_ENV = "TORCHDEQ_PCDEQ_OPTIONS"


def parse_runner_options(arguments: list[str]) -> tuple[dict, list[str]]:
    """Split the runner's ``--pcdeq_<option>`` flags (:data:`RUNNER_OPTIONS`; ``--key value``,
    ``--key=value``, a bare ``--key`` for True/False options) from the script's arguments;
    return (validated options, the script's arguments). The layer options (``--pcdeq_nonnegativity``, ...)
    configure layers the script builds: they stay among its arguments, for its
    ``add_pcdeq_args``.

    Raises:
        UnknownNameError / InvalidInputError: an unknown ``--pcdeq_`` option or an invalid value.

    Example:
        >>> parse_runner_options(["--lr", "1", "--pcdeq_guard=warn", "--pcdeq_enclosure"])
        ({'pcdeq_guard': 'warn', 'pcdeq_enclosure': True}, ['--lr', '1'])
    """
    options: dict = {}
    rest: list[str] = []
    arguments = list(arguments)
    tokens = iter(enumerate(arguments))
    for at, token in tokens:
        if token == "--":  # the rest is the script's, as argparse reads it
            rest += arguments[at:]
            break
        if not token.startswith("--pcdeq_"):
            rest.append(token)
            continue
        key, given, value = token[2:].partition("=")
        if key not in PCDEQ_OPTIONS:
            layers = ", ".join(f"--{k}" for k in PCDEQ_OPTIONS if k not in RUNNER_OPTIONS)
            raise UnknownNameError(
                "pcdeq option",
                key,
                PCDEQ_OPTIONS,
                note=f"Of these, {layers} configure layers: the runner passes them on to the "
                "script, which reads them with torchdeq_pcdeq.add_pcdeq_args(parser); it takes the "
                "others itself.",
            )
        if key not in RUNNER_OPTIONS:  # a layer option: the script's, through add_pcdeq_args
            rest.append(token)
            continue
        option = PCDEQ_OPTIONS[key]
        if option.kind == "flag":
            if given and value not in _SWITCH_WORDS:
                raise InvalidInputError(f"--{key} takes no value or =true / =false, got {value!r}.")
            following = arguments[at + 1 : at + 2]
            if not given and following and following[0] in _SWITCH_WORDS:
                # (a switch takes no separate value: the word would silently go to the script)
                raise InvalidInputError(
                    f"--{key} is a switch, on when given: write --{key} or --{key}={following[0]}, "
                    f"not --{key} {following[0]}, whose {following[0]!r} would go to the script."
                )
            options[key] = not given or value in ("true", "True")
            continue
        if not given:
            value = next(tokens, (None, None))[1]
            if value is None:
                raise InvalidInputError(f"--{key} expects a value; got none at the end of the arguments.")
        options[key] = option.convert(key, value)
    return options, rest


_SWITCH_WORDS = ("true", "false", "True", "False")


def runner_options() -> dict:
    """The options the runner was given (:func:`parse_runner_options`), else ``{}``."""
    text = os.environ.get(RUNNER_OPTIONS_ENV)
    return json.loads(text) if text else {}


def _with_runner_options(config: dict, source: dict, from_argparse: bool, overrides: dict) -> None:
    """Fill ``config`` with the runner's options where neither the call (``overrides``) nor the
    script's config (``source``) set them; an argparse config's default counts as unset (the
    script's own ``add_pcdeq_args`` flags, which the runner took out)."""
    for key, value in runner_options().items():
        unset = key not in source or (from_argparse and source[key] == PCDEQ_OPTIONS[key].default)
        if key not in overrides and unset:
            config[key] = value


def nonneg_init(deq_args) -> str:
    """``pcdeq_nonneg_init`` for ``apply_norm(..., norm_type="pcdeq_nonneg", args=deq_args)``:
    from ``deq_args``, else from the runner, else ``"keep"``.

    Example:
        >>> nonneg_init({"pcdeq_nonneg_init": "reference"}), nonneg_init(None)
        ('reference', 'keep')
    """
    source = _config_dict(deq_args) if deq_args is not None else {}
    config = dict(source)
    _with_runner_options(config, source, _from_argparse(source), {})
    key = "pcdeq_nonneg_init"
    return PCDEQ_OPTIONS[key].convert(key, config.get(key, PCDEQ_OPTIONS[key].default))


def registered_norms() -> list[str]:
    """Values ``torchdeq.apply_norm`` accepts as ``norm_type``."""
    from .plugin import norm_names

    return norm_names()


def registered_solvers() -> list[str]:
    """Names ``torchdeq.get_solver`` accepts."""
    from .plugin import solver_names  # the plugin module alone reads TorchDEQ's registries

    return solver_names()


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
        group.add_argument(f"--{key}", **option.argparse_kwargs())
    return parser


def get_deq_keywords(args) -> dict:
    """The keyword arguments of the ``torchdeq.get_deq`` call that is building a core from ``args``.

    ``get_deq(args, **kwargs)`` merges ``kwargs`` into ``args`` (an argparse Namespace's own dict)
    before it calls the core, which would then read a keyword equal to TorchDEQ's default as an
    untouched flag; the call's own frame still holds them. Empty when the core is not built by
    ``get_deq`` (``PcDEQCore(args, **kwargs)`` passes its keywords itself).
    """
    frame = sys._getframe(1)
    for _ in range(8):  # get_deq calls the core's constructor, which calls this
        if frame is None:
            break
        if frame.f_code is _GET_DEQ_CODE and frame.f_locals.get("args") is args:
            keywords = frame.f_locals.get("kwargs")
            return dict(keywords) if isinstance(keywords, dict) else {}
        frame = frame.f_back
    return {}


def _explicit_keys(config: dict) -> set[str]:
    """Keys the user set (see the module docstring)."""
    if not _from_argparse(config):
        return set(config)
    defaults = torchdeq_argparse_defaults()
    return {k for k, v in config.items() if k not in defaults or v != defaults[k]} | _typed_flags(defaults)


class ResolvedConfig(dict):
    """A config :func:`resolve_core_config` returned: every value in it is final, set.

    A core's ``args`` holds every TorchDEQ key once resolved from a Namespace; without this
    type, a core rebuilt from it (``get_deq(core.args)``) would read it as argparse's, where a
    value at TorchDEQ's default that the first core was given as a keyword reads as unset.
    """


class CoreArgs(DEQConfig):
    """A pcdeq core's ``args``: its resolved config, read as TorchDEQ reads a ``DEQConfig``.

    TorchDEQ's ``get_deq(args, **kwargs)`` and ``apply_norm(..., args=args)`` update the config
    they are given in place; given a core's ``args``, they update a copy (``config`` is one), so
    that the core's own stays the one it was built with.

    Example:
        >>> import torchdeq, torchdeq_pcdeq
        >>> first = torchdeq.get_deq(core="pcdeq", f_max_iter=50)
        >>> (torchdeq.get_deq(first.args, f_max_iter=7).f_max_iter, first.args.get("f_max_iter"))
        (7, 50)
    """

    def __init__(self, config: ResolvedConfig):  # (DEQConfig's own would keep the object)
        self._config = config

    @property
    def config(self) -> ResolvedConfig:
        return ResolvedConfig(self._config)

    def get(self, key, default=None):
        return self._config.get(key, default)

    def update(self, **kwargs) -> None:
        raise InvalidInputError(
            f"core.args is the config this core was built with, and a change ({', '.join(kwargs)}) "
            "would not reach the core. Build another one: torchdeq.get_deq(core.args, key=value)."
        )


def _from_argparse(config: dict) -> bool:
    """Whether ``config`` carries every key of ``torchdeq.add_deq_args``: built by argparse (not
    a core's resolved config, in memory or saved as plain data)."""
    if isinstance(config, ResolvedConfig) or config.get(RESOLVED_KEY) is True:
        return False
    return set(torchdeq_argparse_defaults()) <= set(config)


def _unexplained_by_argv(config: dict) -> list[str]:
    """The TorchDEQ keys of an argparse ``config`` that differ from TorchDEQ's defaults without
    their flag on this process's command line: evidence that it was not parsed from it."""
    defaults = torchdeq_argparse_defaults()
    typed = _typed_flags(defaults)
    return sorted(k for k, v in defaults.items() if config.get(k, v) != v and k not in typed)


def _warn_replaced_defaults(config: dict, replaced: dict, unexplained: list[str]) -> None:
    changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in replaced.items())
    evidence = ", ".join(f"{key}={config[key]!r}" for key in unexplained[:3])
    warn(
        f"The pcdeq core replaced values of this argparse config that equal TorchDEQ's defaults with "
        f"pcDEQ's ({changes}). It was not parsed from this process's command line ({evidence} "
        "without its flag there), so whether those values were set on purpose cannot be told. To "
        "keep one, pass it as a keyword: torchdeq.get_deq(args, f_max_iter=40)."
    )


def _typed_flags(keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` whose flag is on this process's command line: typed, so set, even
    to TorchDEQ's default value."""
    return set(command_line_flags(sys.argv[1:], keys))


def command_line_flags(arguments: list[str], keys: Iterable[str]) -> dict[str, str | None]:
    """``{key: value}`` for each of ``keys`` whose flag is among ``arguments`` (``--key value``,
    ``--key=value``; the last one given; ``None`` for a flag at the end, or followed by another
    flag), up to ``--``, after which arguments are positional.

    A flag may be abbreviated, as argparse allows, to a prefix of one key only: a prefix of
    several (Jupyter's ``--f=kernel.json`` starts ``f_solver``, ``f_tol``, ...) is a flag of
    the script's own, which argparse would otherwise refuse as ambiguous.

    Example:
        >>> command_line_flags(["--f_max", "40", "--f=k.json", "--core=pcdeq"], ["f_max_iter", "f_tol",
        ...                     "core"])
        {'f_max_iter': '40', 'core': 'pcdeq'}
    """
    keys = list(keys)
    found: dict[str, str | None] = {}
    for i, token in enumerate(arguments):
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        flag, given, value = token[2:].partition("=")
        matches = [key for key in keys if key == flag] or [key for key in keys if key.startswith(flag)]
        if flag and len(matches) == 1:
            if not given:  # the next argument, unless it is another flag (or there is none)
                following = arguments[i + 1] if i + 1 < len(arguments) else "--"
                value = None if following.startswith("--") else following
            found[matches[0]] = value
    return found


def _check_unknown_keys(config: dict, from_argparse: bool, overrides: set) -> None:
    """Refuse unknown ``pcdeq_`` keys (the prefix is ours); warn about other unknown keys.

    A config may carry keys that are not the core's (a script's own flags, a whole training
    config), so there only near-misses of a valid key are reported, and none from argparse,
    whose flags are the script's to name. Keyword overrides (``overrides``) are the core's alone:
    every unknown one is reported.
    """
    known = set(torchdeq_argparse_defaults()) | set(PCDEQ_OPTIONS)
    known |= {"core", "no_stat", _LEGACY_GRADIENT_KEY, RESOLVED_KEY}
    for key in config:
        if key in known or not isinstance(key, str):
            continue
        if key.startswith("pcdeq_"):
            raise UnknownNameError("pcdeq core option", key, PCDEQ_OPTIONS)
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        if key in overrides or (close and not from_argparse):
            hint = (
                f"Did you mean {close[0]!r}?"
                if close
                else "It is neither a TorchDEQ key (torchdeq.utils.add_deq_args) nor a plugin "
                "option (torchdeq_pcdeq.config.PCDEQ_OPTIONS)."
            )
            warn(f"Unknown config key {key!r} is ignored by the pcdeq core. {hint}")


def _config_dict(args) -> dict:
    """``args`` as TorchDEQ's ``DEQConfig`` reads it, and any other mapping (an OmegaConf or
    Hydra config, a ``UserDict``) by its items, which ``DEQConfig`` would replace by the
    object's attributes, dropping every value."""
    if isinstance(args, Mapping) and not isinstance(args, dict):
        args = dict(args)
    return DEQConfig(args).config


def _check_read_as_a_config(source: dict, keywords: set) -> None:
    """Refuse a mapping that TorchDEQ's ``get_deq`` read by its attributes: an OmegaConf or
    Hydra config (``_content``, ``_metadata``, ...) or a ``UserDict`` (``data``) keeps its items
    there, and every value would be dropped without a word."""
    own = [key for key in source if key not in keywords]
    if own and all(isinstance(key, str) and (key.startswith("_") or key == "data") for key in own):
        raise InvalidInputError(
            f"The config reached the pcdeq core as the attributes {sorted(own)} of an object that "
            "TorchDEQ's get_deq does not read as a mapping (an OmegaConf or Hydra config, a "
            "UserDict): none of its options would be read. Pass dict(config) (OmegaConf: "
            "OmegaConf.to_container(config)), a dict or an argparse Namespace."
        )


def resolve_core_config(args, kwargs: dict) -> dict:
    """A private, validated config for the pcdeq core; the caller's object is never modified.

    Raises:
        InvalidInputError / UnknownNameError: an invalid value, with the valid ones.
    """
    source = _config_dict(args)
    _check_read_as_a_config(source, set(kwargs) | {"core"})
    from_argparse = _from_argparse(source)
    explicit = _explicit_keys(source) | set(kwargs)
    config = {**source, **kwargs}
    _check_unknown_keys(config, from_argparse, set(kwargs))
    if config.get("sradius_mode") and not from_argparse:  # (a script's --sradius_mode is its own)
        warn(
            "sradius_mode=True in the core's config is ignored (by TorchDEQ's cores too): it is an "
            "argument of each call. Pass it there: deq(f, z0, sradius_mode=True), in eval mode."
        )

    replaced = {}  # key: (the config's value, pcDEQ's default that replaces it)
    for key, value in PCDEQ_CORE_DEFAULTS.items():
        if key not in explicit:
            if key in config and config[key] != value:
                replaced[key] = (config[key], value)
            config[key] = value
    _check_switches(config)
    _with_runner_options(config, source, from_argparse, kwargs)
    for key, option in PCDEQ_OPTIONS.items():
        config[key] = option.convert(key, config.get(key, option.default))
    if config["pcdeq_phantom"] and _ask_for_phantom_gradients(config, source, explicit, kwargs):
        replaced.pop("ift", None)  # (TorchDEQ's False stands)
    _check_numbers(config)  # (after the gradient is known: phantom gradients check tau)
    if from_argparse and replaced:
        # (the call's keywords, merged into the Namespace by get_deq, are no evidence)
        unexplained = [key for key in _unexplained_by_argv(source) if key not in kwargs]
        if unexplained:
            _warn_replaced_defaults(source, replaced, unexplained)
    gradient = gradient_mode(config)
    recorded = config.pop(_LEGACY_GRADIENT_KEY, gradient)
    if recorded != gradient:  # a config saved by an earlier version, edited since
        warn(
            f"{_LEGACY_GRADIENT_KEY}={recorded!r} is ignored: the core derives how it differentiates "
            f"from ift / hook_ift ({gradient!r} here). Set those instead (ift=False asks for phantom "
            "gradients)."
        )
    if gradient != "phantom" and not {"ift", "hook_ift"} & explicit:
        _warn_unused_phantom_options(config)

    for prefix in ("f", "b"):
        check_choice(f"{prefix}_stop_mode", config[f"{prefix}_stop_mode"], ("rel", "abs"))
        solver = check_choice(f"{prefix}_solver", config[f"{prefix}_solver"], registered_solvers())
        if solver != SOLVER_NAME and prefix == "f" and config["pcdeq_enclosure"]:
            raise InvalidInputError(
                f"pcdeq_enclosure=True asks for a certified forward solve, which only "
                f"{SOLVER_NAME!r} computes; f_solver={solver!r} would return no info['error_bound']. "
                "Remove the f_solver option, or pcdeq_enclosure."
            )
        if solver != SOLVER_NAME:
            guarantee = (
                "plain iteration, so it converges, but"
                if solver in GUARANTEED_SOLVERS
                else "without a convergence guarantee for pcDEQ, and"
            )
            lost = "the guard and the enclosure" if prefix == "f" else "the certified backward solve"
            warn(
                f"{prefix}_solver={solver!r} is {guarantee} the pcdeq core cannot apply {lost} "
                f"with it. To use {SOLVER_NAME!r}, remove the option or set it to that name "
                f"(--{prefix}_solver {SOLVER_NAME} on a command line)."
            )
    norm = config.get("norm_type")
    if norm is not None:
        check_choice("norm_type", norm, registered_norms())
        if norm not in NONNEGATIVE_NORMS:
            warn(
                f"norm_type={norm!r} allows negative weights, which void pcDEQ's guarantees for "
                f"plain nn.Linear / nn.Conv2d layers in f. Pass --norm_type {NORM_NAME} (or "
                f"norm_type='{NORM_NAME}'). The pcDEQ layers constrain their own weights whatever "
                "the norm_type."
            )
    # (a core built directly, PcDEQCore(args), may have none or argparse's 'sliced': its args
    # must rebuild a pcdeq core, get_deq(core.args, key=...))
    config["core"] = CORE_NAME
    config[RESOLVED_KEY] = True
    return ResolvedConfig(config)


def _ask_for_phantom_gradients(config: dict, source: dict, explicit: set[str], kwargs: dict) -> bool:
    """``pcdeq_phantom=True``: ``ift`` and ``hook_ift`` off; return whether they were turned off.

    One of them set on in a keyword over ``pcdeq_phantom`` in the config object wins (a core
    rebuilt from ``core.args`` with ``ift=True`` differentiates implicitly), and the other way
    round; set on as specifically as ``pcdeq_phantom``, or against the runner's, they conflict.
    """
    on = [key for key in ("ift", "hook_ift") if key in explicit and config.get(key)]
    if not on:
        config["ift"] = config["hook_ift"] = False
        return True
    implicit = 2 if any(key in kwargs for key in on) else 1  # a keyword, or the config object
    phantom = 2 if "pcdeq_phantom" in kwargs else 1 if source.get("pcdeq_phantom") else 0  # 0: the runner
    if implicit == phantom or phantom == 0:
        where = " (given to the runner)" if phantom == 0 else ""
        raise InvalidInputError(
            f"pcdeq_phantom=True{where} asks for TorchDEQ's phantom gradient, and {on[0]}=True for "
            "implicit differentiation. Keep one of them."
        )
    if implicit > phantom:
        config["pcdeq_phantom"] = False
        return False
    config["ift"] = config["hook_ift"] = False
    return True


def gradient_mode(config: dict) -> str:
    """How the core differentiates: ``"hook_ift"``, ``"ift"`` or ``"phantom"`` (``ift=False``).

    Derived from ``ift`` / ``hook_ift`` each time, never stored: a core rebuilt from another's
    config with other values of them differentiates as they say. TorchDEQ's ``--ift`` flag cannot
    say "off": on a command line, ``--pcdeq_phantom`` asks for phantom gradients.
    """
    return "hook_ift" if config.get("hook_ift") else "ift" if config.get("ift", True) else "phantom"


# TorchDEQ's phantom-gradient options, and the values that leave them unused.
_NEUTRAL_PHANTOM_OPTIONS = {
    "grad": (1, [1]),
    "tau": (1.0, [1.0]),
    "sup_gap": (-1, 0),
    "sup_loc": (None, [], ()),
}


def _warn_unused_phantom_options(config: dict) -> None:
    """``grad`` / ``tau`` / ``sup_gap`` / ``sup_loc`` set for a solve whose one returned state gets
    the default IFT."""
    if config.get("n_states", 1) != 1 or config.get("indexing"):
        return  # the intermediate states keep TorchDEQ's phantom gradient, grad and tau included
    unused = [
        f"{key}={config[key]!r}"
        for key, neutral in _NEUTRAL_PHANTOM_OPTIONS.items()
        if key in config and not any(config[key] == value for value in neutral)
    ]
    if unused:
        named = " and ".join([", ".join(unused[:-1]), unused[-1]] if len(unused) > 1 else unused)
        states = ""
        if any(item.startswith("sup_") for item in unused):
            states = (
                ", and returns one state in training (sup_gap / sup_loc add states only to phantom gradients)"
            )
        warn(
            f"{named} configure{'s' if len(unused) == 1 else ''} TorchDEQ's phantom "
            "gradient, which the pcdeq core does not use here: it differentiates implicitly by "
            f"default (ift=True){states}. For phantom gradients pass pcdeq_phantom=True "
            "(--pcdeq_phantom on a command line, to the runner or to a parser with "
            "torchdeq_pcdeq.add_pcdeq_args), or ift=False as a keyword: "
            "torchdeq.get_deq(args, ift=False). TorchDEQ's --ift flag cannot say off, and in an "
            "argparse config False is TorchDEQ's default, which reads as unset."
        )


def _integers(value: object) -> list[int] | None:
    """``value`` as a list of ints if it is a sequence of whole numbers (a list, a tuple, a
    range, a NumPy array), else ``None``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    items = [as_integer(item) for item in value]
    return None if None in items else items


def _check_switches(config: dict) -> None:
    """``ift`` and ``hook_ift`` equal True or False (so 1, 0, 1.0, NumPy's bools and one-element
    tensors pass; strings do not): TorchDEQ reads them by truthiness, so the string ``"False"``
    from a hand-written config would switch them on."""
    for key in ("ift", "hook_ift"):
        value = config.get(key, False)
        if not _is_switch(value):
            raise InvalidInputError(
                f"{key} must be True or False, got {value!r} ({type(value).__name__}); a string or "
                f"another value would be read by its truthiness. Pass {key}=True or {key}=False."
            )


def _is_switch(value: object) -> bool:
    if isinstance(value, (str, bytes)):
        return False
    try:
        return bool(value in (True, False))
    except (TypeError, ValueError, RuntimeError):  # e.g. an array of several values
        return False


def _check_numbers(config: dict) -> None:
    """Check TorchDEQ's numeric keys where they are used, before TorchDEQ reads them; store whole
    numbers as ``int``.

    TorchDEQ's core asserts on a bad ``grad`` only, and takes any other value as given: a string
    ``eval_factor`` would make a budget of repeated characters, a float budget would fail at the
    first solve, a NumPy integer would be refused, ``indexing=None`` would fail to unpack. Values
    TorchDEQ gives a meaning to stay valid: ``n_states`` of 1 or less (no split), an
    ``eval_factor`` or ``tau`` that the configuration does not use.
    """
    for key in ("f_max_iter", "b_max_iter"):
        if key in config:
            config[key] = positive_int(key, config[key])
    for key in ("f_tol", "b_tol"):
        if key in config:
            config[key] = positive_float(key, config[key])
    for key, meaning in (
        ("n_states", "the states training returns, split evenly; 1 or less: one"),
        ("eval_f_max_iter", "the eval solve's budget; 0 or less derives it as eval_factor x f_max_iter"),
    ):
        if key in config:
            number = as_integer(config[key])
            if number is None:
                raise InvalidInputError(f"{key} ({meaning}) must be an integer, got {config[key]!r}.")
            config[key] = number
    if config.get("eval_f_max_iter", 0) <= 0 and "eval_factor" in config:
        config["eval_factor"] = positive_float("eval_factor", config["eval_factor"])
    if "indexing" in config:
        indexing = [] if config["indexing"] is None else _integers(config["indexing"])
        if indexing is None:
            raise InvalidInputError(
                "indexing (the iterations at which training returns a state) must be a list of "
                f"integers, got {config['indexing']!r}."
            )
        config["indexing"] = indexing
    n_states = config.get("n_states", 1)
    states = n_states if n_states > 1 else len(config.get("indexing", [])) + 1
    if "tau" in config and (gradient_mode(config) == "phantom" or states > 1):
        config["tau"] = positive_float("tau", config["tau"])
    if "grad" in config:
        grad = config["grad"]
        single = as_integer(grad)
        steps = [single] if single is not None else _integers(grad)
        if not steps or any(step < 1 for step in steps):
            raise InvalidInputError(
                "grad (the phantom gradient's steps) must be an integer >= 1 or a nonempty list of "
                f"them, got {grad!r}."
            )
        if len(steps) not in (1, states):
            raise InvalidInputError(
                f"grad={grad!r} gives {len(steps)} phantom-gradient steps, but training returns "
                f"{states} states (n_states={n_states}, indexing={config.get('indexing', [])!r}): "
                "give one step for all of them, or one per state."
            )
        config["grad"] = single if single is not None else steps

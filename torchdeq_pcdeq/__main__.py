"""Zero-edit runner: ``python -m torchdeq_pcdeq SCRIPT [ARGS...]``.

Imports the plugin (registering ``core="pcdeq"``, ``pcdeq_fixed_point`` and ``pcdeq_nonneg``
into TorchDEQ), then runs ``SCRIPT`` as ``__main__`` with ``ARGS``, exactly as ``python SCRIPT
ARGS...`` would. ``python -m torchdeq_pcdeq -m MODULE [ARGS...]`` runs a module instead.

Processes the script starts (``torch.multiprocessing.spawn``, DDP workers, Python subprocesses)
register the plugin too, as soon as they import torchdeq: the runner puts a small
``sitecustomize`` (``torchdeq_pcdeq/_autoload``) on their ``PYTHONPATH``.

The runner takes the options of the pcdeq core and of the norm ``pcdeq_nonneg`` as flags of
its own, among the script's arguments (``--pcdeq_guard warn``, ``--pcdeq_enclosure``,
``--pcdeq_nonneg_init reference``, ...; see ``torchdeq_pcdeq.config.RUNNER_OPTIONS``): it
removes them before the script parses its arguments, and every pcdeq core and ``pcdeq_nonneg``
norm the script or its child processes build take them where the script's config leaves an
option at its default.

Example:
    python -m torchdeq_pcdeq train.py --core pcdeq --norm_type pcdeq_nonneg --pcdeq_guard warn
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys

USAGE = """usage: python -m torchdeq_pcdeq SCRIPT [ARGS...]
       python -m torchdeq_pcdeq -m MODULE [ARGS...]

Registers the pcDEQ plugin into TorchDEQ, then runs SCRIPT (or MODULE) as __main__ with ARGS,
so that an unmodified TorchDEQ script accepts --core pcdeq --norm_type pcdeq_nonneg. The pcdeq
core's options (--pcdeq_guard, --pcdeq_nonconvergence, --pcdeq_check_every, --pcdeq_enclosure,
--pcdeq_enclosure_upper, --pcdeq_rate_bound, --pcdeq_sradius, --pcdeq_phantom) and the norm's
(--pcdeq_nonneg_init keep|reference) may be given among ARGS: the runner takes them out and the
script's pcdeq cores and pcdeq_nonneg norms use them."""


def _asks_for_usage(argv: list[str]) -> bool:
    return not argv or argv[0] in ("-h", "--help")


def _print_usage(argv: list[str]) -> int:
    """The usage, on stdout when asked for (exit 0), else on stderr (exit 2)."""
    print(USAGE, file=sys.stderr if not argv else sys.stdout)
    return 2 if not argv else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _asks_for_usage(argv):  # (before the imports: no torch to load for the usage)
        return _print_usage(argv)

    import torchdeq_pcdeq  # noqa: F401  (registers into TorchDEQ)
    from torchdeq_pcdeq.config import RUNNER_OPTIONS_ENV, parse_runner_options
    from torchdeq_pcdeq.errors import PcDEQError

    try:
        options, argv = parse_runner_options(argv)
    except PcDEQError as error:
        print(f"torchdeq_pcdeq: {error}", file=sys.stderr)
        return 2
    if _asks_for_usage(argv):  # (options, then no script)
        return _print_usage(argv)
    if options:
        os.environ[RUNNER_OPTIONS_ENV] = json.dumps(options)
        _warn_unused_options(options, argv)
    _register_in_child_processes()

    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        sys.argv = argv[1:]
        with _explained_registry_errors(argv):
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    script = argv[0]
    if not os.path.isfile(script):
        print(f"torchdeq_pcdeq: no such script: {script!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    with _explained_registry_errors(argv):
        runpy.run_path(script, run_name="__main__")
    return 0


@contextlib.contextmanager
def _explained_registry_errors(argv: list[str]):
    """TorchDEQ's bare "Not registered ..." assertions become errors listing the valid names."""
    from torchdeq_pcdeq.plugin import explain_registry_error

    try:
        yield
    except AssertionError as error:
        explained = explain_registry_error(error, argv)
        if explained is None:
            raise
        raise explained from error


def _warn_unused_options(options: dict, argv: list[str]) -> None:
    """Options of the pcdeq core (or of the norm pcdeq_nonneg) given with a ``--core`` (or
    ``--norm_type``) that builds another one: TorchDEQ's cores take them without a word."""
    from torchdeq_pcdeq.config import command_line_flags, torchdeq_argparse_defaults
    from torchdeq_pcdeq.errors import warn

    flags = command_line_flags(argv, torchdeq_argparse_defaults())
    for flag, ours, owners in (
        ("core", "pcdeq", [key for key in options if key != "pcdeq_nonneg_init"]),
        ("norm_type", "pcdeq_nonneg", [key for key in options if key == "pcdeq_nonneg_init"]),
    ):
        chosen = flags.get(flag)
        if owners and chosen is not None and chosen != ours:
            named = ", ".join(f"--{key}" for key in owners)
            warn(
                f"{named} configure{'s' if len(owners) == 1 else ''} the {ours} {flag.replace('_', ' ')}, "
                f"and --{flag} {chosen} asks for another: the option has no effect on it. Pass "
                f"--{flag} {ours}, or drop {named}."
            )


def _register_in_child_processes() -> None:
    autoload = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_autoload")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if autoload not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([autoload, *paths])


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark entry point shares: argument types, the command line it records, results files.

* ``positive_int``, ``positive_float``, ``nonnegative_int``, ``training_batch_size``,
  ``available_device``: argparse types that refuse bad values with a message saying what was
  expected (argparse then prints the usage and exits with 2). ``available_device`` also refuses
  a CUDA device on a machine where torch sees none, before any work.
* ``command``: the command line that reproduces a run, recorded in its tables.
* ``run_as_command`` and ``configuring``: how each entry point runs ``main()`` as
  ``python -m benchmarks.<name>``. An error of the run's configuration (a missing dataset, an
  unknown name), raised inside ``with configuring():``, ends it as a bad flag does, with
  ``<name>.py: error: <message>`` and status 2, not a traceback. The same error types raised
  once the run computes (a solver refusing a NaN injection in epoch 3) keep their traceback.
* ``results_stem`` and ``write_results``: ``<stem>.json`` (strict JSON: NaN and infinities
  become ``null``) and ``<stem>.md`` next to it. The endings are appended, so a stem such as
  ``run.v2`` keeps its name (``Path.with_suffix`` would replace ``.v2``).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--epochs", type=positive_int, default=1)
    >>> parser.parse_args(["--epochs", "3"]).epochs
    3
    >>> sanitized({"a": float("nan"), "b": [1.0, float("inf")]})
    {'a': None, 'b': [1.0, None]}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import shlex
import sys

import torch

from torchdeq_pcdeq.errors import InvalidInputError, UnknownNameError

__all__ = [
    "positive_int",
    "positive_float",
    "nonnegative_int",
    "training_batch_size",
    "available_device",
    "command",
    "run_as_command",
    "configuring",
    "sanitized",
    "results_stem",
    "path_with",
    "write_results",
]


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def training_batch_size(text: str) -> int:
    """A number of training images per batch, or in all: batch normalization needs two or more."""
    value = _int_at_least(text, 1)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 2, got {value}: the models' batch normalization cannot train "
            "on one image"
        )
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def available_device(text: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``, available on this machine."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:0, got {text!r}"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: no CUDA GPU is visible to torch on this machine; use --device cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or a CUDA device, got {text!r}")
    return parsed


def command(module: str, argv: list[str] | None) -> str:
    """``python -m <module> <arguments>``: ``argv`` as given, or the process's own arguments,
    each through :func:`as_typed`.

    Example:
        >>> command("benchmarks.train", ["--out", str(pathlib.Path.cwd() / "results" / "run")])
        'python -m benchmarks.train --out results/run'
    """
    arguments = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, shlex.join(as_typed(arguments))]).strip()


def as_typed(arguments: list[str]) -> list[str]:
    """``arguments`` with each absolute path inside the working directory (alone, or as the
    value of ``--name=path``) made relative to it, as a user would type it there: the suite
    passes absolute paths, and a recorded command should rerun from any checkout.

    Example:
        >>> here = pathlib.Path.cwd()
        >>> as_typed(["--out", str(here / "a"), f"--out={here / 'b'}", "-", "--quiet"])
        ['--out', 'a', '--out=b', '-', '--quiet']
        >>> outside = str(here / ".." / "c")  # not inside, though it starts like it
        >>> as_typed([outside]) == [outside]
        True
    """
    try:
        cwd = pathlib.Path.cwd()
    except OSError:  # the working directory was removed: nothing to be relative to
        return list(arguments)
    return [_relative_within(argument, cwd) for argument in arguments]


def _relative_within(argument: str, cwd: pathlib.Path) -> str:
    name, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    path = pathlib.Path(value)
    if not path.is_absolute() or ".." in path.parts or path == cwd or not path.is_relative_to(cwd):
        return argument
    return f"{name}{equals}{path.relative_to(cwd)}"


def sanitized(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: sanitized(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitized(item) for item in value]
    return value


def results_stem(out: str | None, default: pathlib.Path, bf16: bool = False) -> pathlib.Path:
    """The stem of ``--out`` (a trailing ``.json`` or ``.md`` dropped), or ``default``, named
    ``<default>_bf16`` for a ``--bf16`` run so that it keeps the float32 results.

    Example:
        >>> results_stem(None, pathlib.Path("results/micro_cuda"), bf16=True).name
        'micro_cuda_bf16'
    """
    if out is None:
        return default.with_name(f"{default.name}_bf16") if bf16 else default
    stem = pathlib.Path(out)
    for ending in (".json", ".md"):
        if stem.name.endswith(ending) and len(stem.name) > len(ending):
            return stem.with_name(stem.name[: -len(ending)])
    return stem


def path_with(stem: pathlib.Path, ending: str) -> pathlib.Path:
    """``stem`` with ``ending`` appended to its name (``run.v2`` -> ``run.v2.json``)."""
    return stem.with_name(stem.name + ending)


def write_results(stem: pathlib.Path, payload, markdown: str) -> None:
    """Write ``<stem>.json`` (strict JSON) and ``<stem>.md``, creating the folder, and say so on
    stderr (a short trial run replaces the results of the same name)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    path_with(stem, ".json").write_text(json.dumps(sanitized(payload), indent=2, allow_nan=False) + "\n")
    path_with(stem, ".md").write_text(markdown.rstrip("\n") + "\n")
    said_written(path_with(stem, ".json"), path_with(stem, ".md"))


def said_written(*paths: pathlib.Path) -> None:
    """``wrote <path>`` on stderr for each of ``paths``, as typed from the working directory."""
    for path in as_typed([str(path) for path in paths]):
        print(f"wrote {path}", file=sys.stderr)


def run_as_command(main) -> None:
    """Run ``main()`` for ``python -m benchmarks.<name>``; an error raised inside
    :func:`configuring` ends the run as argparse ends one for a bad flag:
    ``<name>.py: error: <message>`` and status 2. Every other exception keeps its traceback."""
    try:
        main()
    except (InvalidInputError, UnknownNameError) as error:
        if not getattr(error, _IN_CONFIGURATION, False):
            raise
        print(f"{pathlib.Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)


_IN_CONFIGURATION = "raised_while_configuring_the_run"


@contextlib.contextmanager
def configuring():
    """Mark the :class:`~torchdeq_pcdeq.errors.InvalidInputError` and
    :class:`~torchdeq_pcdeq.errors.UnknownNameError` raised inside as errors of the run's
    configuration, for :func:`run_as_command`. The exception itself passes through unchanged, so
    a caller of ``main()`` from Python catches the same types.

    Example:
        >>> from torchdeq_pcdeq.errors import InvalidInputError
        >>> try:
        ...     with configuring():
        ...         raise InvalidInputError("no such file")
        ... except InvalidInputError as error:
        ...     print(getattr(error, _IN_CONFIGURATION))
        True
    """
    try:
        yield
    except (InvalidInputError, UnknownNameError) as error:
        setattr(error, _IN_CONFIGURATION, True)
        raise

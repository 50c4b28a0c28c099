"""Registers torchdeq_pcdeq in processes started by a script run through the zero-edit runner.

``python -m torchdeq_pcdeq SCRIPT`` puts this folder on ``PYTHONPATH``, so every Python process
the script starts (``torch.multiprocessing.spawn`` and DDP workers, subprocesses) runs this file
at start-up. It imports nothing heavy: it installs an import hook that imports torchdeq_pcdeq
right after the process imports torchdeq, then runs the interpreter's own ``sitecustomize``,
which this file shadows.
"""

import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class _RegisterAfterTorchDEQ(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchdeq":
            return None
        sys.meta_path.remove(self)  # one shot; let the regular finders locate torchdeq
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            with contextlib.suppress(ImportError):  # a Python without the plugin: nothing to do
                importlib.import_module("torchdeq_pcdeq")

        spec.loader.exec_module = exec_module
        return spec


def _run_shadowed_sitecustomize():
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    this = sys.modules.pop("sitecustomize", None)
    try:
        importlib.import_module("sitecustomize")
    except ModuleNotFoundError as missing:
        if missing.name != "sitecustomize":
            raise  # the other sitecustomize failed on an import of its own: site reports it
        # No other sitecustomize: the import that is running this file looks it up by name
        # when the file ends, and site prints "Error in sitecustomize" if the entry is gone.
        if this is not None:
            sys.modules["sitecustomize"] = this


if "torchdeq" not in sys.modules:
    sys.meta_path.insert(0, _RegisterAfterTorchDEQ())
_run_shadowed_sitecustomize()

"""A checkout's top-level folders, imported by their own names, step aside.

``kernels``, ``spaces`` and ``evaluators`` (and ``search``, ``studies``) are also the names
of PyPI packages. With a checkout's root on ``sys.path`` (``python -c`` or ``-m`` there, a
notebook in it), ``import kernels`` would find the folder instead: libraries that probe for
the PyPI package (``transformers`` does) would import the folder and fail on its relative
imports. Each folder's ``__init__`` calls ``step_aside`` when imported by its own name.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def step_aside(name: str, folder: str) -> str:
    """Put the package ``name`` installed outside the checkout (if any) in ``sys.modules``
    in place of its folder, so the import in progress returns it; else leave a module with
    no version, which probes take as absent. Returns the package the folder's own
    ``__init__`` then imports from (``paretoslim.<name>``)."""
    checkout = Path(folder).resolve().parent
    elsewhere = [entry for entry in sys.path if _resolved(entry) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return f"paretoslim.{name}"


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or os.getcwd()).resolve()
    except OSError:
        return None

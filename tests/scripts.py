"""Scripts outside the package (``benchmarks/``, ``scripts/``), loaded as modules by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Execute ``path`` as a fresh module, registered in ``sys.modules`` under ``name`` (its
    stem by default) before it runs, so the dataclasses it defines find their module.

    Parameters
    ----------
    path : Path
    name : str or None

    Returns
    -------
    ModuleType
    """
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

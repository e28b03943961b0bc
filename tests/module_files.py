"""Import a module from a file that is not on the path: the benchmark scripts, a patched vLLM's own files."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> types.ModuleType:
    """benchmarks/<name>.py as the module `name` (the scripts import each other by that name)."""
    return load_module(BENCHMARKS / f"{name}.py", name)

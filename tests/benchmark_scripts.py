"""Benchmark scripts (benchmarks/*.py, not a package) loaded as modules, for the tests of their pure parts."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load(name: str):
    """benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

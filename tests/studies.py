"""Import a study script of benchmarks/ as a module: the tests run the studies at toy sizes (`--quick`)."""

import importlib
import pathlib
import sys
from types import ModuleType

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def study(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))

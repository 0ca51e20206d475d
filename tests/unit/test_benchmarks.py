"""Every benchmark script still imports against the code it measures (a renamed function broke one once).
Running them is the job of their own commands; this only catches what would stop them before they start."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_the_benchmark_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    assert module.__doc__, f"benchmarks/{name}.py says what it measures"

"""A guard that keeps the suite free of clocks: no test waits a fixed time for something to happen, and none
compares elapsed wall time with a bound (a shared 2-core CI machine makes both flake, and red that means
nothing teaches everyone to ignore red).

Allowed: polling with a deadline, a ``sleep`` or clock read inside a ``while`` loop (``while not done: assert
clock() < deadline; sleep(...)``). Anything else is listed in ALLOWED with the reason it stays.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
CLOCKS = {"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "time", "time_ns"}

# (file relative to tests/, enclosing function): why a sleep outside a polling loop stays.
ALLOWED = {
    ("unit/test_turns.py", "step"): "stands for a forward pass: the turn is held while it lasts (its length only "
                                    "decides how many turns the flooding thread gets, never the outcome)",
    ("unit/test_turns.py", "single_requests"): "a client's pause between single requests, so the flooding model "
                                               "gets turns in between; no assertion waits on it",
}


def _is_clock(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CLOCKS
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "time")


def findings(source: str, name: str) -> list[str]:
    """What the guard objects to in one file's source: (line, kind, enclosing function) as words."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def enclosing(node: ast.AST) -> tuple[str, bool]:
        """(the function around ``node``, whether a ``while`` loop of that function holds it)."""
        in_while = False
        while node in parents:
            node = parents[node]
            in_while = in_while or isinstance(node, ast.While)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name, in_while
        return "<module>", in_while

    found = []
    for node in ast.walk(tree):
        func, polling = enclosing(node)
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if called == "sleep" and not polling and (name, func) not in ALLOWED:
                found.append(f"{name}:{node.lineno} sleep outside a polling loop in {func}()")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and _is_clock(node.left):
            found.append(f"{name}:{node.lineno} elapsed wall time (a clock minus a start) in {func}()")
        if isinstance(node, (ast.Compare, ast.Assert)) and not polling and any(_is_clock(n) for n in ast.walk(node)):
            found.append(f"{name}:{node.lineno} a clock compared outside a polling loop in {func}()")
    return sorted(set(found))


def test_no_test_sleeps_or_compares_wall_time_outside_polling_loops():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        found += findings(path.read_text(), path.relative_to(TESTS).as_posix())
    assert not found, "\n".join(found)


def test_every_allowed_sleep_still_exists_and_says_why():
    for (name, func), why in ALLOWED.items():
        source = (TESTS / name).read_text()
        assert f"def {func}(" in source, f"{name}: {func}() is gone; drop it from ALLOWED"
        assert len(why) > 40


def test_the_guard_catches_what_it_names():
    bad = (
        "import asyncio, time\n"
        "def test_a():\n    time.sleep(0.3)\n"
        "async def test_b():\n    await asyncio.sleep(1)\n"
        "def test_c():\n    t0 = time.monotonic()\n    assert time.monotonic() - t0 < 1\n"
        "def test_d(started):\n    assert time.perf_counter() < started + 1\n"
    )
    got = findings(bad, "x.py")
    assert [f.split(" ", 1)[0] for f in got] == ["x.py:10", "x.py:3", "x.py:5", "x.py:8", "x.py:8"], got
    good = (
        "import time\n"
        "def test_e(done):\n    deadline = time.monotonic() + 30\n"
        "    while not done():\n        assert time.monotonic() < deadline\n        time.sleep(0.01)\n"
    )
    assert findings(good, "y.py") == []

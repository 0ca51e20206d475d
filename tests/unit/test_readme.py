"""The README's promises that code can check: its flags table and its two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from embedserve.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def serve_flags() -> set[str]:
    parser = build_parser({})
    serve = parser._subparsers._group_actions[0].choices["serve"]
    return {s for a in serve._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_every_serve_flag_is_in_the_flags_table_with_its_variable():
    table = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| `(EMBEDSERVE_[A-Z0-9_]+)` \|", README, re.M))
    flags = serve_flags()
    negations = {f for f in flags if f.startswith("--no-") and "--" + f[5:] in flags}
    assert set(table) == flags - negations
    for flag, var in table.items():
        assert var == "EMBEDSERVE_" + flag[2:].replace("-", "_").upper()
    for negation in negations:  # an on/off pair's row names its --no- form
        row = re.search(rf"^\| `--{negation[5:]}` .*$", README, re.M).group(0)
        assert f"`{negation}`" in row


def test_the_two_set_up_commands_are_there():
    for marker in ("serve-command", "test-command"):
        block = re.search(rf"<!-- {marker} -->\n```\n(.+)\n```\n<!-- /{marker} -->", README)
        assert block, marker
        assert block.group(1).index("torch==2.13.0") < block.group(1).index(" -e ")  # the lock: test_lock.py
    assert "embedserve serve" in re.search(r"<!-- serve-command -->\n```\n(.+)\n", README).group(1)

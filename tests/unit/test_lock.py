"""constraints.txt, the lock of tested versions: well formed, true to pyproject, and used by every install path.

The README's two commands, .ci/run (which runs the README's test command), the Dockerfile's images and the GPU
check's wheels all install through it; scripts/refresh_lock.py is the only writer. While it refreshes, the suite
checks the candidate lock it is about to write (EMBEDSERVE_TEST_LOCK), so a new dependency can enter.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
LOCK = Path(os.environ.get("EMBEDSERVE_TEST_LOCK", ROOT / "constraints.txt"))


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and name == canonicalize_name(name) and name not in pins, line
        pins[name] = Version(version)
    return pins


def readme_command(marker: str) -> str:
    block = re.search(rf"<!-- {marker} -->\n```\n(.+?)\n```\n<!-- /{marker} -->", (ROOT / "README.md").read_text(),
                      re.S)
    assert block, marker
    return block.group(1).strip()


def pip_installs(script: str) -> list[list[str]]:
    """Each `pip install` / `pip download` in a shell script (continuation lines joined), as its words."""
    found = []
    lines = script.replace("\\\n", " ").splitlines()
    parts = [p for line in lines if "pip" in line and not line.lstrip().startswith("#")
             for p in re.split(r"&&|;|\|\||\|", line)]
    for part in parts:
        words = shlex.split(part, comments=True)
        for i, word in enumerate(words):
            if word in ("install", "download") and i and words[i - 1] == "pip":
                found.append(words[i + 1:])
    return found


def constraint_files(words: list[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-c", "--constraint")] + [
        w.split("=", 1)[1] for w in words if w.startswith("--constraint=")]


def torch_pins(text: str) -> set[str]:
    return set(re.findall(r"\btorch==([0-9][\w.]*)", text))


def test_the_lock_is_written_by_the_refresh_script_and_pins_every_package_once():
    header = [line for line in LOCK.read_text().splitlines() if line.startswith("#")]
    assert any("scripts/refresh_lock.py" in line for line in header)
    pins = locked()
    assert list(pins) == sorted(pins)
    # what the suite itself runs on, and what transformers >= 5 brings (issue 22)
    assert {"torch", "transformers", "pytest", "sentence-transformers", "triton"} <= pins.keys()


def test_every_dependency_in_pyproject_is_locked_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    extras = project["optional-dependencies"]
    assert {"test", "otel"} <= extras.keys()
    for spec in project["dependencies"] + [spec for group in extras.values() for spec in group]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but not in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (spec, str(pins[name]))
    # Users installing the library keep ranges: torch's floor stays what the code needs.
    assert "torch>=2.9" in project["dependencies"]


@pytest.mark.parametrize("marker", ["serve-command", "test-command"])
def test_the_readmes_commands_install_through_the_lock(marker):
    command = readme_command(marker)
    installs = pip_installs(command)
    assert installs, command
    for words in installs:
        assert constraint_files(words) == ["constraints.txt"], words
    # torch first, at the lock's release, then the project.
    assert installs[0][-1] == f"torch=={locked()['torch']}", installs[0]
    assert torch_pins(command) == {str(locked()["torch"])}
    assert any(w.startswith("-e") for w in installs[-1]) or "-e" in installs[-1]


def test_the_test_command_builds_pylates_reference_venv_from_its_complete_list():
    """PyLate pins other releases than ours: its venv gets exactly the listed versions, torch at the lock's."""
    command = readme_command("test-command")
    words = shlex.split(command.split(".venv/pylate/bin/pip install", 1)[1].split("&&", 1)[0])
    assert "--no-deps" in words and words[words.index("-r") + 1] == "tests/references/pylate.txt"
    pins = {}
    for line in (ROOT / "tests" / "references" / "pylate.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and canonicalize_name(name) not in pins, line
            pins[canonicalize_name(name)] = Version(version)
    assert pins["torch"] == locked()["torch"] and "pylate" in pins
    assert command.index("python3 -m venv .venv/pylate") < command.index("python -m pytest")


def test_ci_runs_the_readmes_test_command_and_installs_nothing_past_the_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'bash -euo pipefail -c "$cmd"' in ci
    for words in pip_installs(ci):
        assert constraint_files(words) == ["constraints.txt"], words


def dockerfile_runs() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_both_images_install_through_the_lock_and_keep_no_source_tree():
    lines = dockerfile_runs()
    copied = {}  # constraints file path in the image -> line number
    installs = 0
    for n, line in enumerate(lines):
        words = line.split()
        if words[0] == "COPY" and "constraints.txt" in words[1:-1]:
            copied[words[-1].rstrip("/") + "/constraints.txt"] = n
        if words[0] == "RUN":
            for pip in pip_installs(line[len("RUN"):]):
                installs += 1
                files = constraint_files(pip)
                assert files and all(f in copied and copied[f] < n for f in files), line
    assert installs >= 3  # torch in each base, then the project
    # the project with its otel extra (an OTLP endpoint works in either image)
    assert any('"/tmp/src[otel]"' in line for line in lines if line.startswith("RUN"))
    assert torch_pins("\n".join(lines)) == {str(locked()["torch"])}
    # The source tree is built from a scratch folder that is removed, never left in the working directory.
    workdirs = [line.split()[1] for line in lines if line.startswith("WORKDIR")]
    assert all(not w.startswith("/tmp/src") for w in workdirs)
    assert any("rm -rf /tmp/src" in line for line in lines if line.startswith("RUN"))


def test_the_gpu_checks_wheels_come_from_the_lock():
    script = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    (download,) = pip_installs(script.replace("python3 -m pip", "pip"))
    assert constraint_files(download) == ["constraints.txt"]
    pins = locked()
    names = [line for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert names and all(canonicalize_name(name) in pins and "=" not in name for name in names)

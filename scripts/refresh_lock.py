#!/usr/bin/env python3
"""Refresh constraints.txt, the lock of tested versions that every install of embedserve goes through.

In a new venv this installs the README's torch pin, then the project with its test extra at the newest releases
pyproject allows (no lock), runs the whole suite, and only if it passes (and each release has a wheel for the
images' CPython 3.12) writes every installed package and its version to constraints.txt. One exception to
"newest": triton is pinned to the release the CUDA build of that torch requires, because the CUDA image installs
exactly that one and the suite's interpreter runs of the Triton kernels should check the same release.

    python3 scripts/refresh_lock.py              # about 12 minutes on 2 cores; needs the package registry
    python3 scripts/refresh_lock.py --keep DIR   # keep the venv in DIR (to rerun a failure by hand)

Stdlib only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
# Never locked: the installer itself, and the project (an editable install of the checkout).
UNLOCKED = {"pip", "embedserve"}


def readme_command(marker: str) -> str:
    """The command between <!-- marker --> and <!-- /marker --> in the README (the one CI runs)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\n```\n(.+?)\n```\n<!-- /{marker} -->", text, re.S)
    if block is None:
        sys.exit(f"README.md has no {marker} block")
    return block.group(1).strip()


def torch_pin() -> str:
    found = re.search(r"\btorch==([0-9][\w.]*)", readme_command("test-command"))
    if found is None:
        sys.exit("the README's test command pins no torch (torch==X.Y.Z)")
    return found.group(1)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def cuda_triton(pip: list[str], torch: str, scratch: Path) -> str:
    """The triton that torch's CUDA wheel (Linux x86-64, CPython 3.12: the CUDA image) requires, read from the
    wheel's metadata by pip's resolver (no download of the wheel itself)."""
    report = scratch / "torch-cuda.json"
    run([*pip, "install", "-q", "--dry-run", "--no-deps", "--ignore-installed", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
         "--target", str(scratch / "unused"), "--report", str(report), f"torch=={torch}"])
    (item,) = json.loads(report.read_text())["install"]
    for requirement in item["metadata"].get("requires_dist", []):
        found = re.match(r"triton\s*==\s*([\w.]+)", requirement)
        if found:
            return found.group(1)
    sys.exit(f"torch {torch}'s CUDA wheel names no exact triton release")


IMAGE_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux_2_5_x86_64", "manylinux1_x86_64"]


def check_image_wheels(pip: list[str], packages: dict[str, str], scratch: Path) -> None:
    """Both images run CPython 3.12 on x86-64 Linux: every locked release must have a wheel for it there (torch and
    triton excepted: each image takes its own torch build, which brings its triton)."""
    wanted = scratch / "image-wheels.txt"
    wanted.write_text("".join(f"{n}=={v}\n" for n, v in packages.items() if n not in ("torch", "triton")))
    platforms = [word for p in IMAGE_PLATFORMS for word in ("--platform", p)]
    run([*pip, "install", "-q", "--dry-run", "--no-deps", "--ignore-installed", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", *platforms, "--target", str(scratch / "unused"),
         "-r", str(wanted)])


def frozen(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    packages = {}
    for item in json.loads(out):
        name = canonical(item["name"])
        if name not in UNLOCKED:
            # A local label (torch's +cpu) names the build, not the release: the CUDA image takes the same release.
            packages[name] = item["version"].split("+")[0]
    return packages


def write_lock(path: Path, packages: dict[str, str], *, torch: str, triton: str, summary: str) -> None:
    header = [
        "# embedserve's lock: every package the README's two commands, .ci/run and both images install, at the",
        "# versions the whole test suite passed with. Installs use it as pip constraints (-c constraints.txt);",
        "# pyproject.toml keeps ranges for people who install embedserve as a library.",
        "# Written by scripts/refresh_lock.py (never by hand): newest releases pyproject allowed, then the suite.",
        f"# {datetime.date.today()}, Python {platform.python_version()} on {platform.machine()}, "
        f"torch {torch} (the README's pin; CPU build here),",
        f"# triton {triton} (what torch {torch}'s CUDA wheel requires). Suite: {summary}",
        "# Not here: the CUDA image's nvidia-* / cuda-* wheels, which torch's CUDA wheel pins itself.",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(packages.items())]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(header + lines) + "\n")
    tmp.replace(path)


def read_lock() -> dict[str, str]:
    if not LOCK.exists():
        return {}
    pairs = (line.split("==") for line in LOCK.read_text().splitlines() if line and not line.startswith("#"))
    return {name: version for name, version in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="build the venv here and keep it (default: a temporary folder)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="embedserve-lock-"))
    venv = args.keep or scratch / "venv"
    try:
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
        python = venv / "bin" / "python"
        pip = [str(python), "-m", "pip"]
        torch = torch_pin()
        triton = cuda_triton(pip, torch, scratch)
        pinned = scratch / "pinned.txt"
        pinned.write_text(f"torch=={torch}\ntriton=={triton}\n")
        run([*pip, "install", "-q", "-c", str(pinned), f"torch=={torch}"])
        run([*pip, "install", "-q", "-c", str(pinned), "-e", f"{ROOT}[test]"], cwd=ROOT)
        # The suite's lock tests check the candidate (so a new dependency can enter), not the old file.
        new = frozen(python)
        candidate = scratch / "constraints.txt"
        write_lock(candidate, new, torch=torch, triton=triton, summary="(running)")
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["EMBEDSERVE_TEST_LOCK"] = str(candidate)
        print("+ python -m pytest -q   (the whole suite: about 10 minutes on 2 cores)", flush=True)
        suite = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                               capture_output=True, text=True)
        sys.stdout.write(suite.stdout[-3000:])
        if suite.returncode != 0:
            sys.stderr.write(suite.stderr[-3000:])
            sys.exit(f"the suite failed with today's releases (exit {suite.returncode}): {LOCK.name} is unchanged")
        summary = suite.stdout.strip().splitlines()[-1].strip("= ")
        check_image_wheels(pip, new, scratch)
        old = read_lock()
        write_lock(LOCK, new, torch=torch, triton=triton, summary=summary)
        changed = [f"  {n} {old.get(n, '-')} -> {new.get(n, '-')}" for n in sorted(old.keys() | new.keys())
                   if old.get(n) != new.get(n)]
        print(f"wrote {LOCK.relative_to(ROOT)}: {len(new)} packages, {len(changed)} changed")
        print("\n".join(changed))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""kernels/ installs as embedserve.kernels, never as a top-level `kernels` (a PyPI name transformers probes)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import embedserve
import embedserve.kernels

ROOT = Path(__file__).resolve().parents[2]


PROBE = (
    "import embedserve.kernels.attention as a, importlib.util as u; "
    "print(a.__file__); print(u.find_spec('kernels') is None)"
)


def test_editable_install_maps_kernels_under_embedserve(tmp_path):
    # The test suite runs on the README's editable install; probe it from outside the repository, where
    # the working directory cannot put a top-level `kernels` on the path.
    assert Path(embedserve.kernels.__file__).resolve().parent == ROOT / "kernels"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.split()
    assert Path(out[0]).resolve() == ROOT / "kernels" / "attention.py"
    assert out[1] == "True"


@pytest.mark.slow
def test_regular_wheel_install_imports_embedserve_kernels(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True,
    )
    (wheel,) = wheel_dir.glob("embedserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "embedserve/kernels/attention.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    # Import from the installed copy (PYTHONPATH precedes the editable finder) in a clean interpreter.
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={"PYTHONPATH": str(target), "PATH": ""}, capture_output=True, text=True,
        check=True, cwd=tmp_path,
    ).stdout.split()
    assert out[0].startswith(str(target)), out
    assert out[1] == "True"

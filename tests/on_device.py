"""The device the tests run on, chosen by one variable, and the tolerances per dtype, stated once.

``EMBEDSERVE_TEST_DEVICE`` = ``cpu`` (the default, and CI) or ``cuda`` / ``cuda:N``. Tests marked ``gpu`` make up
the GPU suite: ``EMBEDSERVE_TEST_DEVICE=cuda python -m pytest -m gpu``. Most of them (kernels, attention,
model parity, the engine) run on whichever device is chosen; the few that mean something only on CUDA
(pinned staging, no host sync, flash kernels) are :data:`needs_cuda` and skip on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("EMBEDSERVE_TEST_DEVICE", "cpu"))
ON_CUDA = DEVICE.type == "cuda"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cosine similarity to an fp32 reference that vectors computed in each dtype must reach.
COS_MIN = {torch.float32: 0.99999, torch.bfloat16: 0.999, torch.float16: 0.999}
# Elementwise (atol, rtol) for kernel outputs in each dtype against an fp32 reference of the same inputs.
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
# How far a vector embedded alone may be from the same text's vector inside a mixed batch (fp32).
BATCH_INVARIANCE = 1e-5

needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CUDA, reason="needs a GPU: EMBEDSERVE_TEST_DEVICE=cuda"),
]


def cos_min(dtype: torch.dtype | str) -> float:
    return COS_MIN[DTYPES.get(dtype, dtype)]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=atol, rtol=rtol)


def model_config(path, **kw):
    """A ModelConfig on the test device, in fp32 unless a dtype is given (tests compare at fp32 thresholds)."""
    from embedserve.config import ModelConfig

    kw.setdefault("dtype", "float32")
    return ModelConfig(path=str(path), device=str(DEVICE), **kw)


# Attention backends the model tests run: in fp32 every SDPA form; in half precision the automatic choice (on
# CUDA a flash kernel where the torch has one for the model) and, on CUDA, the SDPA fallback as well.
FP32_ATTENTION = ["sdpa_bucketed", "sdpa_segments", "dense"]
HALF_ATTENTION = ["auto"] + (["sdpa_bucketed"] if ON_CUDA else [])
